#!/usr/bin/env python
"""Where a dense merge spends its time: bench_dense.py's cases under py-spy.

Runs pacer-stream on the benchmark family (built by benchmarks/bench_dense.py in the same
--work folder) under ``py-spy record`` (100 Hz, raw stacks) and sums the main thread's
samples by what they were doing: start-up imports, widening the read copies to fp32
(and the NaN/Inf check), the methods' observation passes, the merge itself, alignment,
reading and writing. py-spy slows the run down, so the shares mean something and the
seconds do not. Results go to benchmarks/results/dense-profile-<host>.md.

    pip install py-spy
    python benchmarks/profile_dense.py [--work /tmp/pacer-bench] [--cases ties,linear]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dense import CASES, ROOT, machine, slug  # noqa: E402

# (share name, a frame that marks it), first match from the innermost frame outwards
PHASES = [
    ("observation passes (TIES histograms, L1 sums, Gram)", "TensorMerge.observe ("),
    ("merge arithmetic (drops, election, sums)", "TensorMerge.merge ("),
    ("widen to fp32 + NaN/Inf check", "MergeJob._to_compute ("),
    ("alignment: cost GEMMs", "group_cost ("),
    ("alignment: residual stream", "residual_cost ("),
    ("alignment: other", "AlignStage.run ("),
    ("reading inputs (main thread)", "CheckpointIndex.read ("),
    ("writing output", "ShardWriter."),
    ("split into task vectors", "TensorMerge.split ("),
    ("narrow to the output dtype, rest of the tensor loop", "MergeJob._merge_tensor ("),
    ("start-up imports", "<module>"),
]


def profile(case, work: Path, raw: Path) -> Counter:
    plan = work / f"{slug(case)}.pacer.yaml"
    if not plan.exists():
        raise SystemExit(f"{plan} is missing: run benchmarks/bench_dense.py --work {work} first")
    out = next(line.split("path:")[1].strip(" }\n") for line in plan.read_text().splitlines()
               if "path:" in line)
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["py-spy", "record", "-r", "100", "-f", "raw", "--threads", "-o", str(raw), "--",
           "pacer-stream", "run", str(plan), "--quiet",
           *(["--max-memory", case.budget] if case.budget else [])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shares: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        phase = next((name for name, mark in PHASES
                      if any(mark in f for f in reversed(frames))), "other")
        shares[phase] += int(count)
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pacer-bench"))
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    wanted = set(args.cases.split(",")) if args.cases else None
    lines = ["# Where a dense merge's time goes (benchmarks/profile_dense.py)", "",
             f"Machine: {machine()['cpu']}, {machine()['cores']} cores, Python "
             f"{platform.python_version()}. py-spy at 100 Hz, main thread only (the read-ahead "
             "thread's reads overlap it); shares of its samples.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            if wanted is not None and case.name not in wanted:
                continue
            shares = profile(case, args.work, Path(tmp) / "raw.txt")
            total = sum(shares.values()) or 1
            lines += [f"## {case.name}", "", "| share | what |", "|---:|---|"]
            lines += [f"| {n / total * 100:.0f} % | {name} |" for name, n in shares.most_common()]
            lines.append("")
            print(case.name, {k: round(v / total, 3) for k, v in shares.most_common()})
    out = ROOT / "benchmarks" / "results" / f"dense-profile-{platform.node() or 'host'}.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
