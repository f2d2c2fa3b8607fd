"""Sparsifying task vectors: magnitude top-k (TIES) and random drop (DARE).

Both work on a tensor one row slice at a time and give the same answer whatever
the slicing, so a merge is identical under any memory budget:

* Magnitude: the k-th largest |delta| is found exactly by a two-level radix select
  over the float32 bit patterns (non-negative floats sort like their bits), from
  histograms that can be accumulated slice by slice. Elements above the threshold
  are kept; of those equal to it, the first ones in flat index order, so exactly
  k = max(1, int(density * numel)) survive (mergekit's count).
* Random: a keep mask drawn from a generator seeded by (seed, tensor, model, row
  block): the same bits on every run, device, slicing and resume. DARE keeps an
  entry with probability ``density``; DELLA with a probability set by its
  magnitude rank in its row (:func:`della_probabilities`).
* Outliers (Model Breadcrumbs): drop the largest ``gamma`` share and the smallest
  entries by magnitude, keeping a band of ranks (:class:`OutlierBand`), from the
  same exact top-k selections.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from ..seeding import generator

HIST_BINS = 1 << 16
MASK_BLOCK_ELEMS = 1 << 20  # rows per DARE seed block: about a million elements


def keep_count(density: float, numel: int) -> int:
    """How many elements magnitude pruning keeps (0 only for empty tensors)."""
    if numel == 0:
        return 0
    return numel if density >= 1 else max(1, int(density * numel))


class MagnitudeSelect:
    """Exact streaming top-k by magnitude for one model's delta of one tensor.

    Feed the bits (:func:`magnitude_bits`) of every slice to :meth:`observe_high`,
    then of every slice to :meth:`observe_low`, then call :meth:`mask` on the
    slices in order. A whole tensor is simply one slice.
    """

    def __init__(self, numel: int, density: float, count: int | None = None) -> None:
        self.k = keep_count(density, numel) if count is None else count
        self.keep_all = self.k >= numel
        self.keep_none = self.k <= 0  # only with an explicit count (OutlierBand)
        self.high: torch.Tensor | int = 0  # histograms, allocated by the first bincount
        self.low: torch.Tensor | int = 0
        self.bin: int | None = None
        self.k_in_bin = 0
        self.threshold: int | None = None
        self.ties_left = 0

    def observe_high(self, bits: torch.Tensor) -> None:
        if not (self.keep_all or self.keep_none):
            self.high += torch.bincount(bits >> 16, minlength=HIST_BINS).cpu()

    def observe_low(self, bits: torch.Tensor) -> None:
        if self.keep_all or self.keep_none:
            return
        self.find_bin()
        lo = self.bin << 16  # the bin is a range of bit patterns: compare, no shifting
        inside = bits[(bits >= lo) & (bits < lo + HIST_BINS)] - lo
        self.low += torch.bincount(inside, minlength=HIST_BINS).cpu()

    def find_bin(self) -> None:
        """The high bin that holds the k-th value, once every slice's high bits are in."""
        if self.bin is None and not (self.keep_all or self.keep_none):
            self.bin, self.k_in_bin = _select(self.high, self.k)

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        """Keep-mask (flat) for the next slice, in order."""
        if self.keep_all or self.keep_none:
            return torch.full(bits.shape, self.keep_all, dtype=torch.bool, device=bits.device)
        if self.threshold is None:
            self.threshold, self.ties_left = self.cut()
        keep, self.ties_left = threshold_mask(bits, self.threshold, self.ties_left)
        return keep

    def prune_(self, values: torch.Tensor, bits: torch.Tensor) -> None:
        """Zero, in place, what top-k drops from the next slice, in order: ``values`` is the
        slice's task vector (contiguous), ``bits`` its :func:`magnitude_bits`. The same bytes
        as ``values[~mask(bits)] = 0``, at a fraction of the cost: ``hardshrink`` zeroes
        exactly the x with |x| <= t (writing +0, keeping NaN and inf, as the bit compare
        does), and only the ties kept at the threshold are indexed."""
        if self.keep_all:
            return
        if self.keep_none:
            values.zero_()
            return
        if self.threshold is None:
            self.threshold, self.ties_left = self.cut()
        flat = values.view(-1)  # a view: the zeros land in ``values``
        if self.threshold >= INF_BITS:  # an inf or NaN threshold: the bit compare only
            keep, self.ties_left = threshold_mask(bits, self.threshold, self.ties_left)
            flat.masked_fill_(~keep, 0)
            return
        ties = kept = None
        if self.ties_left > 0:
            ties = torch.nonzero(bits == self.threshold).reshape(-1)[:self.ties_left]
            self.ties_left -= len(ties)
            kept = flat[ties]
        torch.hardshrink(flat, _as_float(self.threshold), out=flat)
        if ties is not None:
            flat[ties] = kept

    def restart(self) -> None:
        """Start handing out masks from the first slice again (a second pass over the
        slices: the L1 sums before the merge)."""
        self.threshold = None

    def cut(self) -> tuple[int, int]:
        """(threshold bits, how many elements equal to it are kept), once both passes ran."""
        low_bin, ties = _select(self.low, self.k_in_bin)
        return (self.bin << 16) | low_bin, ties


class OutlierBand:
    """Model Breadcrumbs' selection for one model's delta of one tensor: with
    n_top = int(gamma * numel) and target = int(density * numel), drop the smallest
    n_bot = max(0, numel - target - n_top) entries by magnitude and keep the next
    ``target`` (mergekit's ``magnitude_outliers``): the largest n_top are dropped, fewer
    when the target needs them. That band is the top (numel - n_bot) minus the top
    (numel - n_bot - target), two exact selections fed the same bits (same interface
    as :class:`MagnitudeSelect`); ties break by flat index, the same way in both."""

    def __init__(self, numel: int, density: float, gamma: float) -> None:
        self.keep_all = density >= 1  # mergekit: no pruning at all then, whatever gamma
        target = int(density * numel)
        n_bot = max(0, numel - target - int(gamma * numel))
        self.outer = MagnitudeSelect(numel, density, count=numel - n_bot)
        self.inner = MagnitudeSelect(numel, density, count=numel - n_bot - target)
        self.high: torch.Tensor | int = 0

    def observe_high(self, bits: torch.Tensor) -> None:
        if not self.keep_all:  # one first-level histogram: both selections see the same bits
            self.high += torch.bincount(bits >> 16, minlength=HIST_BINS).cpu()
            self.outer.high = self.inner.high = self.high

    def observe_low(self, bits: torch.Tensor) -> None:
        if not self.keep_all:
            self.outer.observe_low(bits)
            self.inner.observe_low(bits)

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        if self.keep_all:
            return torch.ones(bits.shape, dtype=torch.bool, device=bits.device)
        return self.outer.mask(bits) & ~self.inner.mask(bits)

    def prune_(self, values: torch.Tensor, bits: torch.Tensor) -> None:
        if not self.keep_all:
            values.view(-1).masked_fill_(~self.mask(bits), 0)

    def restart(self) -> None:
        self.outer.restart()
        self.inner.restart()


def threshold_mask(bits: torch.Tensor, threshold: int, ties_left: int) -> tuple[torch.Tensor, int]:
    """Keep bits above ``threshold`` and the first ``ties_left`` equal to it (flat order).

    Returns the mask and the ties still to keep in later slices.
    """
    keep = bits > threshold
    if ties_left > 0:
        equal = torch.nonzero(bits == threshold).reshape(-1)[:ties_left]
        keep[equal] = True
        ties_left -= len(equal)
    return keep, ties_left


INF_BITS = 0x7F800000  # float32 +inf; larger bit patterns are NaNs


def _as_float(bits: int) -> float:
    """The float32 whose bit pattern is ``bits`` (exact as a Python float)."""
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as flat int32 bit patterns: for non-negative floats, bits order like values.

    The float abs() clears the sign bit; it runs vectorised where an integer mask does not.
    """
    return delta.float().abs().view(torch.int32).reshape(-1)


def _select(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and k's rank inside that bin."""
    # counts from the top bin down: at_or_above[i] is the count in bins >= last - i
    at_or_above = np.cumsum(hist.numpy()[::-1])
    i = int(np.searchsorted(at_or_above, k))  # the first i whose count reaches k
    strictly_above = int(at_or_above[i - 1]) if i > 0 else 0
    return len(at_or_above) - 1 - i, k - strictly_above


def dare_keep(shape: tuple[int, ...], rows: tuple[int, int], density: float, seed: int,
              tensor: str, model: int, blocks: dict | None = None) -> torch.Tensor:
    """DARE keep-mask for rows [start, stop) of a tensor (same bits for any slicing)."""
    return uniform_draws(shape, rows, seed, tensor, model, blocks) < density


def uniform_draws(shape: tuple[int, ...], rows: tuple[int, int], seed: int, tensor: str,
                  model: int, blocks: dict | None = None) -> torch.Tensor:
    """U[0, 1) draws for rows [start, stop) of a tensor, from generators seeded by (seed,
    tensor, model, row block): the same numbers for any slicing. An entry is kept when
    its draw is below its keep probability (DARE: density; DELLA: its own).

    ``blocks`` (one dict per model and tensor) keeps the newest block drawn: a caller
    going through the rows in order in pieces smaller than a block (the executor's
    compute chunks) draws each block once, not once per piece."""
    start, stop = rows
    row_numel = 1
    for d in shape[1:]:
        row_numel *= d
    block_rows = max(1, MASK_BLOCK_ELEMS // max(row_numel, 1))
    parts = []
    for block in range(start // block_rows, (stop - 1) // block_rows + 1 if stop > start else 0):
        b0, b1 = block * block_rows, min((block + 1) * block_rows, shape[0] if shape else 1)
        draw = blocks.get(block) if blocks is not None else None
        if draw is None:
            draw = torch.rand((b1 - b0, *shape[1:]), generator=generator(seed, tensor, model,
                                                                          block))
            if blocks is not None:
                blocks.clear()
                blocks[block] = draw
        parts.append(draw[max(start, b0) - b0:min(stop, b1) - b0])
    if not parts:
        return torch.zeros((0, *shape[1:]))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def della_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities (mergekit's ``della_magprune``): within each row (axis 1
    of a tensor of >= 2 axes; a vector is one row) the entries are ranked by magnitude,
    r = 0 for the smallest to n - 1 for the largest (ties by position), and kept with

        p = (density - epsilon) + 2 * epsilon * r / (n - 1)

    so the mean keep rate is ``density``; a row of one entry gets p = density."""
    m = magnitudes if magnitudes.dim() >= 2 else magnitudes.reshape(1, -1)
    n = m.shape[1]
    ranks = torch.argsort(torch.argsort(m, dim=1, stable=True), dim=1).to(torch.float32)
    if n < 2:
        return torch.full(magnitudes.shape, density, dtype=torch.float32)
    return ((density - epsilon) + ranks.div_(n - 1).mul_(2 * epsilon)).reshape(magnitudes.shape)
