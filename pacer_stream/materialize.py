"""``pacer-stream materialize``: one expert of a Split-Merge output as a dense checkpoint.

    pacer-stream materialize out/split --expert 1 --to out/expert-1
    pacer-stream materialize out/split --expert ft2 --to out/ft2
    pacer-stream materialize out/split --coefficient 0.5 --to out/half

writes μ + c·η (c = the expert's c_t, or the given coefficient) in μ's dtype and
architecture, one tensor at a time, with the same atomic shards as a merge. Every
refusal (a non-finite c or η, a target inside the split output) comes before the
target folder is created; config.json is written last.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from .errors import PacerError
from .export.dense import copy_side_files, write_config
from .io.reader import CheckpointIndex
from .io.sources import LocalFolder
from .preflight import overlap
from .io.writer import OutTensor, Shard, ShardWriter, plan_shards
from .runtime.split_output import Eta, load_eta, read_info, resolve_expert


def materialize(folder: Path, to: Path, expert: str | None = None,
                coefficient: float | None = None) -> float:
    """Write μ + c·η to ``to``; returns c."""
    folder, to = Path(folder), Path(to)
    if (expert is None) == (coefficient is None):
        raise PacerError("materialize: give exactly one of --expert or --coefficient")
    if coefficient is not None and not math.isfinite(float(coefficient)):
        raise PacerError(f"--coefficient {coefficient}: must be a finite number (not nan or "
                         "inf); μ + c·η would be NaN or Inf")
    info = read_info(folder)  # refuses non-finite c_t
    if not (folder / "config.json").is_file():  # the merge writes it last
        raise PacerError(f"{folder}: the Split-Merge run is not finished (no config.json yet); "
                         "re-run the same merge command to complete it")
    check_target(folder, to)
    if expert is not None:
        c = float(info["coefficients"][resolve_expert(info["models"], expert, "--expert")])
    else:
        c = float(coefficient)
    mu = CheckpointIndex.open(LocalFolder(folder))
    eta = load_eta(folder, info)
    check_finite_eta(folder / info["eta"], eta)
    order = list(mu.tensors)
    shards = plan_shards([OutTensor(t, mu.tensors[t].dtype, tuple(mu.tensors[t].shape))
                          for t in order], 5 * 10**9)
    created = not to.exists()
    to.mkdir(parents=True, exist_ok=True)
    try:
        write_expert(mu, eta, c, to, shards)
    except PacerError:
        discard(to, shards, created)  # a refused result leaves nothing behind
        raise
    return c


def check_target(folder: Path, to: Path) -> None:
    """``--to`` must be a new or empty folder apart from the split output."""
    if overlap(to.resolve(), folder.resolve()) is not None:
        raise PacerError(f"--to {to}: is, contains or lies inside the split output {folder}; "
                         "choose a folder outside it")
    if to.exists() and not to.is_dir():
        raise PacerError(f"--to {to}: exists and is not a folder; choose another")
    if to.exists() and any(to.iterdir()):
        raise PacerError(f"--to {to}: folder exists and is not empty; choose another")


def check_finite_eta(path: Path, eta: Eta) -> None:
    for name, (_, values) in eta.items():
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise PacerError(f"{path}: η of {name} holds NaN or Inf; the Split-Merge output is "
                             "damaged, re-run the merge")


def write_expert(mu: CheckpointIndex, eta: Eta, c: float, to: Path, shards: list[Shard]) -> None:
    """μ + c·η tensor by tensor into ``shards``; the model files, config.json last."""
    writer = ShardWriter(to, shards)
    try:
        for name in mu.tensors:
            writer.write(name, shifted(name, mu.read(name), eta, c))
        writer.sync()
        writer.finish_all()
    finally:
        writer.close()
    writer.write_index()
    copy_side_files(to, mu)
    write_config(to, mu.config, None)


def shifted(name: str, tensor: torch.Tensor, eta: Eta, c: float) -> torch.Tensor:
    """μ's tensor plus c·η (same op order as SplitMergeModel.specialize), in μ's dtype."""
    if name not in eta:
        return tensor
    indices, values = eta[name]
    flat = tensor.float().reshape(-1).clone()
    if indices is None:
        flat += c * values.reshape(-1)
    else:
        flat[indices] += c * values
    out = flat.to(tensor.dtype).reshape(tensor.shape)
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(tensor).all()):
        raise PacerError(f"c = {c:.6g}: μ + c·η overflows {tensor.dtype} in {name}; use a "
                         "smaller coefficient")
    return out


def discard(to: Path, shards: list[Shard], created: bool) -> None:
    """Remove what a refused materialize wrote: its shards, or the folder it created."""
    if created:
        shutil.rmtree(to, ignore_errors=True)
        return
    for shard in shards:
        for name in (shard.partial, shard.file):
            (to / name).unlink(missing_ok=True)
