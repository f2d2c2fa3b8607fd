"""Memory and cost accounting: one model of the working set, used by planner and executor.

The executor processes one tensor at a time (all N models' copies of it), so the
merge working set is that of the largest tensor, not of a whole unit; a tensor
whose working set exceeds the budget is processed in row slices. Alignment holds,
per symmetry group, an n × n cost matrix (fp32) plus the LAP solver's workspace
(fp64), and two operands at a time (anchor and one peer). Across the whole align
stage it carries the residual-stream cost (d × d, fp64, summed over all blocks).

The constants are documented so estimates can be checked against measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

COMPUTE_ITEMSIZE = 4  # all arithmetic in fp32
# RSS of a Python process with torch, safetensors and numpy imported, before any tensor.
PROCESS_BASE_BYTES = 300 * 10**6  # measured: 229 MB peak after importing pacer_stream.executor
# Per element of a tensor being merged: N fp32 inputs and four fp32 temporaries (the
# consensus, the mixed sum, the divisor, one product), a bool mask per input, the
# output at its own width, and the raw bytes of the next tensor being read ahead.
MERGE_TEMPORARIES = 4
# A LAP on an n x n problem: the fp32 cost matrix + the fp32 negated copy lapjv solves
# (scipy, the fallback where lapjv is missing, needs an fp64 copy on top).
LAP_BYTES_PER_CELL = 4 + 4
# Plan to use at most this share of the budget, leaving room for allocator
# fragmentation, the page cache's unevictable pages and Python objects.
HEADROOM = 0.85
COST_BLOCK_ELEMS = 1 << 24  # rows of a [vocab, d] tensor per alignment cost step


def usable(budget: int) -> int:
    """Bytes of the budget that tensors may occupy."""
    return int(budget * HEADROOM) - PROCESS_BASE_BYTES


def merge_bytes(numel: int, n_inputs: int, out_itemsize: int, in_itemsize: int = 4) -> int:
    """Working set to merge ``numel`` elements from ``n_inputs`` models."""
    per_element = (COMPUTE_ITEMSIZE * (n_inputs + MERGE_TEMPORARIES) + n_inputs + out_itemsize
                   + n_inputs * in_itemsize)
    return numel * per_element


def rows_per_slice(shape: tuple[int, ...], n_inputs: int, out_itemsize: int,
                   available: int, in_itemsize: int = 4) -> int | None:
    """Rows of a tensor to process at once so the merge fits in ``available`` bytes.

    Returns all rows when the whole tensor fits, fewer when it must be sliced, and
    None when not even one row fits.
    """
    rows = shape[0] if shape else 1
    row_numel = 1
    for dim in shape[1:]:
        row_numel *= dim
    per_row = merge_bytes(row_numel, n_inputs, out_itemsize, in_itemsize)
    if per_row == 0:
        return rows
    fit = available // per_row
    return None if fit < 1 else min(rows, fit)


def align_group_bytes(size: int) -> int:
    """Cost matrix + solver workspace for one assignment problem of ``size``."""
    return size * size * LAP_BYTES_PER_CELL


def align_unit_bytes(largest_numel: int, largest_itemsize: int, largest_group: int) -> int:
    """Aligning one unit against one peer (tensors are read when a cost needs them).

    One member tensor at a time: anchor and peer widened to fp32, the peer's permuted
    copy at its stored width, and a re-arranged fp32 copy of each where the axis has
    several factors; next to one cost matrix and its solver copy (the largest local
    group, or the d x d residual share).
    """
    return (largest_numel * (4 * COMPUTE_ITEMSIZE + largest_itemsize)
            + align_group_bytes(largest_group))


def align_unit_need(graph, unit) -> int:
    """Working set of aligning ``unit`` against one peer (see :func:`align_unit_bytes`)."""
    infos = [graph.nodes[t].info for t in unit.tensors]
    groups = [g.size for g in graph.groups.values() if g.unit == unit.name]
    residual = graph.groups.get("residual")  # the global group
    if residual is not None and any(t in unit.tensors for t, _ in residual.members):
        groups.append(residual.size)
    # [vocab, d] tensors are costed in row blocks (align.cost.COST_BLOCK_ELEMS)
    sizes = [(min(i.numel, COST_BLOCK_ELEMS) if _rows_summed(graph, t) else i.numel, i.itemsize)
             for t, i in zip(unit.tensors, infos)]
    numel, itemsize = max(sizes, default=(0, 0))
    return align_unit_bytes(numel, itemsize, max(groups, default=0))


def _rows_summed(graph, name: str) -> bool:
    node = graph.nodes[name]
    return len(node.axes) >= 2 and not any(f.group for f in node.axes[0])


def residual_cost_bytes(size: int) -> int:
    """The residual-stream cost accumulator (fp64, it sums over the whole model)."""
    return size * size * 8


@dataclass(frozen=True)
class Throughput:
    """Rates used for time estimates (measured where DESIGN.md gives a figure)."""

    gemm_flops: float  # fp32 GEMM FLOP/s
    lap_coeff: float  # seconds ~ lap_coeff * n ** 2.5 for one LAP of size n
    disk_read: float  # bytes/s
    disk_write: float  # bytes/s
    merge_elems: float  # element-model pairs merged per second (elementwise work)


# 2-core CPU of the dev machine: (8192 x 4096)(4096 x 8192) in 4.2 s => 1.3e11 FLOP/s;
# lapjv 0.7-2.6 s at n=8192 and 19-56 s at n=28672 => ~2.5e-10 * n^2.5.
CPU = Throughput(gemm_flops=1.3e11, lap_coeff=2.5e-10, disk_read=1.5e9, disk_write=1.0e9,
                 merge_elems=3e8)
# One H100/H200-class GPU: fp32 GEMM (no TF32) ~5e13 FLOP/s; the LAP stays on the CPU.
GPU = Throughput(gemm_flops=5e13, lap_coeff=2.5e-10, disk_read=1.5e9, disk_write=1.0e9,
                 merge_elems=2e10)


@dataclass(frozen=True)
class SlicePlan:
    """How one tensor is merged: rows per slice and the resulting working set."""

    rows: int  # rows per slice (all rows when the tensor fits whole)
    total_rows: int
    bytes: int
    fits: bool

    @property
    def sliced(self) -> bool:
        return self.rows < self.total_rows


def plan_tensor(shape: tuple[int, ...], n_inputs: int, out_itemsize: int, in_itemsize: int,
                budget: int) -> SlicePlan:
    """The one place that decides slicing, for planner and executor alike."""
    shape = shape or (1,)  # a scalar is one row of one element
    rows = rows_per_slice(shape, n_inputs, out_itemsize, usable(budget), in_itemsize)
    fits = rows is not None
    rows = rows or 1
    row_numel = 1
    for d in shape[1:]:
        row_numel *= d
    return SlicePlan(rows, shape[0], merge_bytes(rows * row_numel, n_inputs, out_itemsize,
                                                 in_itemsize), fits)
