"""A forward pass of a checkpoint, one block at a time, reading each tensor when it is needed.

The calibration stage routes sample tokens through a merged model while that model is
still being written shard by shard, so nothing here holds a model: every weight comes
from a getter (tensor name in the checkpoint -> tensor) at the moment it is used and is
dropped right after. Only the activations of the sample batch live across calls::

    bm = BlockModel.from_config(config)                    # config.json as a dict
    h = bm.embed(get, token_ids)                           # [B, T] -> [B, T, d]
    for i in range(bm.num_layers):
        h = bm.attention(get, i, h)                        # attention + its residual
        u = bm.mlp_input(get, i, h)                        # what the MLP / router sees
        h = h + bm.mlp(get, i, u)                          # = bm.block(get, i, h)
    logits = bm.head(get, h)

Everything is computed in float32 (whatever the stored dtype) on the device of the
activations, and reproduces transformers 5.23 (the eager / sdpa attention, same RoPE,
same routing) to float32 rounding. A key missing from config.json means the default of
the transformers config class, as when transformers loads it (``DecoderFamily.defaults``).

Supported ``model_type``: llama, mistral, qwen2, qwen3 (dense decoders), qwen2_moe,
qwen3_moe (the engine's MoE exports, and stock checkpoints of those classes), vit and
vit_moe (the engine's ViT-MoE, ``export/modeling_vit_moe.py``).

Decoder batches may be right-padded: attention is causal, so a real position never sees
the padding after it, and routing is per token, so no attention mask is needed (the
padded positions compute garbage that the caller ignores). Left padding is not handled.

This module never imports transformers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import PacerError
from ..export.vit_moe import MEMORY_TO_SAVED

Getter = Callable[[str], torch.Tensor]
Activation = Callable[[torch.Tensor], torch.Tensor]

MLP_CHUNK = 4096  # intermediate units per step of an MLP (bounds the [tokens, I] buffers)
SCORES_PER_CHUNK = 1 << 26  # attention scores (B * H * T * T) computed at once, ~256 MB fp32
DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


# -- small functions ------------------------------------------------------------------


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


def fp32(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A stored tensor as float32 on the device of the activations ``like``."""
    return tensor.to(device=like.device, dtype=torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
           window: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [B, H, T, hd] and k, v [B, KV, T, hd] (GQA).

    Query head h reads KV head h // (H / KV), as transformers' repeat_kv. A ``window``
    w lets position i see positions i - w + 1 .. i (transformers' sliding window).
    The batch is cut into pieces so the score matrices stay under SCORES_PER_CHUNK.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    tokens = q.shape[2]
    mask = None
    if window is not None and window < tokens:
        pos = torch.arange(tokens, device=q.device)
        back = pos[:, None] - pos[None, :]  # how far key j lies behind query i
        mask = (back >= 0) & (back < window)
    step = max(1, SCORES_PER_CHUNK // (q.shape[1] * tokens * tokens))
    return torch.cat([F.scaled_dot_product_attention(
        q[b:b + step], k[b:b + step], v[b:b + step], attn_mask=mask,
        is_causal=causal and mask is None, scale=scale) for b in range(0, q.shape[0], step)])


def route(logits: torch.Tensor, top_k: int,
          renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), both [tokens, top_k]: softmax in fp32, top k, optionally / sum."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, chosen = probs.topk(top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen


def mix_experts(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, num_experts: int,
                expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_k weights[:, k] * expert(chosen[:, k], x) for flat tokens x [N, d].

    Each expert runs only on its own tokens; an expert no token chose is never read.
    """
    out = torch.zeros_like(x)
    for e in range(num_experts):
        rows, slot = (chosen == e).nonzero(as_tuple=True)
        if rows.numel():
            out.index_add_(0, rows, expert(e, x[rows]) * weights[rows, slot, None])
    return out


def check_router(router: torch.Tensor, num_experts: int, hidden: int, layer: int) -> None:
    if tuple(router.shape) != (num_experts, hidden):
        raise ValueError(f"layer {layer}: router must be [{num_experts}, {hidden}] "
                         f"(num_experts, hidden_size), got {list(router.shape)}")


def _positive_int(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PacerError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value


# -- RoPE -------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: dict) -> dict:
    """The RoPE dict as transformers 5 resolves it: the legacy ``rope_scaling`` wins over
    ``rope_parameters``; the dict's own rope_theta over the top-level one; ``type`` is the
    old spelling of ``rope_type``."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise PacerError(f"config.json: per-layer-type rope parameters {sorted(params)} are not "
                         f"supported by the block-wise forward pass")
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    return params


def rope_inv_freq(config: dict, head_dim: int) -> torch.Tensor:
    """The [head_dim / 2] inverse frequencies of the default, linear or llama3 RoPE.

    The default RoPE of these model classes rotates the whole head whatever
    partial_rotary_factor says; the scaled ones would rotate part of it, which the model
    classes then fail to apply, so we refuse that.
    """
    params = rope_parameters(config)
    kind = params["rope_type"]
    if kind not in ROPE_TYPES:
        raise PacerError(f"config.json: rope type {kind!r} is not supported by the block-wise "
                         f"forward pass (supported: {', '.join(ROPE_TYPES)})")
    if kind != "default" and params.get("partial_rotary_factor", 1.0) != 1.0:
        raise PacerError(f"config.json: partial_rotary_factor "
                         f"{params['partial_rotary_factor']} with rope type {kind!r} is not "
                         f"supported")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (params["rope_theta"] ** exponent)
    if kind == "linear":  # positions divided by factor, i.e. frequencies
        return inv_freq / params["factor"]
    if kind == "llama3":
        return _llama3(inv_freq, params, config)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, params: dict, config: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths / factor, short ones kept, a smooth ramp between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    # a top-level original_max_position_embeddings wins (transformers, for Phi-3's sake)
    context = config.get("original_max_position_embeddings") or \
        params.get("original_max_position_embeddings") or config["max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x: torch.Tensor, inv_freq: torch.Tensor, start: int = 0) -> torch.Tensor:
    """RoPE on x [B, H, T, hd] at positions start..start+T-1, pairing dim j with j + hd/2."""
    pos = torch.arange(start, start + x.shape[2], device=x.device, dtype=torch.float32)
    angles = pos[:, None] * inv_freq.to(x.device)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * angles.cos() + turned * angles.sin()


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


def _on(config: dict, switch: Switch) -> bool:
    return switch if isinstance(switch, bool) else bool(config.get(switch))


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


# -- the model -----------------------------------------------------------------------------


class BlockModel:
    """Forward pass of one checkpoint, block by block, from its config.json (a dict).

    Holds only what the config says; every tensor comes from the getter when it is
    used (the getter may be called many times for one name; nothing is cached here).
    """

    num_layers: int
    hidden_size: int
    mlp_chunk: int = MLP_CHUNK
    # (module, input) before each linear layer of a block is applied, when set: the RegMean
    # pass (regmean_pass.py) collects its inputs' Gram matrices this way.
    observer: Callable[[str, torch.Tensor], None] | None = None

    @classmethod
    def from_config(cls, config: dict, names: Iterable[str] | None = None,
                    mlp_chunk: int = MLP_CHUNK) -> "BlockModel":
        """The block model for ``config``; PacerError for a model_type it does not know.

        ``names``, the checkpoint's tensor names, settles how a ViT checkpoint spells
        them (``vit.`` prefix or not; saved ``encoder.layer`` or in-memory ``layers``);
        without them we expect what transformers writes on save. Decoders ignore it.
        """
        model_type = config.get("model_type")
        if model_type in DECODERS:
            model: BlockModel = DecoderBlocks(config, DECODERS[model_type])
        elif model_type in ("vit", "vit_moe"):
            model = VitBlocks(config, None if names is None else list(names))
        else:
            supported = ", ".join([*DECODERS, "vit", "vit_moe"])
            raise PacerError(f"config.json: model_type {model_type!r} is not supported by the "
                             f"block-wise forward pass (supported: {supported})")
        if mlp_chunk <= 0:
            raise ValueError(f"mlp_chunk must be positive, got {mlp_chunk}")
        model.mlp_chunk = mlp_chunk
        return model

    # Each family implements these five.
    def embed(self, get: Getter, inputs: torch.Tensor) -> torch.Tensor:
        """Decoder: token ids [B, T] -> [B, T, d]. ViT: pixels [B, C, H, W] -> [B, 1 + P, d]."""
        raise NotImplementedError

    def attention(self, get: Getter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden state after block ``layer``'s attention and its residual add."""
        raise NotImplementedError

    def mlp_input(self, get: Getter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The normed hidden state block ``layer``'s MLP (and its router) sees."""
        raise NotImplementedError

    def mlp(self, get: Getter, layer: int, x: torch.Tensor,
            router: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``layer``'s MLP output (before the residual add).

        An MoE layer routes with ``router`` [num_experts, d] when given (always as a
        linear gate), else with the checkpoint's ``router_name(layer)``.
        """
        raise NotImplementedError

    def head(self, get: Getter, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder: final norm + lm_head -> [B, T, vocab]. ViT: final layernorm, then the
        classifier on the CLS token -> [B, labels] (a bare ViTModel: the normed [B, T, d])."""
        raise NotImplementedError

    def is_moe(self, layer: int) -> bool:
        return False

    def router_name(self, layer: int) -> str | None:
        """The router tensor of an MoE layer (None for a dense one)."""
        return None

    # Shared by every family.
    def block(self, get: Getter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """One whole block: attention, then MLP, each with its residual."""
        hidden = self.attention(get, layer, hidden)
        return hidden + self.mlp(get, layer, self.mlp_input(get, layer, hidden))

    def forward(self, get: Getter, inputs: torch.Tensor) -> torch.Tensor:
        """The whole model: embed, every block, head."""
        hidden = self.embed(get, inputs)
        for layer in range(self.num_layers):
            hidden = self.block(get, layer, hidden)
        return self.head(get, hidden)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for {self.num_layers} layers")

    def _mlp(self, get: Getter, x: torch.Tensor, up: str, down: str, act: Activation,
             gate: str | None = None, bias: bool = False) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) (SwiGLU), or down(act(up(x))) without ``gate``.

        ``up``, ``down`` and ``gate`` are module names (``.weight`` / ``.bias`` appended).
        Done in slices of mlp_chunk intermediate units: rows of gate/up, then the same
        columns of down, so the fp32 copies and [tokens, I] buffers stay small.
        """
        w_up, w_down = get(up + ".weight"), get(down + ".weight")
        w_gate = get(gate + ".weight") if gate else None
        b_up = get(up + ".bias") if bias else None
        b_gate = get(gate + ".bias") if bias and gate else None
        out = x.new_zeros(*x.shape[:-1], w_down.shape[0])
        if self.observer is not None:
            if w_up.shape[0] > self.mlp_chunk:
                raise ValueError("an observed MLP must run in one chunk (mlp_chunk >= width)")
            for module in (up, gate) if gate else (up,):
                self.observer(module, x)
        for lo in range(0, w_up.shape[0], self.mlp_chunk):
            rows = slice(lo, lo + self.mlp_chunk)
            h = F.linear(x, fp32(w_up[rows], x), None if b_up is None else fp32(b_up[rows], x))
            if w_gate is not None:
                g = F.linear(x, fp32(w_gate[rows], x),
                             None if b_gate is None else fp32(b_gate[rows], x))
                h = act(g) * h
            else:
                h = act(h)
            if self.observer is not None:
                self.observer(down, h)
            out += F.linear(h, fp32(w_down[:, rows], x))
        if bias:
            out += fp32(get(down + ".bias"), x)
        return out


class DecoderBlocks(BlockModel):
    """llama / mistral / qwen2 / qwen3 and their MoE exports (qwen2_moe, qwen3_moe)."""

    def __init__(self, config: dict, family: DecoderFamily) -> None:
        self.family = family
        spelled = {key: config[other] for key, other in family.aliases
                   if other in config and key not in config}
        self.config = cfg = {**dict(family.defaults), **config, **spelled}
        self.num_layers = _positive_int(cfg, "num_hidden_layers")
        self.hidden_size = _positive_int(cfg, "hidden_size")
        self.heads = _positive_int(cfg, "num_attention_heads")
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        if self.heads % self.kv_heads:
            raise PacerError(f"config.json: num_attention_heads {self.heads} is not a multiple "
                             f"of num_key_value_heads {self.kv_heads}")
        self.head_dim = cfg.get("head_dim") or self.hidden_size // self.heads
        self.eps = float(cfg["rms_norm_eps"])
        self.act = activation(cfg["hidden_act"])
        self.inv_freq = rope_inv_freq(cfg, self.head_dim)
        self.windows = layer_windows(family, cfg, self.num_layers)
        self.qkv_bias, self.o_bias = _on(cfg, family.qkv_bias), _on(cfg, family.o_bias)
        self.mlp_bias = _on(cfg, family.mlp_bias)
        if family.moe:
            self.num_experts = int(cfg["num_experts"])
            self.top_k = int(cfg["num_experts_per_tok"])
            self.dense_layers = set(cfg["mlp_only_layers"] or [])
            self.sparse_step = int(cfg["decoder_sparse_step"])

    def _w(self, get: Getter, name: str, like: torch.Tensor) -> torch.Tensor:
        return fp32(get(name), like)

    def _linear(self, get: Getter, x: torch.Tensor, module: str, bias: bool) -> torch.Tensor:
        if self.observer is not None:
            self.observer(module, x)
        b = self._w(get, module + ".bias", x) if bias else None
        return F.linear(x, self._w(get, module + ".weight", x), b)

    def embed(self, get: Getter, inputs: torch.Tensor) -> torch.Tensor:
        table = get("model.embed_tokens.weight")
        return table[inputs.to(table.device)].to(device=inputs.device, dtype=torch.float32)

    def attention(self, get: Getter, layer: int, hidden: torch.Tensor,
                  cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """With ``cache`` (layer -> the keys and values of the positions before ``hidden``),
        ``hidden`` holds the next positions only and the cache grows by them (:meth:`step`)."""
        self._check_layer(layer)
        p = f"model.layers.{layer}."
        x = rms_norm(hidden, self._w(get, p + "input_layernorm.weight", hidden), self.eps)
        batch, tokens = x.shape[:2]

        def heads(module: str, count: int) -> torch.Tensor:  # [B, count, T, hd]
            y = self._linear(get, x, p + "self_attn." + module, self.qkv_bias)
            y = y.view(batch, tokens, count, self.head_dim)
            if self.family.qk_norm and module in ("q_proj", "k_proj"):
                y = rms_norm(y, self._w(get, f"{p}self_attn.{module[0]}_norm.weight", x),
                             self.eps)
            return y.transpose(1, 2)

        past = cache.get(layer) if cache is not None else None
        start = past[0].shape[2] if past is not None else 0
        q = rotate(heads("q_proj", self.heads), self.inv_freq, start)
        k = rotate(heads("k_proj", self.kv_heads), self.inv_freq, start)
        v = heads("v_proj", self.kv_heads)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if cache is not None:
            cache[layer] = (k, v)
        window = self.windows[layer]
        if past is None:
            context = attend(q, k, v, self.head_dim ** -0.5, causal=True, window=window)
        else:  # one new position sees every cached one (within its window)
            if tokens != 1:
                raise ValueError("a cached attention step takes one position at a time")
            if window is not None:
                k, v = k[:, :, -window:], v[:, :, -window:]
            context = attend(q, k, v, self.head_dim ** -0.5, causal=False)
        context = context.transpose(1, 2).reshape(batch, tokens, -1)
        return hidden + self._linear(get, context, p + "self_attn.o_proj", self.o_bias)

    def step(self, get: Getter, tokens: torch.Tensor,
             cache: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Next-token logits [B, vocab] after ``tokens`` [B, T]: the whole prefix when
        ``cache`` is empty, else the one token after the cached positions."""
        hidden = self.embed(get, tokens)
        for layer in range(self.num_layers):
            hidden = self.attention(get, layer, hidden, cache)
            hidden = hidden + self.mlp(get, layer, self.mlp_input(get, layer, hidden))
        return self.head(get, hidden[:, -1:])[:, -1]

    def mlp_input(self, get: Getter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer)
        weight = self._w(get, f"model.layers.{layer}.post_attention_layernorm.weight", hidden)
        return rms_norm(hidden, weight, self.eps)

    def is_moe(self, layer: int) -> bool:
        """As the model classes decide: not in mlp_only_layers, every decoder_sparse_step-th."""
        self._check_layer(layer)
        return self.family.moe and self.num_experts > 0 and \
            layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0

    def router_name(self, layer: int) -> str | None:
        return f"model.layers.{layer}.mlp.gate.weight" if self.is_moe(layer) else None

    def mlp(self, get: Getter, layer: int, x: torch.Tensor,
            router: torch.Tensor | None = None) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp."
        if not self.is_moe(layer):
            return self._mlp(get, x, p + "up_proj", p + "down_proj", self.act,
                             gate=p + "gate_proj", bias=self.mlp_bias)
        flat = x.reshape(-1, x.shape[-1])
        if router is None:
            router = get(self.router_name(layer))
        check_router(router, self.num_experts, self.hidden_size, layer)
        weights, chosen = route(F.linear(flat, fp32(router, flat)), self.top_k,
                                bool(self.config["norm_topk_prob"]))

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            q = f"{p}experts.{e}."
            return self._mlp(get, rows, q + "up_proj", q + "down_proj", self.act,
                             gate=q + "gate_proj")

        out = mix_experts(flat, weights, chosen, self.num_experts, expert)
        # qwen2_moe's shared expert, gated by sigmoid(w . x) (the engine's is all zero and
        # adds exactly 0; a config with none, 0 wide, skips it without reading it)
        if self.family.shared_expert and self.config["shared_expert_intermediate_size"] > 0:
            gate = torch.sigmoid(F.linear(flat, self._w(get, p + "shared_expert_gate.weight",
                                                        flat)))
            q = p + "shared_expert."
            out += gate * self._mlp(get, flat, q + "up_proj", q + "down_proj", self.act,
                                    gate=q + "gate_proj")
        return out.view_as(x)

    def head(self, get: Getter, hidden: torch.Tensor) -> torch.Tensor:
        x = rms_norm(hidden, self._w(get, "model.norm.weight", hidden), self.eps)
        tied = bool(self.config["tie_word_embeddings"])
        return F.linear(x, self._w(get, "model.embed_tokens.weight" if tied else
                                   "lm_head.weight", x))


# ViT block modules by role, in the saved spelling (what transformers writes on save).
VIT_MODULES = {
    "attn_norm": "layernorm_before", "q": "attention.attention.query",
    "k": "attention.attention.key", "v": "attention.attention.value",
    "o": "attention.output.dense", "mlp_norm": "layernorm_after",
    "up": "intermediate.dense", "down": "output.dense",
}
SAVED_TO_MEMORY = {saved: memory for memory, saved in MEMORY_TO_SAVED.items()}
_MEMORY_BLOCK = re.compile(r"(?:vit\.)?layers\.\d+\.")


class VitBlocks(BlockModel):
    """transformers' ViT (pre-norm, non-causal) and the engine's ViT-MoE.

    ViT-MoE token merging (``tome_r`` > 0) is not applied: every token goes through
    every block, as with tome_r = 0.
    """

    def __init__(self, config: dict, names: list[str] | None) -> None:
        self.moe = config.get("model_type") == "vit_moe"
        self.config = cfg = {**VIT_DEFAULTS, **(VIT_MOE_DEFAULTS if self.moe else {}), **config}
        self.num_layers = _positive_int(cfg, "num_hidden_layers")
        self.hidden_size = _positive_int(cfg, "hidden_size")
        self.heads = _positive_int(cfg, "num_attention_heads")
        self.head_dim = cfg.get("head_dim") or self.hidden_size // self.heads
        self.eps = float(cfg["layer_norm_eps"])
        self.act = activation(cfg["hidden_act"])
        self.qkv_bias = bool(cfg["qkv_bias"])
        archs = cfg.get("architectures") or []
        if names is None:  # what save_pretrained writes
            self.classifier = any(a.endswith("ForImageClassification") for a in archs)
            self.prefix, self.memory_spelling = ("vit." if self.classifier else ""), False
        else:
            self.classifier = "classifier.weight" in names
            self.prefix = "vit." if any(n.startswith("vit.") for n in names) else ""
            self.memory_spelling = any(_MEMORY_BLOCK.match(n) for n in names)
        if self.moe:
            self.moe_layers = {int(i) for i in cfg["moe_layers"]}
            self.num_experts = int(cfg["num_experts"])
            self.top_k = int(cfg["num_experts_per_tok"])
            if cfg["router_mode"] not in VIT_ROUTER_MODES:
                raise PacerError(f"config.json: router_mode {cfg['router_mode']!r} is not "
                                 f"supported (supported: {', '.join(VIT_ROUTER_MODES)})")

    def _name(self, layer: int, role: str) -> str:
        module = VIT_MODULES[role]
        if self.memory_spelling:
            return f"{self.prefix}layers.{layer}.{SAVED_TO_MEMORY[module]}"
        return f"{self.prefix}encoder.layer.{layer}.{module}"

    def _w(self, get: Getter, name: str, like: torch.Tensor) -> torch.Tensor:
        return fp32(get(name), like)

    def _linear(self, get: Getter, x: torch.Tensor, module: str,
                bias: bool = True) -> torch.Tensor:
        if self.observer is not None:
            self.observer(module, x)
        b = self._w(get, module + ".bias", x) if bias else None
        return F.linear(x, self._w(get, module + ".weight", x), b)

    def _layer_norm(self, get: Getter, x: torch.Tensor, module: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self._w(get, module + ".weight", x),
                            self._w(get, module + ".bias", x), self.eps)

    def embed(self, get: Getter, inputs: torch.Tensor) -> torch.Tensor:
        """Patches (a conv with stride = kernel = patch size), CLS first, + positions."""
        e = self.prefix + "embeddings."
        pixels = inputs.float()
        weight = self._w(get, e + "patch_embeddings.projection.weight", pixels)
        patches = F.conv2d(pixels, weight, self._w(get, e + "patch_embeddings.projection.bias",
                                                   pixels), stride=tuple(weight.shape[-2:]))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self._w(get, e + "cls_token", pixels).expand(pixels.shape[0], -1, -1)
        tokens = torch.cat((cls, patches), dim=1)
        positions = self._w(get, e + "position_embeddings", pixels)
        if positions.shape[1] != tokens.shape[1]:
            raise PacerError(f"image {list(pixels.shape[-2:])} gives {tokens.shape[1]} tokens "
                             f"but position_embeddings has {positions.shape[1]}: pass images "
                             f"of the config's image_size (no interpolation here)")
        return tokens + positions

    def attention(self, get: Getter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer)
        x = self._layer_norm(get, hidden, self._name(layer, "attn_norm"))
        batch, tokens = x.shape[:2]

        def heads(role: str) -> torch.Tensor:  # [B, H, T, hd]
            y = self._linear(get, x, self._name(layer, role), self.qkv_bias)
            return y.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        context = attend(heads("q"), heads("k"), heads("v"), self.head_dim ** -0.5,
                         causal=False)
        context = context.transpose(1, 2).reshape(batch, tokens, -1)
        return hidden + self._linear(get, context, self._name(layer, "o"))

    def mlp_input(self, get: Getter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer)
        return self._layer_norm(get, hidden, self._name(layer, "mlp_norm"))

    def is_moe(self, layer: int) -> bool:
        self._check_layer(layer)
        return self.moe and layer in self.moe_layers

    def router_name(self, layer: int) -> str | None:
        """The linear gate of an MoE layer; None for a dense one, and for the
        deviation_norm router, which has no gate tensor (it reads the experts' fc1)."""
        if not self.is_moe(layer) or self.config["router_mode"] != "linear":
            return None
        return f"{self.prefix}encoder.layer.{layer}.moe.gate.weight"

    def _expert(self, layer: int, e: int) -> str:
        return f"{self.prefix}encoder.layer.{layer}.moe.experts.{e}."

    def mlp(self, get: Getter, layer: int, x: torch.Tensor,
            router: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_moe(layer):
            return self._mlp(get, x, self._name(layer, "up"), self._name(layer, "down"),
                             self.act, bias=True)
        flat = x.reshape(-1, x.shape[-1])
        if router is not None:
            check_router(router, self.num_experts, self.hidden_size, layer)
            logits = F.linear(flat, fp32(router, flat))
        elif self.config["router_mode"] == "linear":
            logits = F.linear(flat, self._w(get, self.router_name(layer), flat))
        else:
            logits = self._deviation_logits(get, layer, flat)
        # ViT-MoE always renormalises the top k (top-1 weights are exactly 1)
        weights, chosen = route(logits, self.top_k, renormalise=True)

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            q = self._expert(layer, e)
            return self._mlp(get, rows, q + "fc1", q + "fc2", self.act, bias=True)

        return mix_experts(flat, weights, chosen, self.num_experts, expert).view_as(x)

    def _deviation_logits(self, get: Getter, layer: int, flat: torch.Tensor) -> torch.Tensor:
        """||(W_m - C) x|| / temperature, C = the size-weighted mean of the experts' fc1.

        (W_m - C) x = W_m x - sum_n s_n W_n x, so two passes over the experts' fc1
        weights, one at a time, give it without forming C.
        """
        sizes = (self.config["expert_sizes"] or {}).get(str(layer)) or [1] * self.num_experts
        share = torch.tensor(sizes, dtype=torch.float32) / float(sum(sizes))

        def fc1(e: int) -> torch.Tensor:
            return F.linear(flat, self._w(get, self._expert(layer, e) + "fc1.weight", flat))

        mean = sum(float(share[e]) * fc1(e) for e in range(self.num_experts))
        scores = [torch.linalg.vector_norm(fc1(e) - mean, dim=-1)
                  for e in range(self.num_experts)]
        return torch.stack(scores, dim=-1) / float(self.config["router_temperature"])

    def head(self, get: Getter, hidden: torch.Tensor) -> torch.Tensor:
        x = self._layer_norm(get, hidden, self.prefix + "layernorm")
        if not self.classifier:
            return x
        return self._linear(get, x[:, 0], "classifier")
