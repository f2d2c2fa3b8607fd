"""The decoder families' blocks: llama, mistral, qwen2, qwen3 and the MoE exports
qwen2_moe / qwen3_moe (stock checkpoints of those classes too).

RMSNorm, RoPE and grouped-query attention with optional sliding windows and q/k norms,
a SwiGLU MLP or top-k routed experts (qwen2_moe with its shared expert), and a key/value
cache for one-token generation steps (:meth:`DecoderBlocks.step`). What differs between
the families is data (:mod:`.block_families`); the loop over blocks is :mod:`.blocks`'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import PacerError
from .attention import attend, rope_inv_freq, rotate
from .block_families import DecoderFamily, Switch, activation, layer_windows, positive_int
from .blocks import BlockModel, Getter, check_router, fp32, mix_experts, route


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _on(config: dict, switch: Switch) -> bool:
    return switch if isinstance(switch, bool) else bool(config.get(switch))


class DecoderBlocks(BlockModel):
    """llama / mistral / qwen2 / qwen3 and their MoE exports (qwen2_moe, qwen3_moe)."""

    def __init__(self, config: dict, family: DecoderFamily) -> None:
        self.family = family
        spelled = {key: config[other] for key, other in family.aliases
                   if other in config and key not in config}
        self.config = cfg = {**dict(family.defaults), **config, **spelled}
        self.num_layers = positive_int(cfg, "num_hidden_layers")
        self.hidden_size = positive_int(cfg, "hidden_size")
        self.heads = positive_int(cfg, "num_attention_heads")
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
