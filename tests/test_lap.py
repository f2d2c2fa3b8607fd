"""Linear assignment for weight matching: optimality, certificate, batching, duals, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from pacer_stream.align import lap
from pacer_stream.align.lap import (available_solvers, maximize_assignment, maximize_assignments,
                                    row_max_certificate)
from pacer_stream.errors import PacerError

SOLVERS = available_solvers()


def scipy_best(cost: np.ndarray) -> float:
    """The optimum by scipy, in float64."""
    cost = np.asarray(cost, dtype=np.float64)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return float(cost[rows, cols].sum())


def tolerance(cost: np.ndarray) -> float:
    """How far a proven solution may sit from the optimum (see lap.RTOL)."""
    return cost.shape[0] * lap.RTOL[cost.dtype] * max(float(np.abs(cost).max(initial=0.0)), 1e-30)


def dominant(n: int, rng: np.random.Generator) -> np.ndarray:
    """Every row's maximum on the diagonal: identity + small noise, as fine-tunes look."""
    return np.eye(n) * 10.0 + rng.random((n, n))


def assert_permutation(cols: np.ndarray, n: int) -> None:
    assert cols.dtype == np.int64
    assert sorted(cols.tolist()) == list(range(n))


@pytest.mark.parametrize("n", [1, 2, 5, 50, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("as_torch", [False, True])
def test_optimal_like_scipy(n, dtype, as_torch):
    cost = np.random.default_rng(n).standard_normal((n, n)).astype(dtype)
    found = maximize_assignment(torch.from_numpy(cost) if as_torch else cost)
    assert_permutation(found.cols, n)
    assert found.objective == pytest.approx(scipy_best(cost), abs=tolerance(cost))
    picked = cost.astype(np.float64)[np.arange(n), found.cols]
    assert found.objective == pytest.approx(float(picked.sum()))
    assert found.identity_objective == pytest.approx(float(np.trace(cost.astype(np.float64))))
    if found.solver in {"certificate", "exhaustive", "lapjv"}:
        assert found.verified  # a proof came with it: certificate, enumeration or duals


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_solver_matches_scipy(solver, dtype):
    cost = np.random.default_rng(7).random((120, 120)).astype(dtype)
    found = maximize_assignment(cost, solver=solver)
    assert found.solver == solver and not found.certified
    assert_permutation(found.cols, 120)
    assert found.objective == pytest.approx(scipy_best(cost), abs=tolerance(cost))


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_exact_with_ties(solver):
    """Small integer similarities tie everywhere; the optimum is still exact."""
    cost = np.random.default_rng(3).integers(0, 4, (40, 40))
    found = maximize_assignment(cost, solver=solver)
    assert found.objective == scipy_best(cost)
    again = maximize_assignment(cost, solver=solver)
    assert np.array_equal(found.cols, again.cols)  # deterministic, ties included


def test_certificate_fires_on_dominant_diagonal():
    cost = dominant(64, np.random.default_rng(0)).astype(np.float32)
    cost[5, 9] = cost[5, 5]  # a tie with the diagonal keeps the proof
    assert row_max_certificate(cost)
    found = maximize_assignment(cost)
    assert (found.certified, found.verified, found.solver) == (True, True, "certificate")
    assert np.array_equal(found.cols, np.arange(64))
    assert found.objective == found.identity_objective


@pytest.mark.parametrize("solver", SOLVERS)
def test_certificate_fails_when_one_row_peaks_off_diagonal(solver):
    cost = dominant(64, np.random.default_rng(1))
    cost[5, 9] = cost[5, 5] + 20.0  # row 5 now prefers column 9, by more than anything costs
    assert not row_max_certificate(cost)
    found = maximize_assignment(cost, solver=solver)
    assert not found.certified and found.solver == solver
    assert found.cols[5] == 9
    assert found.objective > found.identity_objective
    assert found.objective == pytest.approx(scipy_best(cost))


@pytest.mark.parametrize("solver", ["auto", *SOLVERS])
def test_permuted_dominant_matrix_gives_the_inverse_permutation(solver):
    rng = np.random.default_rng(2)
    perm = rng.permutation(200)
    cost = dominant(200, rng)[:, perm]  # cost[i, j] = D[i, perm[j]]: row i peaks where perm[j] == i
    found = maximize_assignment(cost, solver=solver)
    assert np.array_equal(found.cols, np.argsort(perm))
    # Each row got its maximum, so even solvers without duals prove it (u = row max, v = 0).
    assert found.verified and not found.certified


@pytest.mark.parametrize("n", [4, 6, 16])
def test_batched_equals_one_by_one(n):
    rng = np.random.default_rng(n)
    costs = rng.standard_normal((12, n, n)).astype(np.float32)
    costs[::3] += np.eye(n, dtype=np.float32) * 10  # every third problem is certified
    batched = maximize_assignments(torch.from_numpy(costs))
    assert [a.certified for a in batched] == [k % 3 == 0 for k in range(12)]
    for k, found in enumerate(batched):
        single = maximize_assignment(costs[k])
        assert np.array_equal(found.cols, single.cols)
        assert (found.objective, found.certified, found.verified, found.solver) == \
            (single.objective, single.certified, single.verified, single.solver)
    assert {a.solver for a in batched} == {"certificate", "exhaustive" if n <= 6 else SOLVERS[0]}


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_exhaustive_equals_scipy(n):
    costs = np.random.default_rng(n).standard_normal((40, n, n))
    for cost, found in zip(costs, maximize_assignments(costs), strict=True):
        assert found.solver in {"exhaustive", "certificate"} and found.verified
        assert found.objective == pytest.approx(scipy_best(cost), rel=1e-12, abs=1e-12)


def test_trivial_and_empty_problems():
    empty = maximize_assignment(np.zeros((0, 0)))
    assert empty.cols.shape == (0,) and empty.certified and empty.objective == 0.0
    one = maximize_assignment(np.array([[-3.5]]))
    assert one.cols.tolist() == [0] and one.certified and one.objective == -3.5
    assert maximize_assignments(np.zeros((0, 4, 4))) == []


def test_dual_verifier_rejects_a_wrong_assignment():
    """Build a cost whose optimum and potentials are known: C = u_i + v_j - slack, slack >= 0."""
    rng = np.random.default_rng(4)
    n = 30
    u, v = rng.standard_normal(n), rng.standard_normal(n)
    best = rng.permutation(n)
    slack = rng.random((n, n)) + 0.1
    slack[np.arange(n), best] = 0.0
    cost = u[:, None] + v[None, :] - slack
    scale = float(np.abs(cost).max())
    assert lap._verify_with_duals(cost, best, u, v, scale)
    worse = best.copy()
    worse[[0, 1]] = worse[[1, 0]]
    assert not lap._verify_with_duals(cost, worse, u, v, scale)
    u[0] -= 0.05  # infeasible potentials prove nothing
    assert not lap._verify_with_duals(cost, best, u, v, scale)
    assert np.array_equal(maximize_assignment(cost).cols, best)


@pytest.mark.skipif("lapjv" not in SOLVERS, reason="lapjv not installed")
def test_lapjv_duals_prove_its_float32_solution():
    cost = np.random.default_rng(5).random((400, 400), dtype=np.float32)
    found = maximize_assignment(cost, solver="lapjv")
    assert found.verified
    assert found.objective == pytest.approx(scipy_best(cost), abs=tolerance(cost))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 4)), "square"),
    (np.zeros((0, 5)), "square"),
    (np.zeros((2, 3, 3)), "maximize_assignments"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), r"NaN or Inf \(row 0\)"),
    (np.array([[1.0, 0.0], [-np.inf, 1.0]], dtype=np.float32), r"NaN or Inf \(row 1\)"),
    (np.eye(3, dtype=bool), "real numbers"),
])
def test_bad_single_inputs(bad, message):
    with pytest.raises(PacerError, match=message):
        maximize_assignment(bad)


def test_bad_batched_inputs_and_solver_names():
    costs = np.zeros((4, 3, 3))
    costs[2, 1, 0] = np.nan
    with pytest.raises(PacerError, match=r"problem 2, row 1"):
        maximize_assignments(costs)
    with pytest.raises(PacerError, match=r"\[B, n, n\]"):
        maximize_assignments(np.zeros((3, 3)))
    with pytest.raises(PacerError, match="unknown LAP solver 'hungarian'; available: auto,.*scipy"):
        maximize_assignment(np.eye(3), solver="hungarian")
    with pytest.raises(PacerError, match="available: auto"):
        maximize_assignments(costs, solver="nope")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_bfloat16_tensors():
    cost = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    found = maximize_assignment(cost)
    assert found.objective == pytest.approx(scipy_best(cost.float().cpu().numpy()), abs=1e-3)
