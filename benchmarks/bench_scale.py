#!/usr/bin/env python
"""Scale benchmark: the Ray backend on this machine's local cluster, and 8 x 70B simulated.

1. Measured, as whole processes on bench_dense.py's family (three ~0.3B bf16 Llamas,
   1.8 GB): the I/O floor, `pacer-stream run` on the local backend (one process), and
   `pacer-stream run --backend ray --address A` against a local cluster started with
   `ray start --head --num-cpus W` for W = 1 and 2 workers; for ties, PACER's aligned
   dense merge and Split-Merge. Outputs are compared: the
   Ray runs must write the same files as a local run with --shard-layout unit.
2. Ray's own costs on that cluster, for cluster_plan.py: the round trip of an empty task,
   and a fresh worker's first task that imports pacer-stream and builds a run's context.
3. Simulated: `pacer-stream plan --backend ray --workers W --json` on header-only 8 x 70B
   checkpoints (scripts/make_header_only.py) for W = 1, 2, 4, 8, with its assumptions.

    python benchmarks/bench_scale.py [--work /tmp/pacer-bench] [--repeats 2]

Results go to benchmarks/results/scale-<host>.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dense import CONFIG, FLOOR, MAKE_FAMILY, ROOT, machine, timed  # noqa: E402

CASES = {  # name -> (plan text after the models, whether the base is merged in)
    "ties": ("method: ties\nparameters: {density: 0.5}\n", True),
    "pacer (dense, aligned)": ("method: pacer\npacer: {enable_moe_upcycle: false}\n", False),
    "split_merge": ("method: split_merge\nparameters: {density: 0.3}\n", False),
}
WORKERS = (1, 2)
SIMULATED = (1, 2, 4, 8)

RAY_COSTS = textwrap.dedent("""
    import json, sys, time, ray
    ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
    @ray.remote(num_cpus=1)
    def empty():
        return 0
    @ray.remote(num_cpus=1)
    def context(plan):
        start = time.perf_counter()
        from pacer_stream.config import load_plan
        from pacer_stream.job import MergeContext, RunOptions
        MergeContext.from_plan(load_plan(plan), RunOptions())
        return time.perf_counter() - start
    ray.get(empty.remote())  # a worker up
    start = time.perf_counter()
    ray.get([empty.remote() for _ in range(200)])
    task = (time.perf_counter() - start) / 200
    start = time.perf_counter()
    inside = ray.get(context.remote(sys.argv[2]))
    print(json.dumps({"task_seconds": task, "worker_seconds": time.perf_counter() - start,
                      "context_seconds": inside}))
""")


def family(work: Path) -> Path:
    root = work / "family"
    if not (root / "ft2" / "model.safetensors").exists():
        subprocess.run([sys.executable, "-c", MAKE_FAMILY, str(root), str(ROOT / "scripts"),
                        json.dumps(CONFIG)], check=True)
    return root


def write_plan(work: Path, root: Path, name: str, text: str, base: bool) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    plan = work / f"scale-{slug}.yaml"
    weight = "" if "split_merge" in text else ", weight: 0.5"  # split_merge takes none
    plan.write_text("models:\n" + "".join(f"  - {{model: {root / n}{weight}}}\n"
                                          for n in ("ft1", "ft2"))
                    + (f"base_model: {root / 'base'}\n" if base else "") + text
                    + f"output: {{path: {work / ('scale-' + slug)}}}\n")
    return plan


def digests(folder: Path) -> dict[str, str]:
    skip = ("pacer_report.json", "README.md", "pacer_plan.yaml")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(workers: int) -> str:
    port = free_port()
    subprocess.run(["ray", "start", "--head", f"--num-cpus={workers}", f"--port={port}",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True,
                   capture_output=True)
    return f"127.0.0.1:{port}"


def stop_cluster() -> None:
    subprocess.run(["ray", "stop", "--force"], check=True, capture_output=True)


def run(plan: Path, *args: str) -> dict:
    out = Path(next(line.split("path:", 1)[1].strip(" }\n") for line in plan.read_text()
                    .splitlines() if line.startswith("output:")))
    subprocess.run(["rm", "-rf", str(out)], check=True)
    result = timed([sys.executable, "-m", "pacer_stream", "run", str(plan), "--quiet", *args])
    result["digests"] = digests(out)
    return result


def simulate(work: Path) -> dict:
    models = work / "llama70b"
    if not (models / "model7").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_header_only.py"),
                        "--out", str(models), "--models", "8"], check=True, capture_output=True)
    out = {}
    for name, text in (("ties", "method: ties\nparameters: {density: 0.5}\n"),
                       ("pacer (aligned, dense)",
                        "method: pacer\npacer: {enable_moe_upcycle: false}\n")):
        plan = work / f"sim-{name.split()[0]}.yaml"
        plan.write_text("models: [" + ", ".join(str(models / f"model{k}") for k in range(8))
                        + f"]\n{text}output: {{path: {work / 'sim-out'}}}\n")
        rows = []
        for w in SIMULATED:
            done = subprocess.run([sys.executable, "-m", "pacer_stream", "plan", str(plan),
                                   "--json", "--max-memory", "16GB", "--backend", "ray",
                                   "--workers", str(w)], capture_output=True, text=True)
            report = json.loads(done.stdout)
            rows.append(report["cluster"])
        out[name] = {"input_bytes": report["input_bytes"], "rows": rows}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pacer-bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--simulate-only", action="store_true",
                        help="keep the measured part of the last results; redo the simulation")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / "scale-vm"
    if args.simulate_only:
        results = json.loads(out.with_suffix(".json").read_text())
        results["simulated"] = simulate(args.work)
        return write(out, results)
    # `ray start` clusters (Ray 2.59+) take drivers that send their token
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    args.work.mkdir(parents=True, exist_ok=True)
    root = family(args.work)
    results: dict = {"machine": machine(), "cases": {}, "ray": {}, "simulated": {}}
    inputs = [str(p) for p in sorted(root.glob("*/model.safetensors"))]
    for path in inputs:  # warm the page cache: every run below sees the same storage state
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    plans = {name: write_plan(args.work, root, name, text, base)
             for name, (text, base) in CASES.items()}
    for name, plan in plans.items():
        row = {"floor": [], "local": [], "local_unit": [], **{f"ray{w}": [] for w in WORKERS}}
        size = sum(os.path.getsize(p) for p in inputs) // 3
        for _ in range(args.repeats):
            row["floor"].append(timed([sys.executable, "-c", FLOOR, str(size),
                                       str(args.work / "floor.out"), *inputs]))
            row["local"].append(run(plan))
            row["local_unit"].append(run(plan, "--shard-layout", "unit"))
        for w in WORKERS:
            address = start_cluster(w)
            try:
                for _ in range(args.repeats):
                    row[f"ray{w}"].append(run(plan, "--backend", "ray", "--address", address))
                if name == "ties" and w == WORKERS[-1]:
                    costs = subprocess.run([sys.executable, "-c", RAY_COSTS, address, str(plan)],
                                           capture_output=True, text=True, check=True)
                    results["ray"] = json.loads(costs.stdout.strip().splitlines()[-1])
            finally:
                stop_cluster()
        same = all(r["digests"] == row["local_unit"][0]["digests"]
                   for w in WORKERS for r in row[f"ray{w}"])
        results["cases"][name] = {
            key: {"seconds": min(r["seconds"] for r in runs),
                  "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}
            for key, runs in row.items()} | {"same_bytes_as_local_unit_layout": same}
    results["simulated"] = simulate(args.work)
    return write(out, results)


def write(out: Path, results: dict) -> int:
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(results))
    print(render(results))
    return 0


def render(results: dict) -> str:
    m = results["machine"]
    lines = ["# Scale: the Ray backend on one machine, and 8 x 70B simulated", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, "
             f"Python {m['python']}; `python benchmarks/bench_scale.py` "
             f"({time.strftime('%Y-%m-%d')}). Best of the repeats, whole processes, warm page "
             "cache; Ray runs join a cluster started by `ray start --head --num-cpus W` (its "
             "start is not timed; each run's own worker processes are).", "",
             "## Measured: bench_dense.py's family (a ~0.3B bf16 Llama base and two variants)",
             "", "ties merges the two variants onto the base; PACER (aligned, dense) and "
             "Split-Merge merge the two variants.", "",
             "| case | floor | local | local, unit layout | " +
             " | ".join(f"ray, {w} worker{'s' * (w > 1)}" for w in WORKERS) +
             " | speed-up 1 → 2 workers | same bytes |",
             "|---|---:|---:|---:|" + "---:|" * len(WORKERS) + "---:|---|"]
    for name, row in results["cases"].items():
        cells = [f"{row['floor']['seconds']:.2f} s", f"{row['local']['seconds']:.2f} s",
                 f"{row['local_unit']['seconds']:.2f} s"]
        cells += [f"{row[f'ray{w}']['seconds']:.2f} s "
                  f"({row[f'ray{w}']['seconds'] / row['local']['seconds']:.2f}× local)"
                  for w in WORKERS]
        speedup = row[f"ray{WORKERS[0]}"]["seconds"] / row[f"ray{WORKERS[-1]}"]["seconds"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {speedup:.2f}× | "
                     f"{'yes' if row['same_bytes_as_local_unit_layout'] else 'NO'} |")
    ray = results["ray"]
    if ray:
        lines += ["", f"Ray on this cluster: an empty task's round trip {ray['task_seconds'] * 1e3:.1f} ms; "
                  f"a fresh worker's first task that builds a run's context "
                  f"{ray['worker_seconds']:.2f} s ({ray['context_seconds']:.2f} s of it inside "
                  "the task). cluster_plan.py's RAY_TASK_SECONDS and RAY_WORKER_SECONDS come "
                  "from these."]
    lines += ["", "## Simulated: 8 × Llama-3-70B (header-only), --max-memory 16GB", "",
              "`pacer-stream plan --backend ray --workers W` (cluster_plan.py): the plan's "
              "per-unit costs scheduled as the backend runs them, each machine one task at a "
              "time; stages wait for the one before.", ""]
    for name, sim in results["simulated"].items():
        lines += [f"### {name} ({sim['input_bytes'] / 1e12:.2f} TB read per pass)", "",
                  "| machines | wall time | speed-up vs one process | stages |",
                  "|---:|---:|---:|---|"]
        for r in sim["rows"]:
            stages = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["stages"].items())
            lines.append(f"| {r['workers']} | {r['seconds'] / 3600:.2f} h | "
                         f"{r['speedup']:.2f}× | {stages} |")
        lines.append("")
    a = results["simulated"][next(iter(results["simulated"]))]["rows"][-1]["assumptions"]
    lines += ["Assumptions: " + "; ".join(
        f"{k.replace('_bytes_per_s', '').replace('_', ' ')}: "
        + (f"{v / 1e9:g} GB/s" if k.endswith("bytes_per_s") else f"{v}") for k, v in a.items())
              + ". The storage rate is shared by all machines, so past it more machines read "
              "no faster; the alignment shares (one d × d fp64 matrix per unit and peer) "
              "cross the network to the driver.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
