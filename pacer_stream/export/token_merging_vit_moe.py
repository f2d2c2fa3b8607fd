"""Token merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) for ViTs.

In every block, between attention and MLP, the r most similar token pairs are merged by
bipartite soft matching on the attention keys, and attention becomes proportional (log
of each key token's size added to the logits), so a merged token weighs as much as the
tokens it stands for. ViT-MoE blocks (``modeling_vit_moe.py``) run through
:func:`tome_block` always, merging when ``config.tome_r > 0``; ``apply_tome`` there adds
the same to a plain transformers ViT.

One of the three files pacer-stream copies verbatim into an upcycled ViT's output folder
(``modeling_vit_moe.py`` imports it relatively, so transformers copies it along). It
imports only torch.
"""

import math
from typing import Callable

import torch
from torch import nn

Merge = Callable[..., torch.Tensor]
Unmerge = Callable[[torch.Tensor], torch.Tensor]
Attend = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def max_merges(tokens: int, protect_cls: bool = True) -> int:
    """The most tokens one bipartite matching can remove from ``tokens``.

    Only A tokens (even positions) are removed, each into a B token (odd positions), so
    at most all of A goes; the CLS token is in A and stays when protected. Either way
    at least the CLS token and one other remain.
    """
    a_tokens = (tokens + 1) // 2
    return max(0, min(a_tokens - int(protect_cls), tokens - 2))


def bipartite_soft_matching(keys: torch.Tensor, r: int,
                            protect_cls: bool = True) -> tuple[Merge, Unmerge]:
    """Match the r most similar token pairs of ``keys`` [B, T, C] (ToMe, Bolya et al. 2023).

    Tokens alternate into set A (even positions) and B (odd positions); each A token
    picks its most cosine-similar B token, and the r A tokens with the highest such
    similarity are merged into their pick. r is capped by :func:`max_merges`.

    Returns ``merge(x, mode="mean")``, which maps [B, T, ...] to [B, T - r, ...]
    ("sum" adds each merged token into its partner, "mean" averages them: use
    :func:`merge_wavg` for size-weighted averages), and ``unmerge(y)``, which maps
    [B, T - r, ...] back to [B, T, ...] by giving every position the value of the token
    it went into. Surviving tokens keep their relative order, so CLS stays at index 0.
    """
    batch, tokens = keys.shape[:2]
    r = min(r, max_merges(tokens, protect_cls))
    if r <= 0:
        return (lambda x, mode="mean": x), (lambda y: y)
    with torch.no_grad():  # the matching is a discrete choice: no gradient through it
        unit = nn.functional.normalize(keys.float(), dim=-1)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [B, |A|, |B|] cosines
        if protect_cls:
            scores[:, 0] = -math.inf  # CLS (position 0, first of A) is never merged away
        best, partner = scores.max(dim=-1)  # each A token's most similar B token
        chosen = best.argsort(dim=-1, descending=True, stable=True)[:, :r]
        src = 2 * chosen  # positions of the merged-away A tokens
        dst = 2 * partner.gather(1, chosen) + 1  # positions of their B partners
        keep = torch.ones(batch, tokens, dtype=torch.bool, device=keys.device)
        keep.scatter_(1, src, False)
        kept = torch.arange(tokens, device=keys.device).expand(batch, tokens)[keep]
        kept = kept.view(batch, tokens - r)  # surviving positions, in order
        # new_index[b, p]: where old position p lives after the merge
        new_index = keep.long().cumsum(dim=1) - 1
        new_index.scatter_(1, src, new_index.gather(1, dst))  # dst never moves, so this is final

    def along(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``index`` [B, n] broadcast over x's trailing dims, for gather/scatter on dim 1."""
        return index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        moved = x.gather(1, along(src, x))
        x = x.scatter_reduce(1, along(dst, x), moved, reduce=mode, include_self=True)
        return x.gather(1, along(kept, x))

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        return y.gather(1, along(new_index, y))

    return merge, unmerge


def merge_wavg(merge: Merge, x: torch.Tensor,
               size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` [B, T, C] into size-weighted averages; returns (x, size) merged.

    ``size`` [B, T, 1] counts the original patches each token stands for (None: all 1).
    A merged token is (s_a x_a + s_b x_b) / (s_a + s_b) and has size s_a + s_b.
    """
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
    total = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return (total / size).to(x.dtype), size


def merge_source(unmerge: Unmerge, source: torch.Tensor, merged_tokens: int) -> torch.Tensor:
    """Compose the map original token -> current index, ``source`` [B, N], with one merge.

    Unmerging the identity of the merged sequence gives each old position's new index.
    """
    step = torch.arange(merged_tokens, device=source.device).expand(source.shape[0], -1)
    return unmerge(step).gather(1, source)


def unmerge_tokens(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Back to the original length: original token j gets the value of its current token."""
    return x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))


class ToMeState:
    """Merge bookkeeping of one forward pass: merges per block, token sizes, and sources."""

    def __init__(self, r: int, unmerge: bool = False):
        self.r = r  # tokens merged away per block
        self.unmerge = unmerge  # gather the final tokens back to the input length
        self.size: torch.Tensor | None = None  # [B, T, 1] patches per token; None = all 1
        self.source: torch.Tensor | None = None  # [B, N] original -> current index; None = identity

    def __repr__(self) -> str:
        return f"ToMeState(r={self.r}, unmerge={self.unmerge})"

    def reset(self) -> None:
        self.size, self.source = None, None

    def merge(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Merge ``x`` [B, T, C] by the similarity of ``keys`` [B, T, hd]; updates sizes/sources."""
        merge, unmerge = bipartite_soft_matching(keys, self.r)
        if self.source is None:
            self.source = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        x, self.size = merge_wavg(merge, x, self.size)
        self.source = merge_source(unmerge, self.source, x.shape[1])
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The final hidden states, unmerged to the input length when asked."""
        return unmerge_tokens(x, self.source) if self.unmerge and self.source is not None else x


def proportional_attention(x: torch.Tensor, query: nn.Module, key: nn.Module, value: nn.Module,
                           head_dim: int, size: torch.Tensor | None = None,
                           dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(hd) + log size) V over the heads; returns (context, keys).

    With ``size`` None this is, operation for operation, transformers' eager ViT
    attention (so bit-identical to it). context is [B, T, H * hd] (before the output
    projection), keys are [B, H, T, hd].
    """
    shape = (*x.shape[:-1], -1, head_dim)
    q = query(x).view(shape).transpose(1, 2)
    k = key(x).view(shape).transpose(1, 2)
    v = value(x).view(shape).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(2, 3)) * head_dim**-0.5
    if size is not None:  # a key standing for s patches counts s times (ToMe, eq. 1)
        scores = scores + size.log().transpose(1, 2)[:, None]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=dropout > 0)
    context = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return context.reshape(*x.shape[:-1], -1).contiguous(), k


def tome_block(x: torch.Tensor, norm_before: nn.Module, attend: Attend, norm_after: nn.Module,
               mlp: Callable[[torch.Tensor], torch.Tensor], dropout: nn.Module,
               state: ToMeState | None) -> torch.Tensor:
    """One pre-norm ViT block with ToMe between attention and MLP (the paper's placement).

    ``attend(h, size)`` returns (attention output, keys [B, H, T, hd]). The residual sums
    keep transformers' operand order (branch + residual).
    """
    attended, keys = attend(norm_before(x), state.size if state is not None else None)
    x = dropout(attended) + x
    if state is not None and state.r > 0:
        x = state.merge(x, keys.mean(dim=1))  # keys averaged over heads, as in ToMe
    return dropout(mlp(norm_after(x))) + x


__all__ = [
    "ToMeState", "bipartite_soft_matching", "merge_wavg", "merge_source", "unmerge_tokens",
    "max_merges", "proportional_attention", "tome_block",
]
