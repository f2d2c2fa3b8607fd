"""The align stage: every peer's permutations onto the anchor (align/stage.py), resumable.

Each sweep maps the units (their local groups solved, their share of the residual cost)
and reduces the residual costs into one assignment per peer; the runner's backend runs
the map, here or one task a unit on a cluster. The permutations go to TensorReads, so
every later stage reads the peers re-based.
"""

from __future__ import annotations

import time

import torch

from .. import accounting as acct
from ..graph import GLOBAL
from ..job import MergeContext


class AlignStage:
    name = "align"

    def run(self, ctx: MergeContext, runner) -> None:
        from ..align.stage import AlignStage as Sweeps  # scipy's solvers cost a merge 40 MB RSS

        started = time.perf_counter()
        state = runner.state
        anchor = anchor_index(ctx, state)
        labels = [m.label for m in ctx.inputs]
        with runner.progress(None, "align") as bar:
            sweeps = Sweeps(ctx.models.graph, labels, anchor, reader(ctx),
                            state.group.require_group("align"), ctx.budget, ctx.config.seed,
                            ctx.config.pacer["max_sweeps"], on_unit=lambda: bar.update(1),
                            map_units=lambda sweep, units: runner.backend.map_calls(
                                sweep_share, ctx, units, sweep, sweep_memory(ctx, sweep, units),
                                "align"))
            ctx.reads.perms = sweeps.run()
        ctx.align_report = {"anchor": labels[anchor], "peers_per_pass": sweeps.chunk_size,
                            "seconds_this_run": round(time.perf_counter() - started, 3),
                            "peers": sweeps.report()}
        ctx.summary.align = ctx.align_report


def sweep_share(ctx: MergeContext, sweep, unit: str):
    """One unit's share of a sweep (align/stage.py), in any process."""
    from ..align.stage import unit_shares

    return unit_shares(ctx.models.graph, reader(ctx), sweep, unit)


def sweep_memory(ctx: MergeContext, sweep, units: list[str]) -> int:
    """What one unit's share needs: the process, the unit's working set and one residual
    accumulator per moving peer (the accounting the sweeps' peer chunks obey)."""
    graph = ctx.models.graph
    d = graph.groups[GLOBAL].size
    return acct.PROCESS_BASE_BYTES + max(
        (acct.align_bytes(acct.align_unit_need(graph, u), d, len(sweep.perms))
         for u in graph.units if u.name in units), default=0)


def reader(ctx: MergeContext):
    """(input, tensor) -> the tensor on the compute device, in its own dtype."""
    def read(k: int, name: str) -> torch.Tensor:
        return ctx.inputs[k].read(name).to(ctx.device)
    return read


def anchor_index(ctx: MergeContext, state) -> int:
    """``anchor_strategy``: first, lowest_magnitude (mean |w|, kept in the state) or a model."""
    strategy = ctx.config.pacer["anchor_strategy"]
    refs = [e.ref for e in ctx.config.models] + (
        [ctx.config.base_model] if ctx.config.base_model is not None else [])
    if strategy == "first":
        return 0
    if strategy != "lowest_magnitude":
        return next(k for k, ref in enumerate(refs) if ref is strategy)
    if "anchor" not in state.group.attrs:
        means = [mean_magnitude(ctx, k) for k in range(len(ctx.inputs))]
        state.group.attrs["anchor"] = min(range(len(means)), key=means.__getitem__)
    return int(state.group.attrs["anchor"])


def mean_magnitude(ctx: MergeContext, k: int) -> float:
    total, count = 0.0, 0
    read = reader(ctx)
    for name, node in ctx.models.graph.nodes.items():
        if node.info.is_float:
            total += float(read(k, name).abs().sum(dtype=torch.float64))
            count += node.info.numel
    return total / max(count, 1)
