"""``pacer-stream materialize``: one expert of a Split-Merge output as a dense checkpoint.

    pacer-stream materialize out/split --expert 1 --to out/expert-1
    pacer-stream materialize out/split --expert ft2 --to out/ft2
    pacer-stream materialize out/split --coefficient 0.5 --to out/half

writes μ + c·η (c = the expert's c_t, or the given coefficient) in μ's dtype and
architecture, one tensor at a time, with the same atomic shards as a merge.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PacerError
from .export.dense import copy_side_files, write_config
from .io.header import DTYPES
from .io.reader import CheckpointIndex
from .io.sources import LocalFolder
from .io.writer import OutTensor, ShardWriter, plan_shards
from .runtime.split_merge import load_eta, read_info, resolve_expert


def materialize(folder: Path, to: Path, expert: str | None = None,
                coefficient: float | None = None) -> float:
    """Write μ + c·η to ``to``; returns c."""
    folder, to = Path(folder), Path(to)
    info = read_info(folder)
    if (expert is None) == (coefficient is None):
        raise PacerError("materialize: give exactly one of --expert or --coefficient")
    if expert is not None:
        c = float(info["coefficients"][resolve_expert(info["models"], expert, "--expert")])
    else:
        c = float(coefficient)
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
