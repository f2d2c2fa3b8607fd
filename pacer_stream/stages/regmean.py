"""The RegMean stage: the closed-form merge of the linear layers PACER does not upcycle
(regmean_pass.py), block by block on the samples' activations.

The solutions are stored in the run state in the output dtype; the merge stage writes
them instead of merging those tensors.
"""

from __future__ import annotations

import torch

from ..io.header import DTYPES
from ..job import MergeContext
from ..regmean_pass import INPUT_OF_ROLE, RegMeanPass
from ..state import PassCheckpoint
from .merge import BITS_OF_SIZE, zarr_key


class RegMeanStage:
    name = "regmean"

    def run(self, ctx: MergeContext, runner) -> None:
        from ..runtime.blocks import BlockModel

        group = runner.state.group.require_group("regmean")
        solved = group.require_group("solved")
        ctx.regmean_solved = solved
        targets = regmean_targets(ctx)
        model = BlockModel.from_config(ctx.anchor.config, ctx.anchor.tensors.keys(),
                                       mlp_chunk=max(ctx.models.graph.dims.get("mlp", 1), 1))
        samples = [ctx.samples.of_model(k) for k in range(len(ctx.models.models))]

        def reader(k: int):
            def read(name: str) -> torch.Tensor:
                ctx.summary.read_bytes += ctx.anchor.tensors[name].nbytes
                return ctx.reads.read_model(k, name, None)
            return read

        out_dtype = {n: DTYPES[ctx.output.out[n].dtype][0]
                     for layer in targets.values() for n in layer}

        def store(name: str, w: torch.Tensor) -> None:
            data = w.to(out_dtype[name]).contiguous()
            bits = data.view(BITS_OF_SIZE[data.element_size()]).numpy()
            array = solved.create_array(zarr_key(name), shape=bits.shape, dtype=bits.dtype,
                                        chunks=bits.shape, overwrite=True)
            array[...] = bits

        stage = RegMeanPass(model, [reader(k) for k in range(len(ctx.models.models))], samples,
                            ctx.params.weights, targets, ctx.config.pacer["regmean_alpha"],
                            store, PassCheckpoint(group.require_group("pass")))
        with runner.progress(stage.last_layer + 1, "RegMean", unit="block") as bar:
            stage.run(on_layer=lambda: bar.update(1))
        ctx.regmean_names = {n for layer in targets.values() for n in layer}


def regmean_targets(ctx: MergeContext) -> dict[int, dict[str, str]]:
    """Per block, the linear weights RegMean solves and the input each reads (the MLP of
    an upcycled block becomes experts instead)."""
    layout = ctx.output.layout
    upcycled = set(layout.upcycled) if layout is not None else set()
    targets: dict[int, dict[str, str]] = {}
    for unit in ctx.models.graph.units:
        if unit.layer is None:
            continue
        for name in unit.tensors:
            role = ctx.models.graph.nodes[name].role
            info = ctx.anchor.tensors[name]
            if role not in INPUT_OF_ROLE or len(info.shape) != 2 or not info.is_float:
                continue
            if role.startswith("mlp.") and unit.layer in upcycled:
                continue
            targets.setdefault(unit.layer, {})[name] = INPUT_OF_ROLE[role]
    return targets
