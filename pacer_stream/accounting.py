"""Memory and cost accounting: one model of the working set, used by planner and executor.

The executor processes one tensor at a time (all N models' copies of it), so the
merge working set is that of the largest tensor, not of a whole unit; a tensor
whose working set exceeds the budget is processed in row slices. What one pass
over a tensor holds is a :class:`Work`: bytes per element of the rows in memory,
plus scratch that stops growing at a fixed chunk size. Alignment holds, per
symmetry group, a cost matrix (fp32) plus the LAP solver's workspace, and two
operands at a time (anchor and one peer). Across the whole align stage it carries
the residual-stream cost (d × d, fp64, summed over all blocks) of every peer it
aligns in one pass.

``usable(budget)`` is what tensors may occupy; a plan fits when every working set
is at most that, and :func:`budget_for` turns a working set back into the
smallest budget that holds it. The constants are documented with the
measurements they come from (VmHWM, glibc, 2-core dev machine, N = 3 bf16 models).
"""

from __future__ import annotations

from dataclasses import dataclass

COMPUTE_ITEMSIZE = 4  # all arithmetic in fp32
# RSS of the process during a run, before any large tensor: measured VmHWM of
# `pacer-stream run` on the tiny fixtures (tensors of a few KB): linear 293 MB, ties
# 296 MB, pacer 305 MB, split_merge 309 MB (277 MB right after importing the executor:
# torch, scipy, zarr; transformers is not imported).
PROCESS_BASE_BYTES = 320 * 10**6
# The base is 11-27 MB above those measurements, and the runs measured had every pass's
# constant scratch (histograms, seed blocks, fp64 chunks) at the tiny tensors' sizes: a
# pass's scratch is counted only above this much.
SCRATCH_IN_BASE = 8 * 10**6
# Plan to use at most this share of the budget, leaving room for allocator
# fragmentation, the page cache's unevictable pages and Python objects.
HEADROOM_PERCENT = 85
HEADROOM = HEADROOM_PERCENT / 100
COST_BLOCK_ELEMS = 1 << 24  # rows of a [vocab, d] tensor per alignment cost step
DOT_CHUNK_ELEMS = 1 << 22  # elements per step of the alignment objective (align.cost)
GRAM_CHUNK_ELEMS = 1 << 20  # elements per model cast to fp64 at once (methods.consensus)
MASK_BLOCK_ELEMS = 1 << 20  # elements per DARE seed block (methods.sparsify)
HIST_BYTES = 2 * (1 << 16) * 8  # TIES: two int64 radix histograms per input (methods.sparsify)
LAP_SCRATCH_ELEMS = 1 << 22  # fp64 scratch of the LAP's dual check, per chunk (align.lap)

# fp32 temporaries per element beside the N fp32 inputs while a dense method merges,
# counted in methods.dense and checked by measurement (peak bytes per element of a
# [32000, 512] tensor, N = 3 bf16 in and out; the formula below in brackets):
# linear 20 [20]; dare_ties 31 sliced [36]; ties 33 sliced [36], 49 whole [48 + 4 mask].
METHOD_TEMPORARIES = {"linear": 1, "task_arithmetic": 2, "dare_linear": 2, "ties": 5,
                      "dare_ties": 5,
                      # not measured; counted from the code: DELLA's rank argsorts (two
                      # int64 = 4 fp32 per element), draws and probabilities; Breadcrumbs'
                      # two masks as TIES'; the spherical methods and Model Stock a stack
                      # of the points (slerp without the base listed) and the sum
                      "della": 11, "della_linear": 8, "breadcrumbs": 3, "breadcrumbs_ties": 5,
                      "slerp": 3, "nuslerp": 2, "multislerp": 2, "karcher": 2,
                      "model_stock": 2, "passthrough": 0}
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")  # seeded draws
# int64 radix histograms per input of the exact top-k selections (methods.sparsify):
# TIES two levels, Breadcrumbs two selections sharing the first level
HISTOGRAMS = {"ties": 2, "breadcrumbs": 3, "breadcrumbs_ties": 3}
GRAM_METHODS = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock")  # methods.gram
MASK_BYTES = 2  # bool masks per element: a keep mask and its negation (TIES, DARE)
TIES_BITS = 4  # per input and element: the int32 magnitude bits of TIES' selection
# Elements per model copy that a dense merge computes on at once (executor): what it has
# read, the whole tensor or a slice, is widened to fp32 and merged in row chunks of this
# size. Measured on 3 x 0.3B bf16 Llamas (benchmarks/bench_dense.py machine): ties 10.1 s
# at 2^18, 11.2 s at 2^16, 12.3 s at 2^20 and 19.7 s at 2^22, where the buffers pass
# the 8 MiB mmap threshold (memory.steady_allocator) and every chunk faults in fresh
# pages; linear 4.1 / 4.3 / 6.6 / 7.5 s. Whole-tensor fp32 copies were the 2^22+ case.
COMPUTE_CHUNK_ELEMS = 1 << 18


def usable(budget: int) -> int:
    """Bytes of the budget that tensors may occupy (negative when the process alone
    does not fit)."""
    return budget * HEADROOM_PERCENT // 100 - PROCESS_BASE_BYTES


def budget_for(need: int) -> int:
    """The smallest budget whose :func:`usable` share holds ``need`` bytes."""
    return -(-(max(need, 0) + PROCESS_BASE_BYTES) * 100 // HEADROOM_PERCENT)


@dataclass(frozen=True)
class Work:
    """What one pass over a tensor holds: ``per_element`` bytes for every element of the
    rows in memory, plus ``scratch`` bytes per element for at most ``scratch_elems`` of
    them (chunked fp64 sums, DARE seed blocks) and ``fixed`` bytes (histograms)."""

    per_element: int
    scratch: int = 0
    scratch_elems: int = 0
    fixed: int = 0
    chunk: int = 0  # per element of the compute chunk (at most chunk_elems elements)
    chunk_elems: int = 0

    def bytes(self, numel: int, tensor_numel: int) -> int:
        """Working set for ``numel`` elements at once of a tensor of ``tensor_numel``."""
        scratch = min(tensor_numel, self.scratch_elems) * self.scratch + self.fixed \
            + min(tensor_numel, self.chunk_elems) * self.chunk
        return numel * self.per_element + max(scratch - SCRATCH_IN_BASE, 0)


# Copies of one input's bytes beside it while it is read: the reader copies what it
# reads once (io.reader); a re-based input (alignment) is read in runs of rows that are
# concatenated and put in order (executor._read_rows), two copies beside the runs.
READ_EXTRA_COPIES = 1
ALIGNED_READ_EXTRA_COPIES = 2
# ``align: only`` writes each peer's tensors whole: the runs, their concatenation, in order.
ALIGNED_READ_COPIES = 1 + ALIGNED_READ_EXTRA_COPIES


def read_per_element(n_inputs: int, in_itemsize: int, aligned: bool = False) -> int:
    """Reading a slice: every input's raw bytes, the copies made while one of them is
    read (:data:`READ_EXTRA_COPIES`), and the fp32 stack they become."""
    extra = ALIGNED_READ_EXTRA_COPIES if aligned else READ_EXTRA_COPIES
    return (n_inputs + extra) * in_itemsize + COMPUTE_ITEMSIZE * n_inputs


def raw_bytes(numel: int, n_inputs: int, in_itemsize: int, aligned: bool = False) -> int:
    """A tensor read whole (read ahead, or copied): every input's raw bytes and the
    copies made while one of them is read."""
    extra = ALIGNED_READ_EXTRA_COPIES if aligned else READ_EXTRA_COPIES
    return numel * (n_inputs + extra) * in_itemsize


def merge_work(method: str, n_inputs: int, out_itemsize: int, in_itemsize: int = 4,
               aligned: bool = False, row: int = 1) -> Work:
    """Merging with a dense ``method`` (methods.dense) from ``n_inputs`` models (base
    included), rows of ``row`` elements: the slice as read, and the fp32 work of one
    compute chunk (:func:`compute_chunks`) at a time."""
    histograms = HISTOGRAMS.get(method, 0)
    compute = (COMPUTE_ITEMSIZE * (n_inputs + METHOD_TEMPORARIES[method]) + MASK_BYTES
               + out_itemsize + (n_inputs * TIES_BITS if histograms else 0))
    random = method in RANDOM_METHODS  # each model's newest seed block of fp32 draws (kept
    # across the chunks inside it), and two partial blocks
    gram = method in GRAM_METHODS  # fp64 chunks: a point's copy and one product at a time
    return Work(raw_bytes(1, n_inputs, in_itemsize, aligned),
                scratch=COMPUTE_ITEMSIZE * n_inputs + 2 if random
                else 8 * (n_inputs + 1) if gram else 0,
                scratch_elems=MASK_BLOCK_ELEMS if random else GRAM_CHUNK_ELEMS if gram else 0,
                fixed=n_inputs * HIST_BYTES * histograms // 2,
                chunk=compute, chunk_elems=max(COMPUTE_CHUNK_ELEMS, row))


# Passes a method makes over a tensor before merging it (methods.dense.TensorMerge.passes,
# methods.gram): a tensor read in budget slices is read again for each of them.
SELECTION_PASSES = {"ties": 2, "breadcrumbs": 2, "breadcrumbs_ties": 2}  # two radix levels
L1_RESCALED = ("dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs",
               "breadcrumbs_ties")  # with rescale: l1, the L1 norms before the merge
DEFAULT_L1 = ("della", "della_linear")  # methods.dense.METHODS: l1 by default


def observation_passes(method: str, rescale: str | None = None) -> int:
    """Reads of a sliced tensor before its merge pass, for ``method`` with ``rescale``
    (None: the method's default). The Gram methods count one (rows mode needs none)."""
    l1 = method in L1_RESCALED and (rescale or ("l1" if method in DEFAULT_L1 else "")) == "l1"
    return SELECTION_PASSES.get(method, 0) + (1 if method in GRAM_METHODS else 0) + int(l1)


def compute_chunks(shape: tuple[int, ...], rows: tuple[int, int]) -> list[tuple[int, int]]:
    """Row ranges of about COMPUTE_CHUNK_ELEMS elements (at least one row) covering
    ``rows`` of a tensor; a scalar is one chunk."""
    if not shape:
        return [rows]
    step = max(1, COMPUTE_CHUNK_ELEMS // max(row_numel(shape), 1))
    return [(r, min(r + step, rows[1])) for r in range(rows[0], rows[1], step)]


def copies_work(copies: int, n_inputs: int, out_itemsize: int, in_itemsize: int = 4,
                aligned: bool = False) -> Work:
    """A pass that holds ``copies`` fp32 values per element (Split-Merge's split_copies),
    :data:`COPIES_TEMPORARIES` more (selected entries, their int64 positions), a mask and
    a raw copy per copy, and the output. Measured on a [32000, 512] bf16 embedding
    merged whole, N = 3, density 1 (every entry selected): 73 B/element against 78."""
    compute = (COMPUTE_ITEMSIZE * (copies + COPIES_TEMPORARIES) + copies * (1 + in_itemsize)
               + out_itemsize)
    return Work(max(read_per_element(n_inputs, in_itemsize, aligned), compute))


COPIES_TEMPORARIES = 5


def expert_work(n_models: int, n_inputs: int, out_itemsize: int, in_itemsize: int = 4,
                aligned: bool = False) -> Work:
    """Writing every expert of one upcycled MLP tensor (:func:`expert_copies` fp32 copies,
    the base model's if there is one, and one expert's output at a time), after the read."""
    compute = COMPUTE_ITEMSIZE * (expert_copies(n_models) + n_inputs - n_models) + out_itemsize
    return Work(max(read_per_element(n_inputs, in_itemsize, aligned), compute))


def expert_copies(n_models: int) -> int:
    """fp32 copies an upcycled MLP tensor's slice holds while its experts are written:
    the N models, the consensus, M <= N expert means, and a mean's difference to the
    consensus with its absolute value (the router sums)."""
    return 2 * n_models + 3


def stats_work(n_models: int, has_base: bool, in_itemsize: int, aligned: bool = False) -> Work:
    """PACER's statistics pass (methods.consensus.PartStats.add): the read, and per fp64
    chunk the models' values, their mean, the centered copy's products (and τ with a base)."""
    n_inputs = n_models + (1 if has_base else 0)
    chunk = 8 * n_models + 16 + (8 * n_models if has_base else 0)
    return Work(read_per_element(n_inputs, in_itemsize, aligned), scratch=chunk,
                scratch_elems=GRAM_CHUNK_ELEMS)


def row_numel(shape: tuple[int, ...]) -> int:
    """Elements in one row (one index of the first axis); a scalar is one row of one."""
    numel = 1
    for dim in shape[1:]:
        numel *= dim
    return numel


def rows_per_slice(shape: tuple[int, ...], work: Work, available: int) -> int | None:
    """Rows of a tensor to process at once so ``work`` fits in ``available`` bytes.

    Returns all rows when the whole tensor fits, fewer when it must be sliced, and
    None when not even one row fits.
    """
    rows = shape[0] if shape else 1
    row = row_numel(shape)
    numel = rows * row
    if work.bytes(numel, numel) <= available:
        return rows
    per_row = work.bytes(row, numel) - work.bytes(0, numel)
    fit = (available - work.bytes(0, numel)) // max(per_row, 1)
    if fit < 1 or rows == 1:
        return None
    return min(rows - 1, fit)  # sliced, even where all rows would fit as slices


def one_row_bytes(shape: tuple[int, ...], work: Work) -> int:
    """The smallest working set of ``work`` on this tensor: one row (all of it if one row)."""
    shape = shape or (1,)
    row = row_numel(shape)
    return work.bytes(row, shape[0] * row)


# Per cell of an assignment problem: the fp32 cost matrix while the member tensors are
# costed into it; then, with the tensors freed, the cost and lapjv's fp32 negated copy
# (align.lap), or for the residual share the cost and the fp64 copy that is added to
# the accumulator (align.stage: cost.double()).
COST_BYTES_PER_CELL = 4
LAP_BYTES_PER_CELL = 4 + 4
RESIDUAL_BYTES_PER_CELL = 4 + 8


def align_unit_bytes(largest_numel: int, largest_itemsize: int, block_numel: int,
                     local_cells: int, residual_cells: int) -> int:
    """Aligning one unit against one peer (tensors are read when a cost needs them).

    Costing: the largest member tensor, anchor and peer, whole at their stored width,
    with the reader's copy while one is read and the peer's permuted copy; of the rows
    costed at once (``block_numel``: [vocab, d] tensors go in row blocks), anchor and
    peer widened to fp32 and re-arranged (two fp32 copies each) with the peer's permuted
    rows at their stored width; next to the largest cost matrix. Solving: a local group's
    cost and solver copy, or the residual share's cost and fp64 copy. Measured on the
    [32000, 1024] bf16 embeddings of three models: 65 + 65 MB read, a 65 MB copy and
    4 x 67 MB of fp32 blocks at the peak.
    """
    tensors = (largest_numel * 3 * largest_itemsize
               + max(block_numel * (4 * COMPUTE_ITEMSIZE + largest_itemsize),
                     min(largest_numel, DOT_CHUNK_ELEMS) * 3 * COMPUTE_ITEMSIZE))
    costing = tensors + max(local_cells, residual_cells) * COST_BYTES_PER_CELL
    cells = max(local_cells, residual_cells)
    solving = (max(local_cells * LAP_BYTES_PER_CELL, residual_cells * RESIDUAL_BYTES_PER_CELL)
               + max(min(cells, LAP_SCRATCH_ELEMS) * 8 - SCRATCH_IN_BASE, 0))
    return max(costing, solving)


def align_unit_need(graph, unit) -> int:
    """Working set of aligning ``unit`` against one peer (see :func:`align_unit_bytes`)."""
    infos = [graph.nodes[t].info for t in unit.tensors]
    local = max((g.problems * g.size * g.size for g in graph.groups.values()
                 if g.unit == unit.name), default=0)
    residual = graph.groups.get("residual")  # the global group
    shares = residual is not None and any(t in unit.tensors for t, _ in residual.members)
    # [vocab, d] tensors are costed in row blocks (align.cost.COST_BLOCK_ELEMS)
    sizes = [(i.numel, i.itemsize, min(i.numel, COST_BLOCK_ELEMS)
              if _rows_summed(graph, t) else i.numel) for t, i in zip(unit.tensors, infos)]
    numel, itemsize, block = max(sizes, default=(0, 0, 0))
    return align_unit_bytes(numel, itemsize, block, local,
                            residual.size ** 2 if shares else 0)


def align_bytes(unit_need: int, d: int, peers: int) -> int:
    """The align stage: one unit's working set beside ``peers`` residual accumulators.

    The one function that decides how many peers one pass aligns (align.stage) and
    what the plan says alignment needs (planner, with one peer: the minimum)."""
    return unit_need + peers * residual_cost_bytes(d)


def peers_that_fit(unit_need: int, d: int, budget: int) -> int:
    """How many peers' residual accumulators fit beside one unit (0: not even one)."""
    free = usable(budget) - unit_need
    return max(free, 0) // max(residual_cost_bytes(d), 1)


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


# Seconds every run pays before reading a byte: Python, torch and pacer-stream imported
# (benchmarks/bench_dense.py: 1.4-1.9 s on the 2-core dev machines, 1.63 s in the last
# run). CUDA's own start-up is not in it (no GPU measured yet).
STARTUP_SECONDS = 1.6
# The merge's elementwise time per element-model pair, relative to CPU/GPU merge_elems:
# measured by benchmarks/bench_dense.py (results/dense-vm.md, 3 x 0.3B bf16 Llama, AMD
# EPYC 2 cores; compute in row chunks, accounting.compute_chunks): linear 0.6, ties 2.2,
# dare_ties 3.2 (its seeded draws; TIES's two observation passes). The methods not
# measured take the figure of the measured one whose passes they share: one pass
# (linear), random draws (DARE), or observation passes before the merge (TIES).
MERGE_COST = {"linear": 0.6, "task_arithmetic": 0.6, "passthrough": 0.6,
              "dare_linear": 3.2, "dare_ties": 3.2, "della": 3.2, "della_linear": 3.2,
              "ties": 2.2, "breadcrumbs": 2.2, "breadcrumbs_ties": 2.2, "slerp": 2.2,
              "nuslerp": 2.2, "multislerp": 2.2, "karcher": 2.2, "model_stock": 2.2}


def merge_cost(method: str) -> float:
    """The elementwise cost factor of a method (MERGE_COST; linear's for anything else)."""
    return MERGE_COST.get(method, MERGE_COST["linear"])


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


def plan_tensor(shape: tuple[int, ...], work: Work, budget: int) -> SlicePlan:
    """The one place that decides slicing, for planner and executor alike."""
    shape = shape or (1,)  # a scalar is one row of one element
    rows = rows_per_slice(shape, work, usable(budget))
    fits = rows is not None
    rows = rows or 1
    row = row_numel(shape)
    return SlicePlan(rows, shape[0], work.bytes(rows * row, shape[0] * row),
                     fits)


def read_ahead_fits(current: int, numel: int, n_inputs: int, in_itemsize: int,
                    budget: int, aligned: bool = False) -> bool:
    """Whether the next tensor may be read while the current one (``current`` bytes of
    working set) is merged: only into room the budget has left."""
    return current + raw_bytes(numel, n_inputs, in_itemsize, aligned) <= usable(budget)


def split_copies(n: int) -> int:
    """fp32 copies of a slice a Split-Merge pass holds: the n deviations, their squares
    (variance), and the selected deviations with their fp64 chunks (gram, eta)."""
    return 2 * n + 2
