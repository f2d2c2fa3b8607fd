"""Scores: bits per byte (text), accuracy (images), retention, and parameter counts.

Retention of a merge on a domain is the share of its expert's gain over the base that the
merge keeps:

    retention = (score_base - score_merge) / (score_base - score_expert)     (bpb: lower is better)

1.0 keeps the whole gain, 0.0 is no better than the base, below 0 is worse than the base. The
same formula serves accuracy (higher is better): numerator and denominator both flip sign.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

from bytetok import BOS, encode


def bits_per_byte_from_nll(total_nats: float, total_bytes: int) -> float:
    """Summed negative log-likelihood (natural log) over bytes -> bits per byte."""
    return total_nats / math.log(2) / total_bytes


def pad_lines(lines: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + bytes of each line, right-padded: (token ids, mask of real tokens), [B, T] each.

    Right padding is invisible to the real tokens under causal attention.
    """
    ids = [[BOS] + encode(line) for line in lines]
    width = max(map(len, ids))
    tokens = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return tokens, mask


@torch.no_grad()
def line_nats(model: torch.nn.Module, lines: list[str], batch: int = 64) -> list[float]:
    """Per line: -ln p(bytes | BOS) summed over its bytes (each predicted from those before)."""
    out: list[float] = []
    for start in range(0, len(lines), batch):
        tokens, mask = pad_lines(lines[start:start + batch])
        logits = model(input_ids=tokens, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = tokens[:, 1:]
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
        out.extend(nll.sum(1).tolist())
    return out


def bits_per_byte(model: torch.nn.Module, lines: list[str]) -> float:
    """Held-out bits per byte of ``lines`` (all bytes of all lines pooled)."""
    nats = sum(line_nats(model, lines))
    return bits_per_byte_from_nll(nats, sum(len(encode(line)) for line in lines))


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    preds = [model(pixel_values=torch.from_numpy(x[i:i + batch])).logits.argmax(-1).numpy()
             for i in range(0, len(x), batch)]
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x) == y).mean())


def retention(base: float, merge: float, expert: float) -> float:
    """(base - merge) / (base - expert); NaN when the expert is no different from the base."""
    gain = base - expert
    if not all(map(math.isfinite, (base, merge, expert))) or abs(gain) < 1e-12:
        return float("nan")
    return (base - merge) / gain


def mean(values: list[float]) -> float:
    """The plain mean; NaN if any value is NaN (a missing domain is not silently skipped)."""
    return float(sum(values) / len(values)) if values else float("nan")


def checkpoint_params(folder: Path) -> int:
    """Elements in every tensor of a folder's safetensors files, from their headers only."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total
