"""The llama.cpp export target: a MoE layout that llama.cpp converts and runs.

llama.cpp (its ``convert_hf_to_gguf.py`` and runtime, as vendored in llama-cpp-python
0.3.36) does not run the default MoE export of export/moe.py:

* the converter has no tensor names for a dense MLP inside a qwen2_moe/qwen3_moe file
  (it never reads ``mlp_only_layers``), and the runtime wants a router and experts in
  every layer (src/models/qwen2moe.cpp, qwen3moe.cpp: ``ffn_gate_inp`` required);
* its qwen2moe graph ignores ``norm_topk_prob`` (``build_moe_ffn(..., false, ...)``: the
  top-k weights are not renormalised), requires a shared expert (a 0-wide one means "as
  wide as the MLP") and computes the shared gate's sigmoid as silu(x)/x, NaN at x = 0.

So under ``output: {target: llama.cpp}`` every block is a MoE block with one expert count
M and one top-k. A block merged dense gets M identical copies of its merged MLP and an
all-zero router: every expert equally likely, the k chosen weights renormalised to 1/k
each, so the block computes its dense MLP (exactly for k a power of two, to rounding
otherwise). Each source family goes to a MoE class that transformers and llama.cpp both
know, with the renormalised softmax top-k routing PACER fits:

    llama, mistral -> mixtral     MixtralForCausalLM (llama.cpp: the llama architecture)
    qwen3          -> qwen3_moe   every block sparse, no mlp_only_layers
    qwen2          -> granitemoe  GraniteMoeForCausalLM: q/k/v biases (o_proj's zero),
                                  every multiplier 1, attention scale 1/sqrt(head_dim)

The target is a view of the default layout. The executor produces the default layout's
tensors (the "logical" recipes of export/moe.py) and each lands at one or more ``Place``s
of the target's tensors (a dense MLP at its M copies, an expert inside granitemoe's
fused [M, 2I, H] tensor), or nowhere when it is an exact zero the target has no slot for
(qwen2_moe's zero shared expert, the zero q/k/v biases it gives llama sources). The
calibration stage reads the logical tensors back through the same map and runs the
default layout's model, which computes the same function.

This module only computes names, places and the config; it never imports transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PacerError
from ..io.header import DTYPES
from ..io.writer import OutTensor, ShardWriter
from .moe import (MLP_PROJS, MoeLayout, OutRecipe, _copied_keys, _get, _mlp_proj, _parse,
                  _rope_keys, _shape_keys, _sliding_layers, moe_config)

LLAMACPP = "llama.cpp"
TARGET_TYPES = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "granitemoe",
                "qwen3": "qwen3_moe"}
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
HINT = "use output: {target: transformers}, or pacer.enable_moe_upcycle: false"


@dataclass(frozen=True)
class Place:
    """Where (part of) a logical tensor lands: tensor ``name``, from element ``first`` on
    in its flat row-major order."""

    name: str
    first: int = 0


@dataclass(frozen=True)
class TargetLayout:
    """The llama.cpp layout of one MoE decision."""

    model_type: str
    recipes: list[OutRecipe]  # the logical recipes plus the target's own zero tensors
    tensors: list[OutTensor]  # the target's tensors, in file order
    places: dict[str, tuple[Place, ...]]  # logical name -> places (absent: itself, at 0)
    expert_tensors: frozenset[str]  # target tensors holding experts (k of M run per token)
    config: dict

    def parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    def active_parameters(self, top_k: int, num_experts: int) -> float:
        """Parameters a token runs through: k of every M experts' weights, all the rest."""
        return sum(math.prod(t.shape) * (top_k / num_experts if t.name in self.expert_tensors
                                         else 1) for t in self.tensors)


def check_source(family: str, config: dict) -> None:
    """Refuse up front a source the llama.cpp target cannot represent exactly."""
    if family not in TARGET_TYPES:
        raise PacerError(f"output.target llama.cpp: no llama.cpp MoE layout for {family} "
                         f"sources; {HINT}")
    target = TARGET_TYPES[family]
    if config.get("mlp_bias"):
        _refuse(family, target, "mlp_bias: true (the experts have no MLP biases)")
    if target == "mixtral" and config.get("attention_bias"):
        _refuse(family, target, "attention_bias: true (mixtral attention has no biases)")
    if target == "granitemoe":
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        if config.get("head_dim") not in (None, hidden // heads):
            _refuse(family, target, f"head_dim {config['head_dim']} other than hidden_size / "
                                    f"num_attention_heads")
        window, sliding = _sliding_layers(config, family, config["num_hidden_layers"])
        if any(sliding):
            _refuse(family, target, "sliding-window attention")


def _refuse(family: str, target: str, feature: str) -> None:
    raise PacerError(f"output.target llama.cpp: the {family} source has {feature}, which "
                     f"{target} cannot represent; {HINT}")


def llamacpp_target(layout: MoeLayout, recipes: list[OutRecipe],
                    source_config: dict, prefix: str = "model.layers.") -> TargetLayout:
    """The llama.cpp layout of ``layout``, given its default recipes (moe_recipes)."""
    check_source(layout.family, source_config)
    target = TARGET_TYPES[layout.family]
    builder = _Builder(layout, target, prefix, _mlp_width(recipes, prefix))
    for recipe in recipes:
        builder.add(recipe)
    return TargetLayout(target, builder.recipes, list(builder.tensors.values()), builder.places,
                        frozenset(builder.experts), _config(source_config, layout, target))


def _mlp_width(recipes: list[OutRecipe], prefix: str) -> tuple[int, int]:
    """(intermediate, hidden) of the source MLP, from any block's gate_proj."""
    for r in recipes:
        layer, rest = _parse(r.source or r.name, prefix)
        if layer is not None and rest == "mlp.gate_proj.weight":
            return r.shape
    raise PacerError("output.target llama.cpp: the source has no mlp.gate_proj weights")


class _Builder:
    """Walks the default recipes in file order and lays out the target's tensors."""

    def __init__(self, layout: MoeLayout, target: str, prefix: str,
                 width: tuple[int, int]) -> None:
        self.layout, self.target, self.prefix = layout, target, prefix
        self.inter, self.hidden = width
        self.recipes: list[OutRecipe] = []
        self.tensors: dict[str, OutTensor] = {}
        self.places: dict[str, tuple[Place, ...]] = {}
        self.experts: set[str] = set()
        self._mlp_seen: dict[int, set[str]] = {}

    def add(self, r: OutRecipe) -> None:
        self.recipes.append(r)
        layer, rest = _parse(r.name, self.prefix)
        proj = _mlp_proj(rest)
        if layer is not None and proj is not None:  # a dense block's MLP: M copies
            self._place(r, [self._expert(layer, e, proj, r.dtype)
                            for e in range(self.layout.num_experts)])
            seen = self._mlp_seen.setdefault(layer, set())
            seen.add(proj)
            if seen == set(MLP_PROJS):
                self._zero_router(layer, r.dtype)
        elif r.kind == "expert":
            self._place(r, [self._expert(layer, r.expert, _expert_proj(rest), r.dtype)])
        elif r.kind == "router":
            self._place(r, [self._router(layer, r.dtype)])
        elif r.kind == "zeros" and (rest.startswith("mlp.shared_expert") or (
                rest.endswith("_proj.bias") and self.target != "granitemoe")):
            self.places[r.name] = ()  # an exact zero with no slot here (granitemoe has q/k/v
            # biases: a zero one stays, below)
        else:
            self._place(r, [self._declare(r.name, r.dtype, r.shape)])
            if self.target == "granitemoe" and rest == "self_attn.o_proj.weight":
                self._zeros(f"{self.prefix}{layer}.self_attn.o_proj.bias", r.dtype,
                            (r.shape[0],), layer)

    def _place(self, r: OutRecipe, places: list[Place]) -> None:
        if places != [Place(r.name)]:
            self.places[r.name] = tuple(places)

    def _declare(self, name: str, dtype: str, shape: tuple[int, ...]) -> Place:
        known = self.tensors.setdefault(name, OutTensor(name, dtype, tuple(shape)))
        if known.dtype != dtype:
            raise PacerError(f"output.target llama.cpp: {name} would mix {known.dtype} and "
                             f"{dtype} parts")
        return Place(name)

    def _zeros(self, name: str, dtype: str, shape: tuple[int, ...], layer: int) -> None:
        recipe = OutRecipe(name, dtype, shape, "zeros", layer=layer)
        self.recipes.append(recipe)
        self._declare(name, dtype, shape)

    def _zero_router(self, layer: int, dtype: str) -> None:
        """A dense block's router: all zero, so its identical experts tie."""
        self._zeros(self._router(layer, dtype).name, dtype,
                    (self.layout.num_experts, self.hidden), layer)

    def _router(self, layer: int, dtype: str) -> Place:
        block = f"{self.prefix}{layer}."
        name = {"mixtral": "block_sparse_moe.gate.weight",
                "granitemoe": "block_sparse_moe.router.layer.weight",
                "qwen3_moe": "mlp.gate.weight"}[self.target]
        return self._declare(block + name, dtype, (self.layout.num_experts, self.hidden))

    def _expert(self, layer: int, e: int, proj: str, dtype: str) -> Place:
        """Where expert ``e``'s ``proj`` weight of block ``layer`` lands."""
        block, m, inter, hidden = f"{self.prefix}{layer}.", self.layout.num_experts, \
            self.inter, self.hidden
        shape = (hidden, inter) if proj == "down_proj" else (inter, hidden)
        if self.target == "granitemoe":  # fused: [M, 2I, H] gate then up, [M, H, I] down
            if proj == "down_proj":
                place = Place(block + "block_sparse_moe.output_linear.weight", e * hidden * inter)
                self._declare(place.name, dtype, (m, hidden, inter))
            else:
                offset = (2 * e + (proj == "up_proj")) * inter * hidden
                place = Place(block + "block_sparse_moe.input_linear.weight", offset)
                self._declare(place.name, dtype, (m, 2 * inter, hidden))
        elif self.target == "mixtral":
            place = self._declare(f"{block}block_sparse_moe.experts.{e}."
                                  f"{MIXTRAL_NAMES[proj]}.weight", dtype, shape)
        else:
            place = self._declare(f"{block}mlp.experts.{e}.{proj}.weight", dtype,
                                  shape)
        self.experts.add(place.name)
        return place


def _expert_proj(rest: str) -> str:
    """``mlp.experts.3.up_proj.weight`` -> up_proj."""
    return rest.split(".")[3]


# -- config.json -------------------------------------------------------------------------


def _config(source: dict, layout: MoeLayout, target: str) -> dict:
    every = MoeLayout(layout.family, layout.num_layers, tuple(range(layout.num_layers)),
                      layout.num_experts, layout.top_k)
    if target == "qwen3_moe":
        return moe_config(source, every)
    shape = _shape_keys(source, layout)
    config = {"architectures": [ARCHITECTURES[target]], "model_type": target,
              **shape, **_copied_keys(source, layout.family), **_rope_keys(source),
              "num_local_experts": layout.num_experts, "num_experts_per_tok": layout.top_k,
              "output_router_logits": False}
    if target == "mixtral":
        window, sliding = _sliding_layers(source, layout.family, layout.num_layers)
        config.update(sliding_window=window if any(sliding) else None, router_jitter_noise=0.0)
    else:  # granitemoe: no head_dim key (hidden / heads), every multiplier the identity
        del config["head_dim"]
        config.update(attention_bias=True, attention_multiplier=shape["head_dim"] ** -0.5,
                      embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0)
    return config


def describe(family: str) -> str:
    """One phrase for ``plan``: what the llama.cpp target writes for this family."""
    target = TARGET_TYPES.get(family)
    if target is None:
        return f"no llama.cpp MoE layout for {family} (refused if a block is upcycled)"
    return (f"{target} with every block a MoE block (dense blocks as identical experts: "
            f"M x their MLP parameters, top-k x its compute)")


# -- writing through the places ------------------------------------------------------------


class TargetWriter:
    """A ShardWriter of the target's tensors that takes and gives back logical ones."""

    def __init__(self, writer: ShardWriter, layout: TargetLayout,
                 logical: dict[str, OutTensor]) -> None:
        self.writer, self.places, self.logical = writer, layout.places, logical

    def write(self, name: str, data: torch.Tensor, first_row: int = 0) -> None:
        places = self.places.get(name)
        if places is None:
            self.writer.write(name, data, first_row)
            return
        if not places and bool(data.count_nonzero()):
            raise AssertionError(f"{name}: the llama.cpp layout has no slot for a non-zero "
                                 "tensor")
        row = math.prod(self.logical[name].shape[1:])
        for place in places:
            self.writer.write_at(place.name, data, place.first + first_row * row)

    def read(self, name: str) -> torch.Tensor:
        places = self.places.get(name)
        if places is None:
            return self.writer.read(name)
        info = self.logical[name]
        if not places:
            return torch.zeros(info.shape, dtype=DTYPES[info.dtype][0])
        count = math.prod(info.shape)
        return self.writer.read_at(places[0].name, places[0].first, count).reshape(info.shape)

    def __getattr__(self, attr: str):  # sync, finish_all, write_index, close, ...
        return getattr(self.writer, attr)
