"""Linear assignment for weight matching: certificate first, then an exact solver.

Weight matching pairs each anchor unit ``i`` with a peer unit ``cols[i]`` so that the
total similarity ``sum_i C[i, cols[i]]`` is as large as possible, so everything here
MAXIMIZES. Work is done in increasing order of cost:

1. the row-max certificate (O(n^2), no solver): when every row's maximum sits on the
   diagonal, the identity is optimal. Fine-tunes of one base usually pass it;
2. exhaustive search for tiny problems (n <= 6, head-level groups), vectorised;
3. an exact O(n^3) solver: ``lapjv`` (src-d: keeps float32, returns dual potentials;
   1-2x faster than ``lap`` and 3-5x faster than scipy at n = 8192 on 2 CPU cores),
   else ``lap`` (gatagat; float64 only, no potentials), else scipy.

Each result says whether optimality was *proven*. A solution ``cols`` is optimal when
some dual potentials ``u, v`` satisfy ``u_i + v_j >= C[i, j]`` for all ``i, j`` and
``sum(u) + sum(v) == objective`` (weak duality). ``lapjv`` hands back its potentials; we
recheck them in one chunked O(n^2) pass, so a solver bug or float32 rounding cannot
slip through. Solvers without potentials still get the free duals ``u = row max, v = 0``,
which prove any solution that gives every row its maximum.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import PacerError

__all__ = ["Assignment", "available_solvers", "maximize_assignment", "maximize_assignments",
           "row_max_certificate"]

EXHAUSTIVE_MAX_N = 6  # 720 permutations: one numpy pass for a whole batch, no solver calls

# Relative tolerance on the duality gap, per row and per unit of max|C|: a solution is
# "verified" when it is provably within n * RTOL * max|C| of the optimum. float32 keeps
# ~7 digits and lapjv accumulates its potentials in the input precision, so 1e-5 leaves
# ~100 ulps of headroom; float64 solves are held to 1e-9.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-9}

_CHUNK_ELEMENTS = 1 << 22  # float64 scratch per chunk in O(n^2) passes: 32 MiB

# The lapjv wheels (and its sdist on x86) are compiled with -march=haswell: on an older x86
# CPU importing them dies with SIGILL, which no try/except can catch, so look first.
_HASWELL_FLAGS = frozenset({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"})


@dataclass(frozen=True)
class Assignment:
    """One solved assignment problem (maximization).

    ``cols[i]`` is the column matched to row ``i``; ``objective`` and
    ``identity_objective`` are float64 sums of ``cost[i, cols[i]]`` and ``cost[i, i]``.
    ``verified`` means optimality was proven (certificate, checked duals, or exhaustive
    search), up to the tolerance described by :data:`RTOL`.
    """

    cols: np.ndarray  # int64 [n], a permutation of range(n)
    objective: float
    identity_objective: float
    certified: bool  # the row-max certificate proved the identity optimal without solving
    verified: bool
    solver: str  # "certificate" | "exhaustive" | "lapjv" | "lap" | "scipy"
    seconds: float


# --- solvers ----------------------------------------------------------------------------
# Each takes a finite square float32/float64 cost and returns (cols, duals or None), the
# duals being (u, v) of the MAXIMIZATION: u_i + v_j >= cost[i, j].

Duals = tuple[np.ndarray, np.ndarray]
Solver = Callable[[np.ndarray], tuple[np.ndarray, Duals | None]]


def _solve_lapjv(cost: np.ndarray) -> tuple[np.ndarray, Duals | None]:
    # lapjv minimises: negate into one C-contiguous copy of the same dtype (lapjv would
    # copy again for any other layout). force_doubles: without it lapjv silently casts
    # float64 to float32; float32 input stays float32, half the memory of float64.
    minimise = np.negative(cost, order="C")
    cols, _, (_, u, v) = _lapjv.lapjv(minimise, force_doubles=cost.dtype == np.float64)
    return cols.astype(np.int64), (-u, -v)


def _solve_lap(cost: np.ndarray) -> tuple[np.ndarray, Duals | None]:
    # lap works in float64 only: negating straight into float64 makes its one copy.
    minimise = np.negative(cost, dtype=np.float64, order="C")
    _, cols, _ = _lap.lapjv(minimise, extend_cost=False, return_cost=True)
    return cols.astype(np.int64), None


def _solve_scipy(cost: np.ndarray) -> tuple[np.ndarray, Duals | None]:
    _, cols = linear_sum_assignment(cost, maximize=True)
    return cols.astype(np.int64), None


def _cpu_runs_haswell_code() -> bool:
    """False on an x86 CPU that lacks the instructions the lapjv binaries assume."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return True  # elsewhere lapjv builds without the x86 tuning flags
    try:
        with Path("/proc/cpuinfo").open() as info:
            for line in info:
                if line.startswith("flags"):
                    return _HASWELL_FLAGS <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return True  # cannot tell (not Linux): trust the wheel's platform tag


def _import_optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


_lapjv = _import_optional("lapjv") if _cpu_runs_haswell_code() else None
_lap = _import_optional("lap")
# Fastest first: this is "auto"'s order. scipy is a hard dependency, always there.
_SOLVERS: dict[str, Solver] = {
    name: solve for name, solve, module in (("lapjv", _solve_lapjv, _lapjv),
                                            ("lap", _solve_lap, _lap),
                                            ("scipy", _solve_scipy, linear_sum_assignment))
    if module is not None}
_HOW_TO_GET = {"lapjv": "pip install lapjv; x86 builds need an AVX2 CPU",
               "lap": "pip install lap"}


def available_solvers() -> list[str]:
    """Names accepted by ``solver=`` besides ``"auto"``, in ``"auto"``'s order.

    >>> available_solvers()[-1]
    'scipy'
    """
    return list(_SOLVERS)


def _resolve_solver(solver: str) -> str:
    if solver == "auto":
        return next(iter(_SOLVERS))
    if solver in _SOLVERS:
        return solver
    choices = ", ".join(["auto", *_SOLVERS])
    if solver in _HOW_TO_GET:
        raise PacerError(f"LAP solver {solver!r} is not usable here ({_HOW_TO_GET[solver]}); "
                         f"available: {choices}")
    raise PacerError(f"unknown LAP solver {solver!r}; available: {choices}")


# --- input checks -------------------------------------------------------------------------


def _as_float_array(cost: object, what: str) -> np.ndarray:
    """numpy view (or the smallest exact copy) of ``cost`` as float32/float64, on the CPU."""
    if isinstance(cost, torch.Tensor):
        tensor = cost.detach()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()  # numpy has no bfloat16; solvers need f32/f64 anyway
        array = tensor.cpu().numpy()  # shares memory on the CPU; never written to
    else:
        array = np.asarray(cost)
    if array.dtype in (np.float32, np.float64):
        return array
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float64)  # exact for |x| < 2**53
    raise PacerError(f"{what} must hold real numbers, got dtype {array.dtype}")


def _row_extremes(costs: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Row maxima ``[B, n]`` and each problem's max|C| ``[B]``, after checking finiteness.

    Max and min propagate NaN and carry any Inf, so two reductions check finiteness
    without an n^2 boolean temporary (822 MB at n = 28672).
    """
    if costs.shape[2] == 0:  # n = 0: nothing to check, and max() has no identity
        return np.empty(costs.shape[:2], costs.dtype), np.zeros(costs.shape[0], costs.dtype)
    row_max, row_min = costs.max(axis=2), costs.min(axis=2)
    bad = ~(np.isfinite(row_max) & np.isfinite(row_min))
    if bad.any():
        problem, row = (int(k) for k in np.argwhere(bad)[0])
        where = f"row {row}" if costs.shape[0] == 1 else f"problem {problem}, row {row}"
        raise PacerError(f"{what} has NaN or Inf ({where}); similarities must be finite - "
                         "check the weights the cost was computed from")
    # Per problem, so one large-valued problem does not loosen its batch-mates' tolerance.
    scale = np.maximum(np.abs(row_max).max(axis=1, initial=0.0),
                       np.abs(row_min).max(axis=1, initial=0.0))
    return row_max, scale


def _check_shape(costs: np.ndarray, ndim: int, what: str) -> None:
    square = costs.ndim == ndim and costs.shape[-1] == costs.shape[-2]
    if not square:
        expected = "a square [n, n] matrix" if ndim == 2 else "a [B, n, n] stack of square matrices"
        hint = "; use maximize_assignments for a batch" if ndim == 2 and costs.ndim == 3 else ""
        raise PacerError(f"{what} must be {expected}, got shape {tuple(costs.shape)}{hint}")


# --- certificate, exhaustive search, verification ---------------------------------------------


def row_max_certificate(cost: object) -> bool:
    """True when every row's maximum is on the diagonal, which makes the identity optimal.

    No assignment can beat the sum of row maxima, and the identity attains it. Ties are
    allowed (``cost[i, i] >= max_j cost[i, j]``). O(n^2), no temporaries of size n^2.

    >>> row_max_certificate(np.array([[2.0, 1.0], [0.0, 3.0]]))
    True
    >>> row_max_certificate(np.array([[2.0, 5.0], [0.0, 3.0]]))
    False
    """
    array = _as_float_array(cost, "cost matrix")
    _check_shape(array, 2, "cost matrix")
    row_max, _ = _row_extremes(array[None], "cost matrix")
    return bool(_certified(array[None], row_max)[0])


def _certified(costs: np.ndarray, row_max: np.ndarray) -> np.ndarray:
    """Per problem of ``[B, n, n]``: does the row-max certificate hold? (bool ``[B]``)"""
    return (np.diagonal(costs, axis1=1, axis2=2) >= row_max).all(axis=1)


@functools.cache
def _permutations(n: int) -> np.ndarray:
    # Lexicographic order puts the identity first, and argmax keeps the first maximum,
    # so ties resolve to the identity (as the certificate would) and always the same way.
    perms = np.array(list(itertools.permutations(range(n))), dtype=np.int64)
    perms.flags.writeable = False
    return perms


def _exhaustive(costs: np.ndarray) -> np.ndarray:
    """Optimal ``cols`` ``[k, n]`` for ``k`` problems with n <= EXHAUSTIVE_MAX_N, by enumeration."""
    n = costs.shape[1]
    perms = _permutations(n)
    per_chunk = max(1, _CHUNK_ELEMENTS // perms.size)  # bounds the [chunk, n!, n] gather
    best = np.empty(costs.shape[0], dtype=np.int64)
    for start in range(0, costs.shape[0], per_chunk):
        chunk = costs[start:start + per_chunk]
        totals = chunk[:, np.arange(n), perms].sum(axis=2, dtype=np.float64)
        best[start:start + per_chunk] = totals.argmax(axis=1)
    return perms[best]


def _objective(cost: np.ndarray, cols: np.ndarray) -> float:
    return float(np.sum(cost[np.arange(cost.shape[0]), cols], dtype=np.float64))


def _dual_bound(cost: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """An upper bound on the optimum from potentials that may be slightly infeasible.

    With ``w = max_ij (C_ij - u_i - v_j)``, the potentials ``u + max(w, 0), v`` are
    feasible, so ``sum(u) + sum(v) + n * max(w, 0)`` bounds every assignment. Computed in
    float64 over row chunks: O(n^2) time, O(chunk) memory.
    """
    n = cost.shape[0]
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    # One reused buffer: fresh chunk allocations page-fault and double the pass's time.
    scratch = np.empty((min(n, max(1, _CHUNK_ELEMENTS // max(1, n))), n))
    worst = 0.0
    for start in range(0, n, scratch.shape[0]):
        block = scratch[:min(scratch.shape[0], n - start)]
        np.subtract(cost[start:start + block.shape[0]], v64, out=block)
        slack = block.max(axis=1) - u64[start:start + block.shape[0]]
        worst = max(worst, float(slack.max()))
    return float(u64.sum() + v64.sum()) + n * worst


def _gap_is_negligible(gap: float, cost: np.ndarray, scale: float) -> bool:
    return gap <= cost.shape[0] * RTOL[cost.dtype] * scale


def _verify_with_duals(cost: np.ndarray, cols: np.ndarray, u: np.ndarray, v: np.ndarray,
                       scale: float) -> bool:
    """True when ``(u, v)`` prove ``cols`` optimal for ``cost`` to within the tolerance."""
    return _gap_is_negligible(_dual_bound(cost, u, v) - _objective(cost, cols), cost, scale)


def _solve_exact(name: str, cost: np.ndarray, row_max: np.ndarray,
                 scale: float) -> tuple[np.ndarray, bool]:
    """Solve one problem with solver ``name``; returns (cols, verified)."""
    cols, duals = _SOLVERS[name](cost)
    n = cost.shape[0]
    if not np.array_equal(np.sort(cols), np.arange(n)):
        raise RuntimeError(f"LAP solver {name} returned a non-permutation for n = {n}")
    if duals is not None:
        return cols, _verify_with_duals(cost, cols, *duals, scale)
    # No potentials: u = row max, v = 0 are feasible by construction, so they cost nothing
    # to check and prove any solution that gives every row its maximum.
    bound = float(row_max.sum(dtype=np.float64))
    return cols, _gap_is_negligible(bound - _objective(cost, cols), cost, scale)


# --- public entry points ---------------------------------------------------------------------


def maximize_assignment(cost: object, *, solver: str = "auto") -> Assignment:
    """The permutation ``cols`` maximizing ``sum_i cost[i, cols[i]]``.

    ``cost`` is a square numpy array or torch tensor (any device; moved to the CPU),
    float32 or float64 (half precisions widen to float32, integers to float64). The
    row-max certificate is tried first; then, with ``solver="auto"``, exhaustive search
    for n <= 6, else the first of :func:`available_solvers`. The result is the same as
    ``maximize_assignments(cost[None])[0]``, and deterministic for a given installation.

    Peak memory beyond the input: lapjv one negated copy in the input's dtype (3.3 GB
    for float32 at n = 28672); lap one float64 copy; scipy one float64 copy, two for
    float32 input. Verification adds 32 MiB scratch.

    >>> a = maximize_assignment(np.array([[1.0, 9.0], [8.0, 2.0]]))
    >>> a.cols.tolist(), a.objective, a.identity_objective, a.solver, a.verified
    ([1, 0], 17.0, 3.0, 'exhaustive', True)

    Raises PacerError for a non-square or non-finite cost or an unknown solver.
    """
    start = time.perf_counter()
    name = _resolve_solver(solver)
    array = _as_float_array(cost, "cost matrix")
    _check_shape(array, 2, "cost matrix")
    (found,) = _maximize_batch(array[None], name, solver == "auto", "cost matrix", start)
    return found


def maximize_assignments(costs: object, *, solver: str = "auto") -> list[Assignment]:
    """:func:`maximize_assignment` for a ``[B, n, n]`` stack of small problems (heads).

    The certificate is checked for the whole batch in one vectorised pass and, with
    ``solver="auto"``, problems with n <= 6 are enumerated together; the rest go one by
    one to the solver. Each result's ``seconds`` is its own solve time plus an even share
    of the batch-wide passes, so they add up to the call's time.

    >>> import torch
    >>> found = maximize_assignments(torch.eye(3).repeat(4, 1, 1))
    >>> [a.certified for a in found]
    [True, True, True, True]
    """
    start = time.perf_counter()
    name = _resolve_solver(solver)
    array = _as_float_array(costs, "cost stack")
    _check_shape(array, 3, "cost stack")
    return _maximize_batch(array, name, solver == "auto", "cost stack", start)


def _maximize_batch(costs: np.ndarray, name: str, auto: bool, what: str,
                    start: float) -> list[Assignment]:
    """The shared core: certificate for all, exhaustive for tiny ones, solver for the rest.

    ``start`` is when the public call began, so input conversion counts in ``seconds``.
    """
    count, n = costs.shape[0], costs.shape[1]
    row_max, scale = _row_extremes(costs, what)
    certified = _certified(costs, row_max)
    identity = np.diagonal(costs, axis1=1, axis2=2).sum(axis=1, dtype=np.float64)
    cols = np.tile(np.arange(n, dtype=np.int64), (count, 1))
    solver = np.full(count, "certificate", dtype=object)
    verified = certified.copy()
    seconds = np.full(count, (time.perf_counter() - start) / max(1, count))

    todo = np.flatnonzero(~certified)
    if todo.size and auto and n <= EXHAUSTIVE_MAX_N:
        began = time.perf_counter()
        cols[todo] = _exhaustive(costs[todo])
        solver[todo], verified[todo] = "exhaustive", True
        seconds[todo] += (time.perf_counter() - began) / todo.size
    else:
        for k in todo:
            began = time.perf_counter()
            cols[k], verified[k] = _solve_exact(name, costs[k], row_max[k], float(scale[k]))
            solver[k] = name
            seconds[k] += time.perf_counter() - began

    return [Assignment(cols=cols[k].copy(), objective=_objective(costs[k], cols[k]),
                       identity_objective=float(identity[k]), certified=bool(certified[k]),
                       verified=bool(verified[k]), solver=str(solver[k]),
                       seconds=float(seconds[k]))
            for k in range(count)]

