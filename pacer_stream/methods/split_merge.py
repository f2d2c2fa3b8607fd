"""Split-Merge (seed 004): shared weights μ, one sparse direction η, one scalar per expert.

With the n models' weights θ_t flattened into vectors of length d::

    μ   = mean_t θ_t                      (the shared component)
    δ_t = θ_t − μ                         (relative task vectors)
    ψ   = the k = α·d positions of largest Var_t(δ_{t,j})   (population variance)
    δ̂_t = δ_t restricted to ψ
    G   = [<δ̂_s, δ̂_t>]  (n × n, fp64)    with top eigenpair (λ, u)
    v*  = Σ_t u_t δ̂_t / √λ               the first principal component (unit norm)
    c_t = v*ᵀ δ̂_t = √λ · u_t
    η   = v* scattered back onto ψ, zero elsewhere

Expert t is μ + c_t·η. Sign convention: v* and −v* are both principal
components; we pick the one that makes the c_t of largest magnitude positive
(on a tie, the lowest t). Ties in the variance at the k-th place are broken by
position: the elements come in the model's file order (tensor by tensor, row
major), and the first ones are kept, so exactly k positions are selected.

Everything here works on one slice of one tensor at a time; the streaming
passes live in :mod:`pacer_stream.stages.split_passes`. No result may depend on where the
slices are cut (that follows the memory budget): G is summed in fixed row groups
of each tensor (:func:`gram_group_rows`), which a slice never splits, and η is
computed element by element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sparsify import magnitude_bits

ETA_FORMAT = "pacer-split-merge-eta"
ETA_FILE = "eta.safetensors"
INFO_FILE = "split_merge.json"
INDEX_BYTES = 8  # int64 flat indices of a sparse η tensor
# G is summed in groups of about this many elements (whole rows, counted from row 0 of
# each tensor): one matmul per group, the group partials added in row order. Big
# enough that the per-group overhead is small (a 70B model has ~270 000 groups).
GRAM_GROUP_ELEMS = 1 << 18


def deviations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, δ) of one slice: ``x`` [n, ...] fp32 becomes δ in place."""
    mu = x.mean(0)
    return mu, x.sub_(mu)


def variance_bits(delta: torch.Tensor) -> torch.Tensor:
    """Per-position population variance across the models, as sortable int32 bits (flat)."""
    return magnitude_bits(delta.square().mean(0))


def gram_group_rows(row_numel: int) -> int:
    """Rows in one fixed Gram group of a tensor whose rows have ``row_numel`` elements."""
    return max(1, GRAM_GROUP_ELEMS // max(row_numel, 1))


def gram_slice_rows(rows: int, total_rows: int, row_numel: int) -> int:
    """Rows a Gram-pass slice may hold: the budget's ``rows`` cut down to whole groups,
    at least one group (the Gram pass's smallest working set), all rows if they fit."""
    if rows >= total_rows:
        return rows
    group = gram_group_rows(row_numel)
    return max(group, rows // group * group)


def group_counts(mask: torch.Tensor, group_numel: int) -> list[int]:
    """Selected positions in each consecutive ``group_numel``-element group of a flat mask
    (the last group may be shorter: the end of the tensor)."""
    group_numel = max(group_numel, 1)  # rows of zero elements: any grouping will do
    whole = mask.numel() // group_numel * group_numel
    counts = mask[:whole].reshape(-1, group_numel).sum(1).tolist() if whole else []
    if whole < mask.numel():
        counts.append(int(mask[whole:].sum()))
    return counts


def group_grams(selected: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The Gram matrix of each group's selected deviations, [groups, n, n] fp64 on the CPU.

    ``selected`` [n, m] holds the selected columns of whole groups in order, ``counts``
    how many of them each group has; groups with none are left out (they add nothing).
    Each group's Gram is one matmul over a fresh contiguous fp64 copy of the same
    shape, so it is the same bits whichever slice the group came in.
    """
    n = selected.shape[0]
    parts = []
    for part in torch.split(selected, counts, dim=1):
        if part.shape[1]:
            dense = part.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
            parts.append(dense @ dense.T)
    if not parts:
        return torch.zeros((0, n, n), dtype=torch.float64)
    return torch.stack(parts).cpu()  # one device-to-host copy per slice


@dataclass(frozen=True)
class Components:
    """The top eigenpair of G, as coefficients and the combination giving v*."""

    eigenvalue: float
    combination: list[float]  # u / √λ: v* = Σ_t combination[t] · δ̂_t
    coefficients: list[float]  # c_t = √λ · u_t

    @classmethod
    def from_gram(cls, gram: torch.Tensor) -> "Components":
        values, vectors = torch.linalg.eigh(gram.double())
        lam = float(values[-1])
        n = gram.shape[0]
        if lam <= 0:  # identical models: no direction at all
            return cls(0.0, [0.0] * n, [0.0] * n)
        u = vectors[:, -1]
        big = int(torch.argmax(u.abs()))  # first index of the largest |u_t|
        if u[big] < 0:
            u = -u
        root = math.sqrt(lam)
        return cls(lam, (u / root).tolist(), (u * root).tolist())

    def is_finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.eigenvalue, *self.combination,
                                              *self.coefficients))

    def eta(self, delta: torch.Tensor) -> torch.Tensor:
        """v* on the selected positions: Σ_t combination[t] · δ_t (``delta`` [n, m]).

        Summed term by term with separate multiplies and adds (each rounded once), not
        as a matrix product whose kernels may fuse or regroup differently for another
        slice length: every element gets the same bits however the tensor was sliced.
        """
        total = torch.zeros(delta.shape[1], dtype=torch.float64, device=delta.device)
        for weight, row in zip(self.combination, delta):
            total = total + row.double() * weight
        return total.float()


def sparse_is_smaller(nnz: int, numel: int, value_bytes: int = 4) -> bool:
    """Store η of a tensor as (indices, values) when that takes fewer bytes than dense."""
    return nnz * (INDEX_BYTES + value_bytes) < numel * value_bytes


def twin_merge_params(shapes: list[tuple[int, ...]], n: int, rank: int) -> int:
    """Parameters Twin-Merging's rank-r SVD experts need: d_in·d_out + n·r·(d_in + d_out + 1)
    per matrix (the seed's toy-example count); other tensors are counted once (shared)."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        if len(shape) == 2:
            total += numel + n * min(rank, *shape) * (shape[0] + shape[1] + 1)
        else:
            total += numel
    return total
