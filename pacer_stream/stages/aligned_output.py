"""``align: only``: every peer re-based onto the anchor, as its own checkpoint.

All peers' tensors are written first, a (peer, unit) at a time; the folders are
finished (shards renamed, index, side files, config.json last) only when every peer is
done, so no folder looks like a finished checkpoint while the run is not.
"""

from __future__ import annotations

from .. import failpoints
from ..export.dense import copy_side_files, write_config
from ..io.writer import OutTensor, ShardWriter, plan_shards
from ..job import MergeContext


class AlignedOutputStage:
    name = "aligned output"

    def run(self, ctx: MergeContext, runner) -> None:
        state, graph = runner.state, ctx.models.graph
        outputs = []  # (peer, folder, writer, shards)
        with runner.progress(len(ctx.reads.perms) * len(graph.units), "write aligned") as bar:
            for k in sorted(ctx.reads.perms):
                index = ctx.inputs[k]
                folder = ctx.out_dir / aligned_folder(k, index.label)
                folder.mkdir(parents=True, exist_ok=True)
                shards = plan_shards([OutTensor(t, index.tensors[t].dtype, index.tensors[t].shape)
                                      for t in ctx.order], ctx.shard_size)
                writer = ShardWriter(folder, shards)
                outputs.append((k, folder, writer, shards))
                for unit in graph.units:
                    key = f"aligned/{k}/{unit.name}"
                    if not state.is_done(key):
                        for name in (*unit.tensors, *unit.passthrough):
                            writer.write(name, ctx.reads.read_model(k, name, None))
                        writer.sync()
                        state.mark_done(key, {"peer": index.label})
                        ctx.summary.units_done.append(key)
                        failpoints.hit("aligned-unit")
                    bar.update(1)
                writer.close()
        for k, folder, writer, shards in outputs:
            writer.finish_all()
            writer.write_index()
            copy_side_files(folder, ctx.inputs[k])
            write_config(folder, ctx.inputs[k].config, None)
        ctx.summary.write_bytes = sum(s.size for *_, shards in outputs for s in shards)


def aligned_folder(k: int, label: str) -> str:
    """Sub-folder of ``align: only`` output for input ``k``: its position and a safe name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label.rstrip("/").split("/")[-1])
    return f"{k}-{safe}"
