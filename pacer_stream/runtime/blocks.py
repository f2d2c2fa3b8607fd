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

The families live beside this module: :mod:`.decoder_blocks` and :mod:`.vit_blocks`
run the blocks, :mod:`.attention` holds attention and RoPE, and :mod:`.block_families`
what each family's config.json means.

This module never imports transformers.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import PacerError
from .block_families import DECODERS, Activation

Getter = Callable[[str], torch.Tensor]

MLP_CHUNK = 4096  # intermediate units per step of an MLP (bounds the [tokens, I] buffers)


# -- shared by the families --------------------------------------------------------------


def fp32(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A stored tensor as float32 on the device of the activations ``like``."""
    return tensor.to(device=like.device, dtype=torch.float32)


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
        # the family classes subclass BlockModel, so they can only be imported once it exists
        from .decoder_blocks import DecoderBlocks
        from .vit_blocks import VitBlocks

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
