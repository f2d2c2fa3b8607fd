"""Export of a partially upcycled decoder as a stock transformers MoE checkpoint.

llama, mistral and qwen2 sources become ``qwen2_moe`` (Qwen2MoeForCausalLM), qwen3
sources become ``qwen3_moe`` (Qwen3MoeForCausalLM); both load with no custom code.
An upcycled block's MLP becomes M experts, each a whole copy of the source MLP
(``moe_intermediate_size`` = the source ``intermediate_size``), plus a router; the
other blocks are listed in ``mlp_only_layers`` and keep a dense MLP.

On disk we write the canonical hub layout, one tensor per expert and projection::

    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    model.layers.{i}.mlp.gate.weight                      # router, [M, hidden]

transformers >= 5 fuses these on load into ``experts.gate_up_proj`` [M, 2I, H] and
``experts.down_proj`` [M, H, I] (its qwen2_moe conversion mapping, which qwen3_moe
shares; experts are stacked in numeric order), and older loaders read them as is.

qwen2_moe always builds a shared expert and q/k/v biases. We make both exact
no-ops: a shared expert SHARED_EXPERT_WIDTH wide whose weights are all zero
(down(silu(0) * 0) = 0, times sigmoid(0) of a zero ``shared_expert_gate``) and zero
q/k/v biases where the source has none (x @ W.T + 0 = x @ W.T). Not 0 wide: then
transformers builds zero-element Linear layers (it warns "Initializing zero-element
tensors"), and vLLM (vllm/model_executor/models/qwen2_moe.py) builds no shared
expert at all, so its load_weights fails on the checkpoint's
``shared_expert.down_proj.weight`` (no parameter of that name). 8 divides every
common tensor-parallel size, which vLLM's column/row-parallel layers require.

This module only computes names, shapes and the config; the executor fills in
the tensors. It never imports transformers (a test-only dependency).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import PacerError

MOE_MODEL_TYPES: dict[str, str] = {
    "llama": "qwen2_moe",
    "mistral": "qwen2_moe",
    "qwen2": "qwen2_moe",
    "qwen3": "qwen3_moe",
}
ARCHITECTURES = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
QKV_PROJS = ("q_proj", "k_proj", "v_proj")
DENSE_HINT = "set pacer.enable_moe_upcycle: false to merge dense"

# Defaults of the source config classes (transformers 5.23) for the keys we copy.
# A key missing from a source config.json means the source class default, which
# can differ from the MoE class default (e.g. llama bos_token_id 1 vs None), so
# the MoE config always spells every copied value out.
_COMMON_DEFAULTS = {
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_dropout": 0.0, "pad_token_id": None,
}
SOURCE_DEFAULTS: dict[str, dict] = {
    "llama": {**_COMMON_DEFAULTS, "vocab_size": 32000, "max_position_embeddings": 2048,
              "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {**_COMMON_DEFAULTS, "vocab_size": 32000, "max_position_embeddings": 4096 * 32,
                "bos_token_id": 1, "eos_token_id": 2, "num_key_value_heads": 8,
                "sliding_window": 4096},
    "qwen2": {**_COMMON_DEFAULTS, "vocab_size": 151936, "max_position_embeddings": 32768,
              "bos_token_id": None, "eos_token_id": None, "num_key_value_heads": 32,
              "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {**_COMMON_DEFAULTS, "vocab_size": 151936, "max_position_embeddings": 32768,
              "bos_token_id": None, "eos_token_id": None, "num_key_value_heads": 32,
              "sliding_window": 4096, "max_window_layers": 28, "head_dim": 128},
}
COPIED_KEYS = ("vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
               "hidden_act", "bos_token_id", "pad_token_id", "eos_token_id", "attention_dropout")
# Copied only when present: no effect on the function, or the same default everywhere.
OPTIONAL_KEYS = ("dtype", "torch_dtype", "initializer_range", "use_cache",
                 "partial_rotary_factor", "original_max_position_embeddings")
DEFAULT_ROPE_THETA = 10000.0  # RotaryEmbeddingConfigMixin.default_theta, not overridden by any
# The rope types of transformers 5.23's ROPE_INIT_FUNCTIONS (plus "default"). The MoE
# classes compute RoPE with the very same functions as the sources, so each is exact.
ROPE_TYPES = frozenset({"default", "linear", "dynamic", "yarn", "longrope", "llama3",
                        "proportional"})

SHARED_EXPERT_WIDTH = 8  # qwen2_moe's all-zero shared expert (module docstring)


def moe_model_type(family: str) -> str | None:
    """The MoE model_type a family exports to; None where it has none (bert, vit)."""
    return MOE_MODEL_TYPES.get(family)


def check_layout(what: str, num_layers: int, upcycled: tuple[int, ...], num_experts: int,
                 top_k: int) -> None:
    """Validate an export layout (shared by the qwen*_moe and ViT-MoE layouts)."""
    if num_experts < 2:
        raise PacerError(f"{what}: num_experts must be at least 2, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise PacerError(f"{what}: top_k must be between 1 and num_experts ({num_experts}), "
                         f"got {top_k}")
    blocks = list(upcycled)
    if not blocks:
        raise PacerError(f"{what}: no upcycled block; an MoE export needs at least one")
    if blocks != sorted(set(blocks)):
        raise PacerError(f"{what}: upcycled blocks must be sorted and unique, got {blocks}")
    if blocks[0] < 0 or blocks[-1] >= num_layers:
        raise PacerError(f"{what}: upcycled blocks {blocks} out of range for {num_layers} layers")


@dataclass(frozen=True)
class MoeLayout:
    """Which blocks become MoE, and the expert count and routing of each."""

    family: str  # source family name, a key of MOE_MODEL_TYPES
    num_layers: int
    upcycled: tuple[int, ...]  # sorted block indices that become MoE
    num_experts: int  # M >= 2
    top_k: int  # 1 <= top_k <= M

    def __post_init__(self) -> None:
        if moe_model_type(self.family) is None:
            raise PacerError(f"MoE export: family {self.family!r} has no MoE layout; "
                             f"{DENSE_HINT}")
        check_layout("MoE export", self.num_layers, self.upcycled, self.num_experts, self.top_k)

    @property
    def model_type(self) -> str:
        return MOE_MODEL_TYPES[self.family]

    @property
    def dense(self) -> list[int]:
        """The blocks that keep a dense MLP (the MoE config's mlp_only_layers)."""
        chosen = set(self.upcycled)
        return [i for i in range(self.num_layers) if i not in chosen]


@dataclass(frozen=True)
class OutRecipe:
    """One output tensor and where it comes from."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16", "F32"
    shape: tuple[int, ...]
    kind: str  # "source" (the source tensor `source`, merged as usual),
    # "expert" (source tensor `source` of block `layer`, expert/cluster `expert`),
    # "router" (block `layer`'s router [M, hidden]), "zeros" (all zeros)
    source: str | None = None
    layer: int | None = None
    expert: int | None = None


# -- config.json -------------------------------------------------------------------


def moe_config(source_config: dict, layout: MoeLayout) -> dict:
    """The config.json of the MoE output.

    Raises PacerError where the source has a feature the MoE class lacks, since
    exporting it anyway would silently change the model's function.
    """
    _check_config(source_config, layout)
    config = {"architectures": [ARCHITECTURES[layout.model_type]],
              "model_type": layout.model_type}
    config.update(_shape_keys(source_config, layout))
    config.update(_copied_keys(source_config, layout.family))
    config.update(_rope_keys(source_config))
    config.update(_window_keys(source_config, layout))
    config.update(_attention_bias_keys(source_config, layout))
    config.update(_moe_keys(source_config, layout))
    return config


def _check_config(source: dict, layout: MoeLayout) -> None:
    """Refuse source features the MoE classes cannot represent."""
    layers = source.get("num_hidden_layers")
    if layers != layout.num_layers:
        raise PacerError(f"MoE export: config.json num_hidden_layers {layers!r} differs from the "
                         f"layout's {layout.num_layers}")
    if source.get("mlp_bias"):
        _unsupported(layout, "mlp_bias: true (MoE experts have no MLP biases)")
    if layout.family == "llama" and source.get("attention_bias"):
        _unsupported(layout, "attention_bias: true (qwen2_moe has no o_proj bias)")


def _unsupported(layout: MoeLayout, feature: str) -> None:
    raise PacerError(f"{layout.family} source has {feature}, which {layout.model_type} cannot "
                     f"represent; {DENSE_HINT}")


def _get(source: dict, family: str, key: str):
    """A source config value, or the source class default when the key is absent."""
    return source[key] if key in source else SOURCE_DEFAULTS[family].get(key)


def _shape_keys(source: dict, layout: MoeLayout) -> dict:
    hidden, heads = source["hidden_size"], source["num_attention_heads"]
    # qwen3's class default head_dim is 128; the others derive it from hidden/heads.
    head_dim = _get(source, layout.family, "head_dim") or hidden // heads
    kv_heads = _get(source, layout.family, "num_key_value_heads") or heads
    return {"hidden_size": hidden, "num_hidden_layers": layout.num_layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "intermediate_size": source["intermediate_size"]}


def _copied_keys(source: dict, family: str) -> dict:
    copied = {key: _get(source, family, key) for key in COPIED_KEYS}
    copied.update({key: source[key] for key in OPTIONAL_KEYS if key in source})
    return copied


def _rope_keys(source: dict) -> dict:
    """RoPE as one ``rope_parameters`` dict, resolved like transformers 5.23 does.

    Priority as in RotaryEmbeddingConfigMixin: legacy ``rope_scaling`` over
    ``rope_parameters``; the dict's own rope_theta over the top-level one.
    """
    params = dict(source.get("rope_scaling") or source.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise PacerError(f"MoE export: per-layer-type rope parameters {sorted(params)} are not "
                         f"supported; {DENSE_HINT}")
    if "type" in params:  # legacy spelling of rope_type
        params.setdefault("rope_type", params["type"])
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", source.get("rope_theta", DEFAULT_ROPE_THETA))
    if params["rope_type"] not in ROPE_TYPES:
        raise PacerError(f"MoE export: rope type {params['rope_type']!r} is not supported by the "
                         f"MoE model classes; {DENSE_HINT}")
    return {"rope_parameters": params}


def _sliding_layers(source: dict, family: str, num_layers: int) -> tuple[int | None, list[bool]]:
    """The source's attention window and which layers use it, as its model class reads them."""
    if family == "llama":
        return None, [False] * num_layers
    if family == "mistral":  # one window for every layer, unless null
        window = _get(source, family, "sliding_window")
        return window, [window is not None] * num_layers
    # qwen2/qwen3: only with use_sliding_window, on the "sliding_attention" layers
    window = _get(source, family, "sliding_window")
    if not source.get("use_sliding_window") or window is None:
        return None, [False] * num_layers
    types = source.get("layer_types")
    if types is None:
        first = _get(source, family, "max_window_layers")
        return window, [i >= first for i in range(num_layers)]
    return window, [t == "sliding_attention" for t in types]


def _window_keys(source: dict, layout: MoeLayout) -> dict:
    window, sliding = _sliding_layers(source, layout.family, layout.num_layers)
    if layout.model_type == "qwen3_moe":
        return _qwen3_moe_window(layout, window, sliding)
    # qwen2_moe reads explicit layer_types; its own default pattern (every other layer
    # below max_window_layers) matches no source, so we always write them out.
    types = ["sliding_attention" if s else "full_attention" for s in sliding]
    # Loaders that ignore layer_types slide the layers from max_window_layers on.
    first = sliding.index(True) if any(sliding) else layout.num_layers
    return {"use_sliding_window": any(sliding), "sliding_window": window if any(sliding) else None,
            "max_window_layers": first, "layer_types": types}


def _qwen3_moe_window(layout: MoeLayout, window: int | None, sliding: list[bool]) -> dict:
    """qwen3_moe applies one window to every layer or to none."""
    if any(sliding) and not all(sliding):
        _unsupported(layout, "sliding-window attention on only some layers")
    if all(sliding) and window is not None:
        return {"use_sliding_window": True, "sliding_window": window}
    return {"use_sliding_window": False, "sliding_window": None}


def _attention_bias_keys(source: dict, layout: MoeLayout) -> dict:
    if layout.model_type == "qwen2_moe":
        return {"qkv_bias": True}  # sources without biases get zero ones (moe_recipes)
    return {"attention_bias": bool(source.get("attention_bias", False))}


def _moe_keys(source: dict, layout: MoeLayout) -> dict:
    keys = {
        "num_experts": layout.num_experts,
        "num_experts_per_tok": layout.top_k,
        # experts are whole source MLP blocks
        "moe_intermediate_size": source["intermediate_size"],
        "mlp_only_layers": layout.dense,
        "decoder_sparse_step": 1,
        # top-k weights renormalised to sum 1, so identical experts give the dense output
        "norm_topk_prob": True,
        "output_router_logits": False,
    }
    if layout.model_type == "qwen2_moe":
        keys["shared_expert_intermediate_size"] = SHARED_EXPERT_WIDTH
    return keys


# -- output tensors --------------------------------------------------------------


def moe_recipes(layout: MoeLayout, tensors: dict[str, tuple[str, tuple[int, ...]]],
                prefix_layers: str = "model.layers.") -> list[OutRecipe]:
    """Output tensors in the order given by ``tensors`` (source name -> (dtype, shape),
    insertion order = file order).

    A source tensor that is an MLP weight (gate_proj/up_proj/down_proj) of an upcycled
    block is replaced, at its position, by its M expert copies (kind "expert", names
    experts.{e}.<proj>.weight, same dtype/shape); the block's router (kind "router",
    dtype of the block's gate_proj) and, for qwen2_moe, the zero shared_expert_gate
    and all-zero shared expert weights come right after the block's last MLP tensor;
    zero q/k/v biases for sources without them (llama, mistral) come right after the
    corresponding weight when the target is qwen2_moe; per-layer ``rotary_emb.inv_freq``
    buffers are dropped (recomputed from the config; the MoE classes have no such key);
    every other tensor is kind "source" unchanged.
    """
    parsed = {name: _parse(name, prefix_layers) for name in tensors}
    _check_tensors(layout, parsed)
    last_mlp = {layer: name for name, (layer, rest) in parsed.items()
                if layer in layout.upcycled and _mlp_proj(rest)}
    out: list[OutRecipe] = []
    for name, (dtype, shape) in tensors.items():
        layer, rest = parsed[name]
        if rest.endswith("rotary_emb.inv_freq"):
            continue
        proj = _mlp_proj(rest)
        if layer in layout.upcycled and proj:
            out += _expert_recipes(layout, name, layer, proj, dtype, shape, prefix_layers)
        else:
            out.append(OutRecipe(name, dtype, shape, "source", name))
        if layout.model_type == "qwen2_moe":
            out += _zero_bias(name, layer, rest, dtype, shape, tensors)
        if last_mlp.get(layer) == name:
            out += _router_recipes(layout, layer, tensors, prefix_layers)
    return out


def moe_parameter_count(recipes: list[OutRecipe]) -> int:
    """Sum of numel over the recipes (zero-size tensors add nothing)."""
    return sum(math.prod(r.shape) for r in recipes)


def _parse(name: str, prefix: str) -> tuple[int | None, str]:
    """(block index, name within the block), or (None, name) outside the blocks."""
    found = re.fullmatch(re.escape(prefix) + r"(\d+)\.(.+)", name)
    return (int(found.group(1)), found.group(2)) if found else (None, name)


def _mlp_proj(rest: str) -> str | None:
    """The projection of an MLP weight (``mlp.gate_proj.weight`` -> gate_proj), else None."""
    found = re.fullmatch(r"mlp\.(gate_proj|up_proj|down_proj)\.weight", rest)
    return found.group(1) if found else None


def _check_tensors(layout: MoeLayout, parsed: dict[str, tuple[int | None, str]]) -> None:
    """Refuse tensors the MoE classes have no slot for, and upcycled blocks without an MLP."""
    for name, (layer, rest) in parsed.items():
        if re.fullmatch(r"mlp\.\w+\.bias", rest):
            _unsupported(layout, f"MLP bias {name}")
        if layout.model_type == "qwen2_moe" and rest == "self_attn.o_proj.bias":
            _unsupported(layout, f"attention output bias {name}")
    for layer in layout.upcycled:
        found = {_mlp_proj(rest) for (i, rest) in parsed.values() if i == layer} - {None}
        if found != set(MLP_PROJS):
            missing = sorted(set(MLP_PROJS) - found)
            raise PacerError(f"MoE export: block {layer} lacks MLP weights {missing}; "
                             f"cannot upcycle it")


def _expert_recipes(layout: MoeLayout, name: str, layer: int, proj: str, dtype: str,
                    shape: tuple[int, ...], prefix: str) -> list[OutRecipe]:
    """The M expert copies of one MLP weight, in expert order."""
    return [OutRecipe(f"{prefix}{layer}.mlp.experts.{e}.{proj}.weight", dtype, shape, "expert",
                      name, layer, e) for e in range(layout.num_experts)]


def _router_recipes(layout: MoeLayout, layer: int, tensors: dict,
                    prefix: str) -> list[OutRecipe]:
    """The router of an upcycled block, and qwen2_moe's no-op shared expert."""
    dtype, (_, hidden) = tensors[f"{prefix}{layer}.mlp.gate_proj.weight"]
    block = f"{prefix}{layer}.mlp."
    out = [OutRecipe(block + "gate.weight", dtype, (layout.num_experts, hidden), "router",
                     layer=layer)]
    if layout.model_type == "qwen2_moe":
        # sigmoid(0) = 0.5 times an all-zero shared expert's output (exactly 0): no effect
        w = SHARED_EXPERT_WIDTH
        out += [OutRecipe(block + name, dtype, shape, "zeros", layer=layer) for name, shape in (
            ("shared_expert_gate.weight", (1, hidden)),
            ("shared_expert.gate_proj.weight", (w, hidden)),
            ("shared_expert.up_proj.weight", (w, hidden)),
            ("shared_expert.down_proj.weight", (hidden, w)),
        )]
    return out


def _zero_bias(name: str, layer: int | None, rest: str, dtype: str, shape: tuple[int, ...],
               tensors: dict) -> list[OutRecipe]:
    """A zero bias after a q/k/v weight that has none (qwen2_moe always has them)."""
    found = re.fullmatch(r"self_attn\.(\w+)\.weight", rest)
    bias = name[:-len("weight")] + "bias"
    if layer is None or found is None or found.group(1) not in QKV_PROJS or bias in tensors:
        return []
    return [OutRecipe(bias, dtype, (shape[0],), "zeros", layer=layer)]
