"""A Split-Merge output, read: ``split_merge.json``, η, and its experts named.

``pacer-stream run`` with ``method: split_merge`` (split_job.py) writes μ as a normal
checkpoint plus these two files; :mod:`.split_merge` serves the experts from them, and
``pacer-stream materialize`` writes one as a dense model. An expert is named by its
index, its model label or that label's basename (:func:`resolve_expert`).

Output folder format (``eta.safetensors``, metadata {"format": "pacer-split-merge-eta"})::

    NAME::indices  I64 [nnz]   ascending flat indices into tensor NAME    (sparse form)
    NAME::values   F32 [nnz]
    NAME           F32 [shape of NAME]                                   (dense form)

and ``split_merge.json``: {"method": "split_merge", "models": [labels], "coefficients":
[c_t], "eta": "eta.safetensors", "density", "k", "numel", "eigenvalue", ...}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import PacerError

ETA_FORMAT = "pacer-split-merge-eta"
INFO_FILE = "split_merge.json"

Eta = dict[str, tuple[torch.Tensor | None, torch.Tensor]]


# -----------------------------------------------------------------------------
# reading a Split-Merge output

def read_info(folder: str | Path) -> dict:
    """``split_merge.json`` of a Split-Merge output, checked.

    >>> read_info("out/split")["coefficients"]  # doctest: +SKIP
    [0.61, -0.32, -0.29]
    """
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise PacerError(f"{folder}: no {INFO_FILE}; give the output folder of a "
                         "`method: split_merge` merge")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PacerError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("method", "split_merge") != "split_merge":
        raise PacerError(f"{path}: not a Split-Merge description (method must be split_merge)")
    for key in ("models", "coefficients", "eta"):
        if key not in info:
            raise PacerError(f"{path}: missing {key!r}; re-run the merge")
    labels, coefs = info["models"], info["coefficients"]
    if not isinstance(labels, list) or not isinstance(coefs, list) or len(labels) != len(coefs):
        raise PacerError(f"{path}: 'models' and 'coefficients' must be lists of the same "
                         "length; re-run the merge")
    if not all(isinstance(c, (int, float)) and math.isfinite(c) for c in coefs):
        raise PacerError(f"{path}: 'coefficients' must be finite numbers")
    return info


def load_eta(folder: str | Path, info: dict | None = None) -> Eta:
    """η by model tensor name: (flat indices, fp32 values) if sparse, (None, fp32 dense) if dense.

    >>> idx, values = load_eta("out/split")["model.layers.0.mlp.up_proj.weight"]  # doctest: +SKIP
    """
    info = read_info(folder) if info is None else info
    path = Path(folder) / info["eta"]
    if not path.is_file():
        raise PacerError(f"{path}: missing; the Split-Merge output is incomplete (re-run it)")
    eta: Eta = {}
    try:
        with safe_open(str(path), "pt") as f:
            fmt = (f.metadata() or {}).get("format")
            if fmt != ETA_FORMAT:
                raise PacerError(f"{path}: metadata format is {fmt!r}, not {ETA_FORMAT!r}; "
                                 "give the eta file of a Split-Merge output")
            keys = set(f.keys())
            for key in sorted(keys):
                if key.endswith("::indices"):
                    name = key[: -len("::indices")]
                    if name + "::values" not in keys:
                        raise PacerError(f"{path}: {key} has no matching {name}::values")
                    idx, values = f.get_tensor(key), f.get_tensor(name + "::values")
                    if idx.dtype != torch.int64 or idx.ndim != 1 or values.shape != idx.shape:
                        raise PacerError(f"{path}: {name}: indices must be I64 [nnz] and values "
                                         f"the same length (got {idx.dtype} {list(idx.shape)}, "
                                         f"{list(values.shape)})")
                    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                        raise PacerError(f"{path}: {name}::indices are not strictly ascending")
                    eta[name] = (idx, values.float())
                elif key.endswith("::values"):
                    if key[: -len("::values")] + "::indices" not in keys:
                        raise PacerError(f"{path}: {key} has no matching ::indices")
                elif "::" not in key:
                    eta[key] = (None, f.get_tensor(key).float())
    except PacerError:
        raise
    except Exception as exc:  # safetensors' own errors on a corrupt file
        raise PacerError(f"{path}: unreadable ({exc}); re-run the merge") from None
    return eta


def basename(label: str) -> str:
    """The last path part of a model label: ``/ckpt/math-ft/`` -> ``math-ft``."""
    return Path(str(label).rstrip("/")).name


def resolve_expert(labels: list[str], key: str | int, where: str = "expert") -> int:
    """Index of an expert given as an index, its label or its label's basename."""
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < len(labels):
            raise PacerError(f"{where} {key}: there are {len(labels)} experts (0.."
                             f"{len(labels) - 1})")
        return key
    key = str(key)
    if key in labels:
        return labels.index(key)
    hits = [i for i, label in enumerate(labels) if basename(label) == key]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise PacerError(f"{where} {key!r}: matches {len(hits)} models by basename; use the "
                         "full label or an index")
    if key.isdigit():
        return resolve_expert(labels, int(key), where)
    raise PacerError(f"{where} {key!r}: not one of the models "
                     f"{', '.join(map(str, labels))} (or their basenames, or an index)")


def match_experts(names: list[str], labels: list[str]) -> dict[str, int]:
    """Router expert name -> model index; every name must match one model and vice versa."""
    shown = (f"router experts [{', '.join(names)}] vs Split-Merge models "
             f"[{', '.join(map(str, labels))}]")
    out: dict[str, int] = {}
    for name in names:
        try:
            out[name] = resolve_expert(labels, name)
        except PacerError:
            raise PacerError(f"{shown}: {name!r} matches no model; name the router's experts "
                             "after the models' labels or basenames") from None
    if sorted(out.values()) != list(range(len(labels))):
        raise PacerError(f"{shown}: they must match one to one; name the router's experts "
                         "after the models' labels or basenames")
    return out


def combine(labels: list[str], coefficients: list[float],
            weights: dict[str | int, float]) -> float:
    """c = Σ_t α̂_t c_t; experts missing from ``weights`` count as 0.

    >>> combine(["/m/a", "/m/b"], [2.0, -1.0], {"a": 0.75, 1: 0.25})
    1.25
    """
    total, seen = 0.0, set()
    for key, w in weights.items():
        t = resolve_expert(labels, key)
        if t in seen:
            raise PacerError(f"expert {key!r} is given twice in the weights")
        seen.add(t)
        total += float(w) * float(coefficients[t])
    return total
