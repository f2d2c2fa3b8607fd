"""The finish stage: the merged checkpoint made whole, in an order that never shows a
finished-looking folder early.

Once every unit is done: shards renamed and checked against their headers, the index,
the ViT-MoE modeling code, the tokenizer files, the plan as run and the model card,
config.json last (a folder with a config.json is a finished model), then the report.
Each step can be repeated, so a run killed in the middle resumes here.
"""

from __future__ import annotations

from ..export.dense import write_config
from ..export.vit_moe import VitMoeLayout, write_modeling
from ..io.writer import ShardWriter
from ..job import MergeContext
from ..output_layout import output_config
from ..report import describe_output, pacer_report


class FinishStage:
    name = "finish"

    def run(self, ctx: MergeContext, runner) -> None:
        writer = ShardWriter(ctx.out_dir, ctx.shards)
        writer.finish_all()
        writer.write_index()
        config = output_config(ctx)
        if isinstance(ctx.output.layout, VitMoeLayout):
            write_modeling(ctx.out_dir)
        describe_output(ctx, config, pacer_report(ctx))
        write_config(ctx.out_dir, config, ctx.out_dtype)
        ctx.summary.write_bytes = sum(s.size for s in ctx.shards)
