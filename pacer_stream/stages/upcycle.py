"""The upcycle stage: which MLP blocks become experts (methods/upcycle.py), decided once.

From the consensus statistics, by the plan's policy and the export's growth; the
decision is kept in the run state, so a resumed run (and every worker) keeps the
output layout the first attempt chose.
"""

from __future__ import annotations

from ..job import MergeContext
from ..methods.upcycle import Decision, UpcyclePolicy, decide
from ..output_layout import growth


class UpcycleStage:
    name = "upcycle"

    def run(self, ctx: MergeContext, runner) -> None:
        attrs = runner.state.group.attrs
        if "decision" in attrs:
            ctx.set_decision(Decision.from_json(attrs["decision"]))
            return
        mlp = {layer: parts["mlp"] for layer, parts in ctx.stats.items() if "mlp" in parts}
        decision = decide(mlp, UpcyclePolicy.from_pacer(ctx.config.pacer),
                          lambda blocks, experts: growth(ctx, blocks, experts))
        if decision.upcycles and ctx.moe_type is None:
            decision.note = (f"{ctx.models.spec.family} MoE export is not supported yet; "
                             f"blocks {decision.blocks} were merged dense")
        elif decision.upcycles and not ctx.can_route():
            decision.note = (f"blocks {decision.blocks} were merged dense: experts need a "
                             "router that routes; give pacer.router_samples (a file of "
                             "sample lines per model), or set router: data_free (on "
                             "benchmarks/quality it routed no better than chance)")
        attrs["decision"] = decision.to_json()
        ctx.set_decision(decision)
