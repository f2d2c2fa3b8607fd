"""Weight-matching costs of one symmetry group, and how a solution updates the permutations.

For a group G and a peer, with every other group's permutation held fixed, the
Git Re-Basin objective sum_tensors <W_anchor, P(W_peer)> is linear in G's
permutation, so maximizing it is an assignment problem with

    cost[b, i, j] = sum over G's member axes of <anchor slot i, peer slot j>

(one problem per parent slot b for a child group such as the query heads of KV
head b). The peer's other axes, and the other factors of G's own axes, are
permuted first, so each slot of the peer is compared exactly as it would be
merged.

A subtlety of destination-indexed permutations (see :mod:`pacer_stream.graph`):
a child group's permutation for parent slot g belongs to the peer head that
*lands* in slot g. While the parent is being re-solved its children must travel
with their source heads, so they are re-indexed by source first (``by_source``)
and re-indexed by the new destination afterwards (:func:`apply_solution`).
"""

from __future__ import annotations

import torch

from ..accounting import COST_BLOCK_ELEMS
from ..graph import MergeGraph, SymmetryGroup, source_index

DOT_CHUNK = 1 << 22  # elements per step of the objective's dot product


def children(graph: MergeGraph, group: SymmetryGroup) -> list[SymmetryGroup]:
    """Groups permuted within the slots of ``group`` (e.g. q and vo within kv)."""
    return [g for g in graph.groups.values()
            if g.unit == group.unit and graph.spec.group_kind(g.kind).parent == group.kind]


def cost_inputs(graph: MergeGraph, group: SymmetryGroup) -> set[str]:
    """The other groups whose permutations :func:`group_cost` of ``group`` reads.

    A cost permutes the peer's member tensors on every axis, so it depends on each
    group with a factor there (and on nothing else). While none of them changes,
    solving ``group`` again gives the same answer.
    """
    return {f.group for name, _ in group.members for axis in graph.nodes[name].axes
            for f in axis if f.group is not None} - {group.id}


def group_cost(graph: MergeGraph, gid: str, anchor: dict[str, torch.Tensor],
               peer: dict[str, torch.Tensor], perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 ``[problems, n, n]`` cost of group ``gid`` over the tensors given.

    Only members whose tensor is in ``anchor`` count: for the residual stream that
    is one unit's share, which the caller accumulates across units.
    """
    group = graph.groups[gid]
    n = group.size
    cost = None
    local = _solving_view(graph, group, perms)
    invariant = bool(children(graph, group))
    for name, axis in group.members:
        if name not in anchor:
            continue
        a_raw, p_raw = anchor[name], peer[name]
        if cost is None:
            cost = torch.zeros(group.problems, n, n, dtype=torch.float32, device=a_raw.device)
        for a_rows, p_rows in _row_blocks(graph, name, axis, a_raw, p_raw):
            node = graph.nodes[name]
            if not invariant and len(node.axes) == 2 and len(node.axes[axis]) == 1:
                # a plain matrix whose whole axis is the group: one GEMM on views, no copies
                a, p = a_rows.float(), _permuted(node, p_rows, local).float()
                cost[0].addmm_(a, p.T) if axis == 0 else cost[0].addmm_(a.T, p)
                continue
            a, p = _sides(graph, name, axis, gid, a_rows, p_rows, local, invariant)
            if invariant:
                cost[0] += _inner_invariant(a, p)
            else:
                cost.baddbmm_(a, p.transpose(1, 2))
    if cost is None:
        return torch.zeros(group.problems, n, n, dtype=torch.float32)
    return cost


def _row_blocks(graph: MergeGraph, name: str, axis: int, a: torch.Tensor, p: torch.Tensor):
    """The tensor in row blocks when its rows are just summed over (bounded fp32 copies).

    That is the case when the group's axis is not the first and nothing permutes the
    first: embeddings and heads, [vocab, d], the largest tensors of a decoder.
    """
    first = graph.nodes[name].axes[0]
    if axis == 0 or any(f.group for f in first) or a.dim() < 2:
        yield a, p
        return
    rows = max(1, COST_BLOCK_ELEMS // max(1, a[0].numel()))
    for start in range(0, a.shape[0], rows):
        yield a[start:start + rows], p[start:start + rows]


def _permuted(node, p: torch.Tensor, local: dict[str, torch.Tensor]) -> torch.Tensor:
    for ax, factors in enumerate(node.axes):  # permute at the stored width
        index = source_index(factors, local)
        if index is not None and not torch.equal(index, torch.arange(len(index))):
            p = p.index_select(ax, index.to(p.device))  # (the identity needs no copy)
    return p


def _inner_invariant(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[n, n]``: ||A_g P_i^T||_F^2 for slots ``[n, inner, rest]``, blind to inner order.

    A parent group (KV heads, heads) is solved before its children (query heads,
    Q/K and V/O dims) are known, and the plain inner product of two heads is
    meaningless while their dims are scrambled. This similarity does not change under
    any reordering of a head's inner positions, and for an exact twin it is maximal
    (as an assignment) only at the true pairing: sum_g <S_g, S_sigma(g)> with
    S = A^T A is at most sum_g |S_g|^2 (Cauchy-Schwarz), with equality iff S_sigma(g) = S_g.
    """
    out = torch.empty(a.shape[0], p.shape[0], dtype=torch.float32, device=a.device)
    for g in range(a.shape[0]):
        gram = torch.einsum("ar,ibr->iab", a[g], p)  # [n, inner, inner]
        out[g] = gram.square().sum(dim=(1, 2))
    return out


def _solving_view(graph: MergeGraph, group: SymmetryGroup,
                  perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The permutations to apply while solving ``group``: itself identity, children by source."""
    local = dict(perms)
    local[group.id] = torch.arange(group.size, device=perms[group.id].device).expand_as(
        perms[group.id])
    for child in children(graph, group):
        local[child.id] = by_source(perms[child.id], perms[group.id])
    return local


def by_source(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Re-index a child's permutations from destination parent slots to source slots."""
    return child[torch.argsort(parent)]


def _sides(graph: MergeGraph, name: str, axis: int, gid: str, a: torch.Tensor, p: torch.Tensor,
           local: dict[str, torch.Tensor], keep_inner: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor and permuted peer as ``[problems, n, rest]`` for one member axis.

    With ``keep_inner``: ``[n, inner, rest]``, inner being the axis's other factors.
    """
    node = graph.nodes[name]
    a, p = a.float(), _permuted(node, p, local).float()  # permute at the stored width, then widen
    factors = node.axes[axis]
    sizes = [f.size for f in factors]
    pos = next(k for k, f in enumerate(factors) if f.group == gid)
    lead = [pos] if factors[pos].parent is None else [factors[pos].parent, pos]
    shape = (*a.shape[:axis], *sizes, *a.shape[axis + 1:])
    order = [axis + k for k in lead]
    rest = [d for d in range(len(shape)) if d not in order]

    if keep_inner:  # the axis's other factors next, in their order; then everything else
        order += [axis + k for k in range(len(factors)) if k != pos]
        rest = [d for d in range(len(shape)) if d not in order]
        inner = a.shape[axis] // sizes[pos]

    def arrange(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(shape).permute(*order, *rest)
        if keep_inner:
            return t.reshape(sizes[pos], inner, -1)
        batch = t.shape[0] if len(lead) == 2 else 1
        return t.reshape(batch, sizes[pos], -1)

    return arrange(a), arrange(p)


def apply_solution(graph: MergeGraph, gid: str, perms: dict[str, torch.Tensor],
                   cols: torch.Tensor) -> None:
    """Set group ``gid`` to the solved ``cols`` ([problems, n]: slot i takes peer slot cols[i])."""
    group = graph.groups[gid]
    new = cols.reshape(*group.batch, group.size).to(perms[gid].device)
    for child in children(graph, group):
        source = by_source(perms[child.id], perms[gid])
        perms[child.id] = source[new]
    perms[gid] = new


def inner_product(graph: MergeGraph, anchor: dict[str, torch.Tensor],
                  peer: dict[str, torch.Tensor], perms: dict[str, torch.Tensor]) -> float:
    """sum over the tensors given of <W_anchor, P(W_peer)> (fp64): the objective itself."""
    total = 0.0
    for name, a in anchor.items():
        p = graph.permute(name, peer[name], perms) if name in graph.nodes else peer[name]
        a, p = a.reshape(-1), p.reshape(-1)
        for start in range(0, a.numel(), DOT_CHUNK):  # bounded fp32 temporaries, fp64 sum
            x, y = a[start:start + DOT_CHUNK].float(), p[start:start + DOT_CHUNK].float()
            total += float((x * y).sum(dtype=torch.float64))
    return total
