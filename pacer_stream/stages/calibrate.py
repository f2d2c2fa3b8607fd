"""The calibrate stage: every upcycled block's gate rows, fitted on the samples
(calibration.py), once the merge has written the blocks it runs through.
"""

from __future__ import annotations

import torch

from .. import accounting as acct
from ..calibration import RouterCalibration, SampleSet
from ..export.llamacpp import TargetWriter
from ..io.header import DTYPES
from ..io.writer import ShardWriter
from ..job import MergeContext
from ..output_layout import output_config
from ..self_samples import measured_on
from ..state import PassCheckpoint


class CalibrateStage:
    name = "calibrate"

    def run(self, ctx: MergeContext, runner) -> None:
        from ..runtime.blocks import BlockModel  # only upcycled runs need the forward pass

        writer = ShardWriter(ctx.out_dir, ctx.shards)
        if ctx.output.target is not None:
            writer = TargetWriter(writer, ctx.output.target, ctx.output.out)
        model = BlockModel.from_config(output_config(ctx, logical=True))
        routers = {r.layer: r for r in ctx.output.recipes if r.kind == "router"}

        def write_router(layer: int, rows: torch.Tensor) -> torch.Tensor:
            recipe = routers[layer]
            data = rows.to(DTYPES[recipe.dtype][0]).reshape(recipe.shape)
            writer.write(recipe.name, data)
            writer.sync()
            return data.float()

        samples = router_samples(ctx)
        stage = RouterCalibration(model, writer.read, write_router, samples,
                                  ctx.decision.clusters, ctx.decision.num_experts,
                                  ctx.config.pacer["router_temperature"],
                                  PassCheckpoint(runner.state.group.require_group("calibration")),
                                  max(acct.usable(ctx.budget) // 2, 1 << 26))
        with runner.progress(stage.last_layer + 1, "router calibration", unit="block") as bar:
            layers = stage.run(on_layer=lambda: bar.update(1))
        writer.close()
        ctx.router_report = {
            "kind": ctx.router_kind, "layers": layers, "note": samples.note,
            "sequences": {"fit": int(samples.fit.sum()), "held_out": int(samples.held_out.sum())}}
        runner.state.group.attrs["router_report"] = ctx.router_report


def router_samples(ctx: MergeContext) -> SampleSet:
    """The sequences of calibration.py: the sample lines, or the generated samples (the
    sample lines, when given too, only measure the data-free gate)."""
    if ctx.router_kind == "few_shot":
        return ctx.real_samples
    if ctx.real_samples is not None:
        return measured_on(ctx.samples, ctx.real_samples)
    return ctx.samples
