"""The merge stage: every unit's output tensors, written into their shard slots.

Per unit, each output recipe in order (a step): a dense tensor merged by the method
(dense_stage.py) or copied (passthrough, non-float), a RegMean solution from the run
state, every expert's copy of an upcycled MLP tensor (the mean of its cluster), a
router's rows, or zeros. The next source tensor may be read while this one is computed,
where the budget leaves room (TensorReads.may_read_ahead). A unit's shards are fsynced
before the runner marks it done.

The stage is stepped: pipeline.py runs the steps and the read-ahead, for either backend.
Units are independent: a Ray worker runs one with the products of the earlier stages it
is handed (:meth:`MergeStage.shared`).
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch
import zarr

from .. import accounting as acct
from .. import failpoints
from ..export.llamacpp import Place, TargetWriter
from ..export.moe import OutRecipe
from ..io.header import DTYPES
from ..io.writer import ShardWriter
from ..job import CALIBRATED_ROUTERS, MergeContext
from ..memory import peak_rss
from ..methods.upcycle import Decision, expert_means, router_rows
from ..pipeline import run_steps

ROUTER_ROLES = ("mlp.gate", "mlp.up")  # the router prototypes come from these
BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class MergeStage:
    name = "merge"
    failpoint = "unit-done"

    def label(self, ctx: MergeContext) -> str:
        return f"{ctx.config.method} merge"

    def units(self, ctx: MergeContext) -> list[str]:
        return [u.name for u in ctx.models.graph.units]

    def key(self, unit: str) -> str:
        return unit

    def writes(self, ctx: MergeContext, unit: str) -> set[str]:
        """The shard files the unit's tensors land in (llama.cpp's: where they are placed)."""
        shard_of = {t.name: s.file for s in ctx.shards for t in s.tensors}
        target = ctx.output.target
        names = [place.name for r in ctx.output.unit_recipes.get(unit, [])
                 for place in (target.places.get(r.name, (Place(r.name),)) if target
                               else (Place(r.name),))]
        return {shard_of[name] for name in names}

    def memory(self, ctx: MergeContext, unit: str) -> int:
        """Bytes one unit needs: the process, and its largest tensor's working set twice
        (the read-ahead of the next beside the current)."""
        need = max((ctx.reads.working_set(r) for r in ctx.output.unit_recipes[unit]), default=0)
        return acct.PROCESS_BASE_BYTES + min(2 * need, acct.usable(ctx.budget))

    # -- what a worker needs of the driver -------------------------------------------

    def shared(self, ctx: MergeContext) -> dict:
        return {"perms": ctx.reads.perms, "vocab_rows": ctx.vocab_rows,
                "decision": ctx.decision.to_json() if ctx.decision else None,
                "regmean": sorted(ctx.regmean_names)}

    def adopt(self, ctx: MergeContext, shared: dict) -> None:
        ctx.reads.perms, ctx.vocab_rows = shared["perms"], shared["vocab_rows"]
        if shared["decision"] is not None:
            ctx.set_decision(Decision.from_json(shared["decision"]))
        ctx.regmean_names = set(shared["regmean"])
        if ctx.regmean_names:
            ctx.regmean_solved = zarr.open_group(str(ctx.state_path / "regmean" / "solved"),
                                                 mode="r")

    # -- the units, a step (an output tensor) at a time (pipeline.py) --------------------

    def steps(self, ctx: MergeContext, unit: str) -> list[OutRecipe]:
        return ctx.output.unit_recipes.get(unit, [])

    def read_ahead(self, ctx: MergeContext, step: OutRecipe, current: OutRecipe | None):
        """The read of ``step``'s inputs, if it may run beside ``current``'s merge."""
        if step.kind != "source" or not ctx.reads.may_read_ahead(current, step.source):
            return None
        return partial(ctx.reads.read_whole, step.source)

    def begin(self, ctx: MergeContext) -> "UnitWriting":
        return UnitWriting(ctx)

    def run_unit(self, ctx: MergeContext, unit: str) -> dict:
        return dict(run_steps(self, ctx, [unit]))[unit]

    def skipped(self, ctx: MergeContext, units: list[str]) -> None:
        ctx.summary.units_skipped = units

    def reduce(self, ctx: MergeContext, unit: str, result: dict) -> dict:
        ctx.summary.units_done.append(unit)
        return {"attempt": ctx.attempt, **result}


class UnitWriting:
    """What a unit's steps write through: the shards (placed into llama.cpp's tensors for
    that target), with the unit's time and bytes read."""

    def __init__(self, ctx: MergeContext) -> None:
        self.ctx = ctx
        self.writer = ShardWriter(ctx.out_dir, ctx.shards)
        if ctx.output.target is not None:
            self.writer = TargetWriter(self.writer, ctx.output.target, ctx.output.out)
        self.start, self.read = time.perf_counter(), 0

    def step(self, recipe: OutRecipe, raw: list[torch.Tensor] | None) -> None:
        self.read += write_recipe(self.ctx, recipe, raw, self.writer)
        failpoints.hit("tensor-written")

    def unit_done(self, unit: str) -> dict:
        """The unit's shards fsynced (before the runner marks it done); what it did."""
        self.writer.sync()
        done = {"seconds": round(time.perf_counter() - self.start, 4), "read_bytes": self.read,
                "rss_bytes": peak_rss(), "tensors": len(self.ctx.output.unit_recipes[unit])}
        self.start, self.read = time.perf_counter(), 0
        return done

    def close(self) -> None:
        self.writer.close()


def write_recipe(ctx: MergeContext, recipe: OutRecipe, raw: list[torch.Tensor] | None,
                 writer: ShardWriter) -> int:
    """Produce one output tensor (experts: all of a source's at once); bytes read."""
    if recipe.kind == "source":
        return merge_tensor(ctx, recipe.source, raw, writer)
    if recipe.kind == "expert":
        return write_experts(ctx, recipe, writer) if recipe.expert == 0 else 0
    dtype = DTYPES[recipe.dtype][0]
    if recipe.kind == "router":
        if ctx.router_kind in CALIBRATED_ROUTERS:
            return 0  # written by the calibration stage, once the blocks are
        sums = ctx.prototypes.pop(recipe.layer)
        writer.write(recipe.name, router_rows(sums, ctx.config.pacer["router_temperature"])
                     .to(dtype))
    elif recipe.kind == "zeros":
        writer.write(recipe.name, torch.zeros(recipe.shape, dtype=dtype))
    else:
        raise AssertionError(f"unknown output recipe {recipe.kind!r}")
    return 0


def merge_tensor(ctx: MergeContext, name: str, raw: list[torch.Tensor] | None,
                 writer: ShardWriter) -> int:
    """Merge one tensor into the writer; returns the bytes read."""
    info = ctx.anchor.tensors[name]
    if name in ctx.models.graph.passthrough or not info.is_float:
        copies = raw if raw is not None else ctx.reads.read(name, (0, info.shape[0]))
        ctx.reads.check_equal(name, copies)
        read = sum(c.numel() * c.element_size() for c in copies)
        ctx.summary.read_bytes += read
        writer.write(name, copies[0])
        return read
    if name in ctx.regmean_names:
        bits = torch.from_numpy(np.array(ctx.regmean_solved[zarr_key(name)][...]))
        writer.write(name, bits.view(DTYPES[ctx.output.out[name].dtype][0]))
        return 0
    read = ctx.dense.merge_tensor(name, raw, writer, ctx.output.out[name].dtype,
                                  ctx.vocab_rows.get(name))
    ctx.summary.read_bytes += read
    return read


def write_experts(ctx: MergeContext, recipe: OutRecipe, writer: ShardWriter) -> int:
    """Every expert's copy of one MLP tensor: the mean of its cluster's aligned copies."""
    source, layer = recipe.source, recipe.layer
    labels, m = ctx.decision.clusters[layer], ctx.decision.num_experts
    info = ctx.anchor.tensors[source]
    names = ctx.output.expert_names[source]
    dtype = DTYPES[ctx.output.out[names[0]].dtype][0]
    sums = None
    if ctx.router_kind == "abs_deviation" and \
            ctx.models.graph.nodes[source].role in ROUTER_ROLES:  # Σ_rows |E_m − θ_c|
        sums = ctx.prototypes.setdefault(
            layer, torch.zeros(m, info.shape[1], dtype=torch.float64))
    read = 0
    for rows in ctx.reads.ranges(source, work=ctx.reads.expert_work(source)):
        x, _ = ctx.reads.load(source, rows, check=True)
        read += ctx.reads.nbytes(source, rows)
        means = expert_means(x, labels, m)
        if sums is not None:
            consensus = x.mean(0)
            for e, mean in enumerate(means):
                sums[e] += (mean - consensus).abs().sum(0, dtype=torch.float64).cpu()
        for e, mean in enumerate(means):
            writer.write(names[e], mean.to(dtype).cpu().reshape(rows[1] - rows[0],
                                                                *info.shape[1:]),
                         first_row=rows[0])
    ctx.summary.read_bytes += read
    return read


def zarr_key(name: str) -> str:
    """A tensor name as one zarr array name (no path separators)."""
    return name.replace("/", "%2F")
