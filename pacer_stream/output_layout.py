"""The output's tensors and shards: what the merge writes, to which unit each belongs.

Dense, or the MoE form once an upcycling decision makes experts (the ViT-MoE or
qwen*_moe export layouts of export/, placed into llama.cpp's own tensors for
``output.target: llama.cpp``). The layout is a pure function of the plan, the inputs'
headers and the decision, so every process of a run (a resumed one, a Ray worker)
computes the same one.

Shards follow one of two layouts: ``size`` packs tensors in unit order up to the shard
size (a shard may hold the end of one unit and the start of the next); ``unit`` gives
each unit shards of its own, so units written at once never share a file (the Ray
backend's layout, selectable locally with ``--shard-layout unit`` to get the same bytes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .export.llamacpp import LLAMACPP, Place, TargetLayout, llamacpp_target
from .export.moe import MoeLayout, OutRecipe, moe_config, moe_parameter_count, moe_recipes
from .export.vit_moe import VitMoeLayout, vit_moe_config, vit_moe_recipes
from .io.writer import OutTensor, Shard, plan_shards, plan_unit_shards
from .methods.upcycle import Decision
from .tensor_reads import out_dtype_of

if TYPE_CHECKING:
    from .job import MergeContext

VIT_MOE = "vit_moe"  # ViT has no stock MoE class: custom modeling code in the output
SHARD_LAYOUTS = ("size", "unit")


@dataclass
class OutputLayout:
    layout: MoeLayout | VitMoeLayout | None  # None: the dense output
    target: TargetLayout | None  # llama.cpp's tensors, when that is the target
    recipes: list[OutRecipe]  # every output tensor, sorted by unit
    unit_recipes: dict[str, list[OutRecipe]]
    expert_names: dict[str, list[str]]  # source MLP tensor -> its experts' names
    out: dict[str, OutTensor]  # the tensors the merge produces (before any target placing)
    shards: list[Shard]


def output_layout(ctx: "MergeContext", decision: Decision | None) -> OutputLayout:
    """The output tensors (dense, or MoE once ``decision`` upcycles) and their shards."""
    layout, target = None, None
    shapes = source_shapes(ctx)
    if decision is not None and decision.upcycles and ctx.moe_type is not None \
            and ctx.can_route():
        layout, recipes, target = moe_layout(ctx, decision.blocks, decision.num_experts,
                                             decision.top_k, shapes)
    else:
        recipes = [OutRecipe(t, dtype, shape, "source", t) for t, (dtype, shape) in shapes.items()]
    rank = {u.name: i for i, u in enumerate(ctx.models.graph.units)}
    unit = {r.name: recipe_unit(ctx, r) for r in recipes}
    recipes = sorted(recipes, key=lambda r: rank[unit[r.name]])  # stable: keeps order
    unit_recipes: dict[str, list[OutRecipe]] = {}
    for r in recipes:
        unit_recipes.setdefault(unit[r.name], []).append(r)
    expert_names: dict[str, list[str]] = {}
    for r in recipes:
        if r.kind == "expert":
            names = expert_names.setdefault(r.source, [""] * decision.num_experts)
            names[r.expert] = r.name
    out = {r.name: OutTensor(r.name, r.dtype, tuple(r.shape)) for r in recipes}
    written = [(unit[r.name], out[r.name]) for r in recipes] if target is None \
        else _in_unit_order(target, recipes, unit)
    shards = _shards(written, ctx.shard_size, ctx.shard_layout)
    return OutputLayout(layout, target, recipes, unit_recipes, expert_names, out, shards)


def _shards(written: list[tuple[str, OutTensor]], shard_size: int, kind: str) -> list[Shard]:
    if kind == "size":
        return plan_shards([t for _, t in written], shard_size)
    by_unit: dict[str, list[OutTensor]] = {}
    for unit, t in written:
        by_unit.setdefault(unit, []).append(t)
    return plan_unit_shards(list(by_unit.values()), shard_size)


def source_shapes(ctx: "MergeContext") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every input tensor's output (dtype, shape), in the anchor's order."""
    return {t: (out_dtype_of(ctx.anchor.tensors[t].dtype, ctx.out_dtype),
                tuple(ctx.anchor.tensors[t].shape)) for t in ctx.order}


def moe_layout(ctx: "MergeContext", blocks: list[int], experts: int, top_k: int,
               shapes: dict[str, tuple[str, tuple[int, ...]]]):
    """The export layout, its output recipes and, for ``output.target: llama.cpp``,
    where they land (export/llamacpp.py): ViT-MoE (custom code) or qwen*_moe."""
    layers = ctx.models.graph.dims["layers"]
    if ctx.moe_type == VIT_MOE:
        layout = VitMoeLayout(layers, tuple(blocks), experts, top_k, ctx.config.pacer["tome_r"])
        return layout, vit_moe_recipes(layout, shapes), None
    layout = MoeLayout(ctx.models.spec.family, layers, tuple(blocks), experts, top_k)
    recipes = moe_recipes(layout, shapes)
    if ctx.config.output.target != LLAMACPP:
        return layout, recipes, None
    target = llamacpp_target(layout, recipes, ctx.anchor.config)
    return layout, target.recipes, target


def recipe_unit(ctx: "MergeContext", recipe: OutRecipe) -> str:
    if recipe.source in ctx.unit_of:
        return ctx.unit_of[recipe.source]
    if recipe.layer is not None:
        return f"block.{recipe.layer}"
    found = re.search(r"\.layers\.(\d+)\.", recipe.name)
    if found is None:
        raise AssertionError(f"output tensor {recipe.name!r} belongs to no unit")
    return f"block.{found.group(1)}"


def growth(ctx: "MergeContext", blocks: list[int], experts: int) -> float:
    """Output parameters over the source's if ``blocks`` got ``experts`` experts each."""
    if experts < 2:  # one cluster: nothing would be upcycled
        return 1.0
    if ctx.moe_type is None:  # no export layout: whole MLP copies plus the router
        extra = sum(ctx.mlp_params(b) * (experts - 1) + experts * ctx.models.graph.dims[
            "residual"] for b in blocks)
        return (ctx.source_params + extra) / ctx.source_params
    _, recipes, target = moe_layout(ctx, blocks, experts,
                                    min(ctx.config.pacer["top_k_experts"], experts),
                                    source_shapes(ctx))
    count = moe_parameter_count(recipes) if target is None else target.parameters()
    return count / ctx.source_params


def output_config(ctx: "MergeContext", logical: bool = False) -> dict:
    """The config.json of the output: the anchor's, or its MoE form once upcycled (with
    ``logical``, the default target's even when the output is llama.cpp's: the model
    the calibration stage runs, through the TargetWriter's map)."""
    out = ctx.output
    if out.target is not None and not logical:
        return out.target.config
    config = ctx.anchor.config
    if isinstance(out.layout, VitMoeLayout):
        config = vit_moe_config(config, out.layout)
        config.update(router_mode=ctx.config.pacer["router_mode"],
                      router_temperature=ctx.config.pacer["router_temperature"],
                      expert_sizes={str(layer): [labels.count(e) for e in range(
                          ctx.decision.num_experts)] for layer, labels in
                          ctx.decision.clusters.items()})
    elif out.layout is not None:
        config = moe_config(config, out.layout)
    return config


def target_cost(ctx: "MergeContext") -> dict:
    """The export target and, for llama.cpp's, its parameter and compute cost against
    the default layout's (compute: the parameters a token runs through)."""
    out = ctx.output
    record = {"name": ctx.config.output.target}
    if out.target is None or not isinstance(out.layout, MoeLayout):
        return record
    m, k = out.layout.num_experts, out.layout.top_k
    default = moe_recipes(out.layout, source_shapes(ctx))
    active = sum(math.prod(r.shape) * (k / m if r.kind == "expert" else 1) for r in default)
    record.update(model_type=out.target.model_type,
                  parameters=out.target.parameters(),
                  default_parameters=moe_parameter_count(default),
                  active_parameters=round(out.target.active_parameters(k, m)),
                  default_active_parameters=round(active))
    return record


def _in_unit_order(target: TargetLayout, recipes: list[OutRecipe],
                   unit: dict[str, str]) -> list[tuple[str, OutTensor]]:
    """The target's tensors in the order the recipes (sorted by unit) first fill them, so
    each unit's tensors stay together in the shards, as in the default layout; each with
    the unit of the first recipe that fills it."""
    tensors = {t.name: t for t in target.tensors}
    order: dict[str, tuple[str, OutTensor]] = {}
    for r in recipes:
        for place in target.places.get(r.name, (Place(r.name),)):
            order.setdefault(place.name, (unit[r.name], tensors[place.name]))
    if len(order) != len(tensors):
        raise AssertionError(f"target tensors no recipe fills: {sorted(set(tensors) - set(order))}")
    return list(order.values())
