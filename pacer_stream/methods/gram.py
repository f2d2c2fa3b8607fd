"""Gram matrices of M vectors, accumulated over a tensor's row slices, exactly.

The spherical methods (slerp, nuslerp, multislerp, karcher) and Model Stock need only
the M x M Gram matrix G_ij = <v_i, v_j> of their vectors (models or task vectors): norms
are sqrt(G_ii), cosines G_ij / sqrt(G_ii G_jj), and every result is sum_i c_i v_i with
coefficients computed from G. So one observation pass over the slices suffices, and the
merge pass writes sum_i c_i v_i slice by slice.

A vector is one of three things (``mode``):

* ``whole``: the whole tensor, flattened (one Gram matrix);
* ``rows``: each vector along the last axis (a matrix's rows; mergekit's ``dim=-1``);
  a row slice holds them whole, so no observation pass is needed;
* ``columns``: each vector along the first axis (a matrix's columns; ``dim=0``).

A vector (0-d or 1-d tensor) is one vector in every mode.

Same bytes for any slicing: every product is formed in fp64 (exact for fp32 inputs),
each row's sum is the same reduction whatever rows surround it, and rows are summed in
blocks of fixed absolute row ranges (``BLOCK_ELEMS`` elements), each block in one
reduction, then the blocks in one. No sum depends on where the slices were cut.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_ELEMS = 1 << 20  # fp32 elements cast to fp64 at once (accounting.GRAM_CHUNK_ELEMS)
BLOCK_ELEMS = 1 << 16  # tensor elements per summation block of rows


def pairs(m: int) -> list[tuple[int, int]]:
    """The upper triangle (i <= j) of an m x m matrix, row by row."""
    return [(i, j) for i in range(m) for j in range(i, m)]


def as_matrix(packed: torch.Tensor, m: int) -> torch.Tensor:
    """[..., m(m+1)/2] upper-triangle values -> [..., m, m] symmetric matrices."""
    out = torch.empty((*packed.shape[:-1], m, m), dtype=packed.dtype)
    for idx, (i, j) in enumerate(pairs(m)):
        out[..., i, j] = packed[..., idx]
        out[..., j, i] = packed[..., idx]
    return out


def row_products(v: torch.Tensor, reduce: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """Per row of ``v`` [m, r, ...] (fp32), in chunks of rows: (first row of the chunk,
    every pair's products in fp64 summed over the row when ``reduce`` [rows, K], else
    element by element [rows, row_numel, K]). One chunk holds about CHUNK_ELEMS values."""
    m, r = v.shape[0], v.shape[1] if v.dim() > 1 else 1
    flat = v.reshape(m, r, -1)
    k = m * (m + 1) // 2
    step = max(1, CHUNK_ELEMS // max(1, m * flat.shape[2]))
    for a in range(0, r, step):
        c = flat[:, a:a + step].double()
        rows = c.shape[1]
        out = torch.empty((rows, k) if reduce else (rows, flat.shape[2], k), dtype=torch.float64)
        for idx, (i, j) in enumerate(pairs(m)):
            prod = c[i] * c[j]
            out[..., idx] = prod.sum(-1) if reduce else prod
        yield a, out


def last_axis_gram(v: torch.Tensor) -> torch.Tensor:
    """``rows`` mode on a slice [m, r, ..., n]: the Gram matrix of every vector along the
    last axis, [r * (vectors per row), m, m] fp64."""
    m = v.shape[0]
    parts = [p for _, p in row_products(v.reshape(m, -1, v.shape[-1]), reduce=True)]
    return as_matrix(torch.cat(parts), m)


class BlockSum:
    """The sum over a tensor's rows of per-row values, in fixed blocks of rows, so that
    it is the same fp64 number however the rows arrive (in order) in slices."""

    def __init__(self, total_rows: int, row_numel: int) -> None:
        self.total_rows = total_rows
        self.block_rows = max(1, BLOCK_ELEMS // max(1, row_numel))
        self.seen = 0
        self.pending: list[torch.Tensor] = []
        self.blocks: list[torch.Tensor] = []

    def add(self, start: int, values: torch.Tensor) -> None:
        """Per-row values [r, ...] of rows [start, start + r), the next rows in order."""
        if start != self.seen:
            raise RuntimeError(f"rows must arrive in order: got {start}, expected {self.seen}")
        self.seen += values.shape[0]
        self.pending.append(values)
        buf = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
        while buf.shape[0] >= self.block_rows or (self.seen == self.total_rows and len(buf)):
            n = min(self.block_rows, buf.shape[0])
            self.blocks.append(buf[:n].contiguous().sum(0))
            buf = buf[n:]
        self.pending = [buf] if len(buf) else []

    def total(self) -> torch.Tensor:
        if self.seen != self.total_rows:
            raise RuntimeError(f"saw {self.seen} of {self.total_rows} rows")
        return torch.stack(self.blocks).sum(0)


class GramStats:
    """The Gram matrices of one tensor's M vectors (module docstring), slice by slice."""

    def __init__(self, shape: tuple[int, ...], m: int, mode: str) -> None:
        if mode not in ("whole", "rows", "columns"):
            raise ValueError(mode)
        self.m = m
        self.mode = "whole" if len(shape) < 2 else mode
        rows = shape[0] if shape else 1
        row_numel = 1
        for d in shape[1:]:
            row_numel *= d
        self.sums = BlockSum(rows, row_numel) if self.mode != "rows" else None

    @property
    def needs_observation(self) -> bool:
        """``rows`` vectors lie inside a row slice: their Gram matrices come with it."""
        return self.mode != "rows"

    def observe(self, start: int, v: torch.Tensor) -> None:
        """Add the rows [start, start + r) of the M vectors, ``v`` [M, r, ...] fp32."""
        for offset, values in row_products(v, reduce=self.mode == "whole"):
            self.sums.add(start + offset, values)

    def gram(self) -> torch.Tensor:
        """[groups, M, M] fp64: one group (``whole``) or one per column (``columns``)."""
        total = self.sums.total()
        return as_matrix(total.reshape(-1, total.shape[-1]), self.m)

    def local(self, v: torch.Tensor) -> torch.Tensor:
        """``rows`` mode: the slice's own Gram matrices, one per vector, [groups, M, M]."""
        return last_axis_gram(v)


class GramMerge:
    """A merge whose result is sum_k c_k v_k (+ an offset), the coefficients a function of
    the vectors' Gram matrices: the spherical methods and Model Stock. Same protocol as
    dense.TensorMerge (``passes``, ``split``, ``observe``, ``merge``).

    A subclass gives :meth:`points` (which vectors, and what is added back) and
    :meth:`coefficients` ([groups, M] from [groups, M, M]; an extra last column divides
    the sum, as mergekit's nuslerp writes it), and sets ``mode``. The sum is formed in
    fp32 as mergekit forms it: each c_k v_k rounded, then added in order.
    """

    mode = "whole"

    def __init__(self, name: str, shape: tuple[int, ...], params, base_index: int | None
                 ) -> None:
        self.name, self.shape, self.p, self.base_index = name, shape, params, base_index
        self.n = len(params.weights)
        self.stats = GramStats(shape, self.point_count(), self.mode_for(params))
        self._coefs: torch.Tensor | None = None

    # -- what a subclass says --------------------------------------------------------

    def mode_for(self, params) -> str:
        return self.mode

    def point_count(self) -> int:
        return self.n

    def points(self, x: torch.Tensor, base: torch.Tensor | None
               ) -> tuple[torch.Tensor | None, torch.Tensor]:
        raise NotImplementedError

    def coefficients(self, gram: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- the protocol ----------------------------------------------------------------

    @property
    def passes(self) -> list[str]:
        return ["gram"] if self.stats.needs_observation else []

    def split(self, x: torch.Tensor, base: torch.Tensor | None):
        """(offset, points): the vectors the Gram matrix is of, made from ``x`` [N, ...]."""
        return self.points(x, base)

    def observe(self, pass_name: str, rows: tuple[int, int], v: torch.Tensor) -> None:
        self.stats.observe(rows[0], v)

    def merge(self, rows: tuple[int, int], offset: torch.Tensor | None, v: torch.Tensor
              ) -> torch.Tensor:
        if self.stats.needs_observation:
            if self._coefs is None:
                self._coefs = self.coefficients(self.stats.gram()).to(torch.float32)
            coefs = self._coefs
        else:
            coefs = self.coefficients(self.stats.local(v)).to(torch.float32)
        m = v.shape[0]
        out = v[0].mul_(self._expand(coefs[:, 0], v))
        for k in range(1, m):
            out.add_(v[k].mul_(self._expand(coefs[:, k], v)))
        if coefs.shape[1] > m:
            out.div_(self._expand(coefs[:, m], v))
        return out.add_(offset) if offset is not None else out

    def _expand(self, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Coefficients per group [groups] shaped to broadcast over one point's rows."""
        c = c.to(v.device)
        if self.stats.mode == "whole":
            return c.reshape(())
        if self.stats.mode == "columns":
            return c.reshape(1, *v.shape[2:])
        return c.reshape(*v.shape[1:-1], 1)


def task_vectors(x: torch.Tensor, base: torch.Tensor | None, base_index: int | None
                 ) -> torch.Tensor:
    """The non-base models minus the base (in place, fp32 as mergekit subtracts), or the
    models themselves without a base. A base listed among the models is left out."""
    if base is None:
        return x
    x.sub_(base)
    if base_index is None:
        return x
    if base_index == 0:
        return x[1:]
    if base_index == x.shape[0] - 1:
        return x[:-1]
    keep = [k for k in range(x.shape[0]) if k != base_index]
    return x.index_select(0, torch.tensor(keep, device=x.device))
