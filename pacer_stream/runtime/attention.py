"""Attention of the block-wise forward pass: softmax attention and RoPE.

:func:`attend` is scaled dot-product attention with grouped KV heads and sliding windows;
the RoPE functions resolve a config.json's rope settings as transformers 5 does and
rotate queries and keys. Shared by the decoder and ViT blocks (:mod:`.blocks`); float32,
never imports transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import PacerError

SCORES_PER_CHUNK = 1 << 26  # attention scores (B * H * T * T) computed at once, ~256 MB fp32
DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


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
