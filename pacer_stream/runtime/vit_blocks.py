"""ViT blocks: transformers' ViT and the engine's ViT-MoE (``export/modeling_vit_moe.py``).

Pre-norm blocks with LayerNorm, non-causal attention over CLS + patches and a GELU MLP,
or in a ViT-MoE's upcycled blocks the routed experts (a linear gate, or the
deviation-norm router that reads the experts' fc1). A checkpoint may spell its tensors
as transformers saves them (``encoder.layer.{i}``) or as its modules name them in memory
(``layers.{i}``), with or without the ``vit.`` prefix of a classifier.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..errors import PacerError
from ..export.vit_moe import MEMORY_TO_SAVED
from .attention import attend
from .block_families import (VIT_DEFAULTS, VIT_MOE_DEFAULTS, VIT_ROUTER_MODES, activation,
                             positive_int)
from .blocks import BlockModel, Getter, check_router, fp32, mix_experts, route

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
        self.num_layers = positive_int(cfg, "num_hidden_layers")
        self.hidden_size = positive_int(cfg, "hidden_size")
        self.heads = positive_int(cfg, "num_attention_heads")
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
