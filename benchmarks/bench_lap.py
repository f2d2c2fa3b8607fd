#!/usr/bin/env python
"""Assignment-solver benchmark: scipy vs pacer-stream's LAP path, plus the cost GEMM.

For each size n, on float32 costs of three kinds:

* ``random``: uniform [0, 1) similarities, the hard case (models from different seeds);
* ``near-identity``: identity + 0.01 * N(0, 1), how fine-tunes of one base look; the
  row-max certificate proves the identity without any solver;
* ``near-identity-1%``: the same with 1% of rows rotated, so the certificate fails and a
  solver runs (but on an easy instance).

it times scipy's ``linear_sum_assignment(maximize=True)``, the primary solver alone
(first of ``available_solvers()``, on the negated matrix, no checks), and
``maximize_assignment`` as the engine calls it (certificate, solver, dual verification).
It also times the similarity GEMM ``(n x 4096) @ (4096 x n)`` in float32 with torch, on
the CPU and, with ``--device cuda``, on the GPU. Results go to
``benchmarks/results/lap-<host>.{json,md}``.

    python benchmarks/bench_lap.py [--sizes 512,2048,8192] [--device cpu|cuda]

Each timing is the best of 3 runs for n <= 2048 and a single run above (n = 8192 takes
seconds, 28672 minutes and ~7 GB with scipy).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pacer_stream.align import lap  # noqa: E402

INNER = 4096  # GEMM inner dimension: a typical hidden size
KINDS = ("random", "near-identity", "near-identity-1%")


def make_cost(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random((n, n), dtype=np.float32)
    cost = np.eye(n, dtype=np.float32) + 0.01 * rng.standard_normal((n, n), dtype=np.float32)
    if kind == "near-identity-1%":
        rows = rng.choice(n, max(2, n // 100), replace=False)
        cost[rows] = cost[np.roll(rows, 1)]  # those units moved: identity is no longer optimal
    return cost


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` runs and the last result (gc off: no collector noise)."""
    times, result = [], None
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        gc.enable()
    return min(times), result


def raw_primary(cost: np.ndarray) -> np.ndarray:
    """The primary solver with nothing around it: what the certificate and checks add to."""
    solve = lap._SOLVERS[lap.available_solvers()[0]]
    return solve(cost)[0]


def objective(cost: np.ndarray, cols: np.ndarray) -> float:
    return float(cost[np.arange(cost.shape[0]), cols].sum(dtype=np.float64))


def bench_lap(kind: str, n: int, repeats: int) -> dict:
    cost = make_cost(kind, n)
    scipy_s, (_, scipy_cols) = best_time(
        lambda: linear_sum_assignment(cost, maximize=True), repeats)
    raw_s, raw_cols = best_time(lambda: raw_primary(cost), repeats)
    pacer_s, found = best_time(lambda: lap.maximize_assignment(cost), repeats)
    best = objective(cost, scipy_cols)
    return {
        "kind": kind, "n": n, "repeats": repeats,
        "scipy_s": scipy_s, "primary_raw_s": raw_s, "pacer_s": pacer_s,
        "ratio_scipy_over_primary_raw": scipy_s / raw_s,
        "ratio_scipy_over_pacer": scipy_s / pacer_s,
        "pacer_solver": found.solver, "certified": found.certified, "verified": found.verified,
        "objective_gap_primary_raw": best - objective(cost, raw_cols),
        "objective_gap_pacer": best - found.objective,
        "units_moved": int((found.cols != np.arange(n)).sum()),
    }


def bench_gemm(n: int, device: str, repeats: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, INNER, generator=gen, device=device)
    b = torch.randn(n, INNER, generator=gen, device=device)

    def run() -> torch.Tensor:
        out = a @ b.T
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # warm-up: BLAS/cuBLAS initialisation is not the GEMM's cost
    return best_time(run, repeats)[0]


def package_versions() -> dict:
    versions = {}
    for name in ("numpy", "scipy", "torch", "lapjv", "lap"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine(device: str) -> dict:
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), "")
    info = {"host": platform.node(), "cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "packages": package_versions(), "solvers": lap.available_solvers()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f}"


def render(results: dict) -> str:
    m = results["machine"]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    lines = [
        "# LAP benchmark (benchmarks/bench_lap.py)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 1e9:.0f} GB RAM, "
        f"Python {m['python']}; {pkgs}. Primary solver: `{m['solvers'][0]}`."
        + (f" GPU: {m['gpu']}." if "gpu" in m else ""), "",
        "Costs are float32. *scipy*: `linear_sum_assignment(maximize=True)`; *primary*: the "
        "solver alone on the negated matrix; *pacer*: `maximize_assignment` (certificate, "
        "solver, dual verification). Ratios are scipy seconds / ours.", "",
        "| n | cost | scipy ms | primary ms | pacer ms | scipy/primary | scipy/pacer "
        "| pacer path | verified | moved |",
        "|---:|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results["lap"]:
        lines.append(
            f"| {r['n']} | {r['kind']} | {ms(r['scipy_s'])} | {ms(r['primary_raw_s'])} | "
            f"{ms(r['pacer_s'])} | {r['ratio_scipy_over_primary_raw']:.1f}× | "
            f"{r['ratio_scipy_over_pacer']:.1f}× | {r['pacer_solver']} | {r['verified']} | "
            f"{r['units_moved']} |")
    lines += ["", f"Cost GEMM (n × {INNER}) · ({INNER} × n), float32, torch:", "",
              "| n | device | ms |", "|---:|---|---:|"]
    lines += [f"| {g['n']} | {g['device']} | {ms(g['seconds'])} |" for g in results["gemm"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512,2048,8192", help="comma-separated n values")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="also time the GEMM on CUDA (LAP solvers are CPU-only)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" and torch.cuda.is_available() else [])
    if args.device == "cuda" and len(devices) == 1:
        print("CUDA not available: timing the GEMM on the CPU only", file=sys.stderr)

    results = {"machine": machine(devices[-1]), "sizes": sizes, "lap": [], "gemm": []}
    for n in sizes:
        repeats = 3 if n <= 2048 else 1
        for kind in KINDS:
            row = bench_lap(kind, n, repeats)
            results["lap"].append(row)
            print(f"n={n:6d} {kind:17s} scipy {row['scipy_s']:8.3f}s  primary "
                  f"{row['primary_raw_s']:8.3f}s  pacer {row['pacer_s']:8.3f}s "
                  f"({row['pacer_solver']}, verified={row['verified']})  "
                  f"scipy/pacer {row['ratio_scipy_over_pacer']:6.1f}x", flush=True)
        for device in devices:
            seconds = bench_gemm(n, device, repeats)
            results["gemm"].append({"n": n, "device": device, "inner": INNER, "seconds": seconds})
            print(f"n={n:6d} GEMM on {device}: {seconds:.3f}s", flush=True)

    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"lap-{platform.node() or 'host'}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
