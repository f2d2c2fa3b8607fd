"""The consensus stage: every block's MLP and attention statistics (methods/consensus.py).

One unit per block: the consensus sums of its parts, read through TensorReads (re-based
onto the anchor once aligned), kept in the run state with the unit's record. Blocks are
independent; the upcycling decision (upcycle.py) reads them all.
"""

from __future__ import annotations

from .. import accounting as acct
from ..job import MergeContext
from ..methods.consensus import PartStats, part_of


class ConsensusStage:
    name = "consensus"
    failpoint = "stats-unit"
    unit_label = "block"

    def label(self, ctx: MergeContext) -> str:
        return "consensus"

    def units(self, ctx: MergeContext) -> list[str]:
        return [u.name for u in ctx.models.graph.units if u.kind == "block"]

    def key(self, unit: str) -> str:
        return f"consensus/{unit}"

    def memory(self, ctx: MergeContext, unit: str) -> int:
        return acct.PROCESS_BASE_BYTES + acct.usable(ctx.budget) // 2

    def shared(self, ctx: MergeContext) -> dict:
        return {"perms": ctx.reads.perms}

    def adopt(self, ctx: MergeContext, shared: dict) -> None:
        ctx.reads.perms = shared["perms"]

    def run_unit(self, ctx: MergeContext, unit: str) -> dict:
        graph = ctx.models.graph
        n = len(ctx.models.models)
        parts: dict[str, PartStats] = {}
        for name in next(u for u in graph.units if u.name == unit).tensors:
            node = graph.nodes[name]
            part = part_of(node.role)
            if part is None or not node.info.is_float:
                continue
            stats = parts.setdefault(part, PartStats(n))
            work = acct.stats_work(n, ctx.models.base is not None,
                                   ctx.models.widest_itemsize(name), bool(ctx.config.align))
            for rows in ctx.reads.ranges(name, work=work):
                stats.add(*ctx.reads.load(name, rows, check=True))
                ctx.summary.read_bytes += ctx.reads.nbytes(name, rows)
        return {part: st.to_json() for part, st in parts.items()}

    def reduce(self, ctx: MergeContext, unit: str, result: dict) -> dict:
        return result

    def finish(self, ctx: MergeContext, state) -> None:
        ctx.stats = block_stats(ctx, state)


def block_stats(ctx: MergeContext, state) -> dict[int, dict[str, PartStats]]:
    """The statistics the run state holds, by layer and part."""
    return {u.layer: {part: PartStats.from_json(data)
                      for part, data in state.units[f"consensus/{u.name}"].items()}
            for u in ctx.models.graph.units if u.kind == "block"}
