"""scikit-learn's 8x8 handwritten digits as image domains: disjoint groups of classes.

Each class's images are shuffled with a fixed seed and dealt into eval (the first
`eval_fraction`), router samples (the next `router_per_class`) and training (the rest).
A domain is a group of classes, e.g. {0, 1, 2}: its expert is fine-tuned on the group's
training images, and it is scored on the group's eval images.

Pixels are 0..16 in the data set; the models take them as float32 in [0, 1], shaped
[n, 1, 8, 8] (pixel_values of a 1-channel ViT), which is also the format of the router
sample `.npy` files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DESCRIPTION = "sklearn.datasets.load_digits (1797 images, 8x8, 10 classes), pixels / 16"


@dataclass
class ImageSplit:
    x: np.ndarray  # [n, 1, 8, 8] float32
    y: np.ndarray  # [n] int64

    def of(self, classes: tuple[int, ...]) -> "ImageSplit":
        keep = np.isin(self.y, classes)
        return ImageSplit(self.x[keep], self.y[keep])


@dataclass
class Digits:
    train: ImageSplit
    router: ImageSplit
    eval: ImageSplit


def load_digits_splits(seed: int, eval_fraction: float, router_per_class: int) -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "router": [], "eval": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_eval = int(round(eval_fraction * len(idx)))
        parts["eval"].append(idx[:n_eval])
        parts["router"].append(idx[n_eval:n_eval + router_per_class])
        parts["train"].append(idx[n_eval + router_per_class:])
    splits = {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
    return Digits(*(ImageSplit(x[splits[k]], y[splits[k]]) for k in ("train", "router", "eval")))


def group_name(classes: tuple[int, ...]) -> str:
    """{0, 1, 2} -> 'digits-012' (a model folder and a domain name)."""
    return "digits-" + "".join(map(str, classes))
