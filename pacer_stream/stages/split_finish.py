"""The finish of a Split-Merge, once every pass is done (η and split_merge.json are in
place): μ's shards renamed and checked, η checked, the index, side files, the plan as
run, the model card, config.json last. Each step can be repeated, so a run killed in
the middle resumes here.
"""

from __future__ import annotations

import json

from .. import failpoints
from ..export.dense import write_config
from ..io.writer import verify_shards
from ..job import MergeContext
from ..methods.split_merge import INFO_FILE
from ..report import describe_output
from .split_passes import split_run


class SplitFinishStage:
    name = "split finish"

    def run(self, ctx: MergeContext, runner) -> None:
        run = split_run(ctx, runner.state)
        run.mu_writer.finish_all()
        run.mu_writer.close()
        eta_shards = run.eta.shards  # laid out from the saved record
        verify_shards(ctx.out_dir, eta_shards)
        failpoints.hit("split-finish")
        run.mu_writer.write_index()
        describe_output(ctx, ctx.anchor.config)
        write_config(ctx.out_dir, ctx.anchor.config, ctx.out_dtype)
        ctx.summary.write_bytes = sum(s.size for s in (*ctx.shards, *eta_shards))
        info = json.loads((ctx.out_dir / INFO_FILE).read_text())  # written by the eta pass
        ctx.method_report = {"split_merge": {key: info[key]
                                             for key in ("k", "coefficients", "memory")}}
