"""What differs between the families the block-wise forward pass runs, as data.

Each decoder family (a transformers 5.23 model class) is a :class:`DecoderFamily`: its
bias and norm switches, which layers slide, whether it is MoE, and the config class
defaults of the keys read, so a key missing from config.json means what it means when
transformers loads it. The ViT and ViT-MoE defaults are here too, and how config.json's
``hidden_act``, sizes and sliding windows are read. Used by :mod:`.blocks` and the
family classes (:mod:`.decoder_blocks`, :mod:`.vit_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import PacerError

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# transformers' ACT2FN names, for the activations these families use. gelu_python and
# gelu_fast are the same functions as gelu and the tanh gelu, written out differently.
ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu, "swish": F.silu,
    "gelu": F.gelu, "gelu_python": F.gelu,  # exact, with erf
    "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}


def activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise PacerError(f"config.json: hidden_act {name!r} is not supported by the block-wise "
                         f"forward pass (supported: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]


def positive_int(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PacerError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value


# -- the families, as data ---------------------------------------------------------------


def _every_layer(config: dict, layer: int) -> bool:
    return True


def _from_max_window_layers(config: dict, layer: int) -> bool:
    return layer >= config["max_window_layers"]


def _qwen2_moe_pattern(config: dict, layer: int) -> bool:
    return layer % 2 == 0 and layer < config["max_window_layers"]


Switch = bool | str  # always on / always off, or the config key that decides


@dataclass(frozen=True)
class DecoderFamily:
    """What differs between the decoder families (transformers 5.23 model classes)."""

    qkv_bias: Switch = False
    o_bias: Switch = False
    mlp_bias: Switch = False
    qk_norm: bool = False  # qwen3: RMSNorm over each head's dims of q and k, before RoPE
    # Sliding-window attention: which layers slide when layer_types does not say (None:
    # none ever), the key that must be true for sliding_window to apply (None: it applies
    # whenever set), and whether the class reads config.layer_types at all.
    sliding: Callable[[dict, int], bool] | None = None
    window_switch: str | None = None
    reads_layer_types: bool = False
    moe: bool = False  # sparse blocks, as qwen2_moe / qwen3_moe
    shared_expert: bool = False  # qwen2_moe: a sigmoid-gated shared expert
    defaults: tuple[tuple[str, object], ...] = ()  # config class defaults for absent keys
    # (key, other spelling): qwen3_moe's attribute_map saves num_experts as num_local_experts
    aliases: tuple[tuple[str, str], ...] = ()


_COMMON = (("rms_norm_eps", 1e-6), ("hidden_act", "silu"), ("tie_word_embeddings", False),
           ("attention_bias", False), ("mlp_bias", False))
_QWEN_WINDOW = (("use_sliding_window", False), ("sliding_window", 4096),
                ("max_window_layers", 28))
_MOE = (("decoder_sparse_step", 1), ("norm_topk_prob", False), ("mlp_only_layers", None))

DECODERS: dict[str, DecoderFamily] = {
    "llama": DecoderFamily(
        qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias",
        defaults=_COMMON + (("max_position_embeddings", 2048), ("num_key_value_heads", None))),
    "mistral": DecoderFamily(
        sliding=_every_layer,
        defaults=_COMMON + (("max_position_embeddings", 4096 * 32), ("num_key_value_heads", 8),
                            ("sliding_window", 4096))),
    "qwen2": DecoderFamily(
        qkv_bias=True, sliding=_from_max_window_layers, window_switch="use_sliding_window",
        reads_layer_types=True,
        defaults=_COMMON + _QWEN_WINDOW + (("max_position_embeddings", 32768),
                                           ("num_key_value_heads", 32))),
    "qwen3": DecoderFamily(
        qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True,
        sliding=_from_max_window_layers, window_switch="use_sliding_window",
        reads_layer_types=True,
        defaults=_COMMON + _QWEN_WINDOW + (("max_position_embeddings", 32768),
                                           ("num_key_value_heads", 32), ("head_dim", 128))),
    "qwen2_moe": DecoderFamily(
        qkv_bias="qkv_bias", sliding=_qwen2_moe_pattern, window_switch="use_sliding_window",
        reads_layer_types=True, moe=True, shared_expert=True,
        defaults=_COMMON + _QWEN_WINDOW + _MOE + (
            ("max_position_embeddings", 32768), ("num_key_value_heads", 16), ("qkv_bias", True),
            ("num_experts", 60), ("num_experts_per_tok", 4),
            ("shared_expert_intermediate_size", 5632))),
    "qwen3_moe": DecoderFamily(
        qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True, sliding=_every_layer,
        window_switch="use_sliding_window", moe=True,
        aliases=(("num_experts", "num_local_experts"),),
        defaults=_COMMON + _MOE + (
            ("max_position_embeddings", 32768), ("num_key_value_heads", 4),
            ("use_sliding_window", False), ("sliding_window", 4096), ("num_experts", 128),
            ("num_experts_per_tok", 8))),
}

# ViTConfig / ViTMoeConfig defaults of the keys read here.
VIT_DEFAULTS = {"layer_norm_eps": 1e-12, "hidden_act": "gelu", "qkv_bias": True}
VIT_MOE_DEFAULTS = {"moe_layers": [], "num_experts": 2, "num_experts_per_tok": 1,
                    "router_mode": "linear", "router_temperature": 1.0, "expert_sizes": None}
VIT_ROUTER_MODES = ("linear", "deviation_norm")


def layer_windows(family: DecoderFamily, config: dict, num_layers: int) -> list[int | None]:
    """The attention window of every layer (None: full causal attention)."""
    if family.sliding is None:
        return [None] * num_layers
    window = config.get("sliding_window")
    if family.window_switch and not config.get(family.window_switch):
        window = None  # qwen*: sliding_window is ignored unless use_sliding_window
    types = config.get("layer_types") if family.reads_layer_types else None
    if types is None:
        return [window if window is not None and family.sliding(config, i) else None
                for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"full_attention", "sliding_attention"}:
        raise PacerError(f"config.json: layer_types {types} must name full_attention or "
                         f"sliding_attention for each of the {num_layers} layers")
    if window is None and "sliding_attention" in types:
        raise PacerError("config.json: layer_types has sliding_attention layers but no "
                         "sliding window is enabled (use_sliding_window / sliding_window)")
    return [window if t == "sliding_attention" else None for t in types]
