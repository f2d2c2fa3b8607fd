"""``pacer-stream materialize``: one expert of a Split-Merge output as a dense checkpoint.

    pacer-stream materialize out/split --expert 1 --to out/expert-1
    pacer-stream materialize out/split --expert ft2 --to out/ft2
    pacer-stream materialize out/split --coefficient 0.5 --to out/half

writes μ + c·η (c = the expert's c_t, or the given coefficient) in μ's dtype and
architecture, one tensor at a time, with the same atomic shards as a merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import PacerError
from .export.dense import copy_side_files, write_config
from .io.header import DTYPES
from .io.reader import CheckpointIndex
from .io.sources import LocalFolder
from .io.writer import OutTensor, ShardWriter, plan_shards
from .methods.split_merge import INFO_FILE


def split_info(folder: Path) -> dict:
    """The ``split_merge.json`` of a Split-Merge output, checked."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise PacerError(f"{folder}: no {INFO_FILE}; is this the output of method split_merge?")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PacerError(f"{path}: not valid JSON ({exc.msg})") from None
    for key in ("models", "coefficients", "eta"):
        if key not in info:
            raise PacerError(f"{path}: missing {key!r}")
    return info


def expert_coefficient(info: dict, expert: str) -> float:
    """c_t of an expert given by index, label or the label's last path part."""
    labels = info["models"]
    if expert.isdigit():
        index = int(expert)
        if index >= len(labels):
            raise PacerError(f"--expert {expert}: there are {len(labels)} experts (0.."
                             f"{len(labels) - 1})")
        return float(info["coefficients"][index])
    for index, label in enumerate(labels):
        if expert in (label, Path(label.rstrip("/")).name):
            return float(info["coefficients"][index])
    raise PacerError(f"--expert {expert!r}: not one of {', '.join(labels)} (or give an index)")


def load_eta(folder: Path, info: dict) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """η by tensor name: (flat indices, values) for sparse entries, (None, dense) otherwise."""
    path = Path(folder) / info["eta"]
    if not path.is_file():
        raise PacerError(f"{path}: missing; the Split-Merge output is incomplete (re-run it)")
    eta: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        for name in names:
            if name.endswith("::values"):
                base = name[: -len("::values")]
                eta[base] = (f.get_tensor(base + "::indices"), f.get_tensor(name))
            elif "::" not in name:
                eta[name] = (None, f.get_tensor(name))
    return eta


def materialize(folder: Path, to: Path, expert: str | None = None,
                coefficient: float | None = None) -> float:
    """Write μ + c·η to ``to``; returns c."""
    folder, to = Path(folder), Path(to)
    info = split_info(folder)
    if (expert is None) == (coefficient is None):
        raise PacerError("materialize: give exactly one of --expert or --coefficient")
    c = expert_coefficient(info, expert) if expert is not None else float(coefficient)
    if to.exists() and any(to.iterdir()):
        raise PacerError(f"--to {to}: folder exists and is not empty; choose another")
    mu = CheckpointIndex.open(LocalFolder(folder))
    eta = load_eta(folder, info)
    order = list(mu.tensors)
    shards = plan_shards([OutTensor(t, mu.tensors[t].dtype, tuple(mu.tensors[t].shape))
                          for t in order], 5 * 10**9)
    to.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(to, shards)
    for name in order:
        tensor = mu.read(name)
        if name in eta:
            indices, values = eta[name]
            flat = tensor.float().reshape(-1).clone()
            if indices is None:
                flat += c * values.reshape(-1)
            else:
                flat[indices] += c * values
            tensor = flat.to(DTYPES[mu.tensors[name].dtype][0]).reshape(tensor.shape)
        writer.write(name, tensor)
    writer.sync()
    for shard in shards:
        writer.finish(shard)
    writer.close()
    writer.write_index()
    write_config(to, mu.config, None)
    copy_side_files(to, mu)
    return c
