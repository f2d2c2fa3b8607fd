#!/usr/bin/env python
"""Dense merge benchmark: pacer-stream vs mergekit vs the physical floor, as whole processes.

Builds (once) a Llama-shaped family of three ~0.3B-parameter bf16 checkpoints (a base and
two fine-tune-like variants), then, for every case of CASES (linear; ties and dare_ties on
the base, density 0.5; PACER's dense path; the three methods again at --max-memory 400MB,
against 1.8 GB of inputs), times as separate processes:

* the physical floor: plain file I/O reading every input the method needs and writing one
  output of the merged size (fsynced, as pacer-stream does);
* pacer-stream run, next to what `pacer-stream plan --json` estimated for it;
* mergekit-yaml (fp32 compute, bf16 output, like pacer-stream), where it has the method.

Peak RSS comes from the kernel (wait4's ru_maxrss of each child). The page cache is warmed
first so all three see the same storage state. Outputs of the two tools are compared in
ulps of bf16 (not for random drops). Results go to benchmarks/results/dense-<host>.{json,md}.

    python benchmarks/bench_dense.py [--work /tmp/pacer-bench] [--mergekit PATH] [--cases a,b]

mergekit is found on PATH, or at --mergekit, or installed into <work>/mergekit-venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
    "intermediate_size": 2816, "num_hidden_layers": 21, "num_attention_heads": 16,
    "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu",
}

MAKE_FAMILY = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[2])
    from make_header_only import llama_tensors
    config = json.loads(sys.argv[3])
    root = Path(sys.argv[1])
    gen = torch.Generator().manual_seed(0)
    base = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
            for n, s in llama_tensors(config)}
    for k, name in enumerate(["base", "ft1", "ft2"]):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        state = base if k == 0 else {
            n: (t.float() + 0.002 * torch.randn(t.shape, generator=gen)).to(torch.bfloat16)
            for n, t in base.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=1))
""")

FLOOR = textwrap.dedent("""
    import os, sys
    out_size = int(sys.argv[1]); out = sys.argv[2]; inputs = sys.argv[3:]
    buf = bytearray(64 << 20)
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    block = bytes(64 << 20)
    with open(out, "wb") as f:
        left = out_size
        while left:
            n = min(left, len(block)); f.write(block[:n]); left -= n
        f.flush(); os.fsync(f.fileno())
""")

COMPARE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import load_file
    def load(folder):
        out = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    def ordered(t):
        # bf16 bit patterns as integers that count representable values in order, so
        # the difference of two is their distance in ulps (+0 and -0 are the same point).
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    a, b = load(sys.argv[1]), load(sys.argv[2])
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    worst_ulps, worst_abs, differing, over_one, total = 0, 0.0, 0, 0, 0
    for name in a:
        ulps = (ordered(a[name]) - ordered(b[name])).abs()
        worst_ulps = max(worst_ulps, int(ulps.max()))
        worst_abs = max(worst_abs, float((a[name].float() - b[name].float()).abs().max()))
        differing += int((ulps > 0).sum()); over_one += int((ulps > 1).sum()); total += ulps.numel()
    print(json.dumps({"max_ulps": worst_ulps, "max_abs": worst_abs, "differing_fraction": differing / total,
                      "over_1_ulp_fraction": over_one / total}))
""")


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command as a child process; wall seconds and the child's peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[0]} failed ({code}): {stderr[-2000:]}")
    return {"seconds": round(seconds, 3), "peak_rss_bytes": usage.ru_maxrss * 1024}


def find_mergekit(work: Path, given: str | None, version: str | None = None) -> str:
    """mergekit-yaml: ``given``, else one on PATH (of ``version``, when one is asked for), else
    <work>/mergekit-venv/bin/mergekit-yaml, created on first use. The venv sees this
    interpreter's packages and pins torch to its version, so pip keeps the local (CPU) build
    instead of downloading another; ``version`` pins mergekit too."""
    if given:
        return given
    found = shutil.which("mergekit-yaml")
    if found and (version is None or mergekit_version(found) == version):
        return found
    venv = work / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        from importlib.metadata import version as installed

        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        torch_pin = "torch==" + installed("torch").split("+")[0]  # 2.13.0+cpu satisfies ==2.13.0
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                        f"mergekit=={version}" if version else "mergekit", torch_pin], check=True)
    return str(exe)


def mergekit_version(exe: str) -> str:
    """The mergekit version installed beside the ``mergekit-yaml`` at ``exe``."""
    return subprocess.run([str(Path(exe).with_name("python")), "-c",
                           "import importlib.metadata as m; print(m.version('mergekit'))"],
                          capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "platform": platform.platform()}


@dataclass(frozen=True)
class Case:
    """One benchmark row: a pacer-stream plan (and mergekit's equivalent, if it has one)."""

    name: str
    method: str
    base: bool  # the plan merges the two variants onto the base
    extra: str = ""  # plan text after models/base/method
    budget: str | None = None  # --max-memory
    mergekit: bool = True  # mergekit runs the same merge (same row)
    random: bool = False  # random drops: outputs are compared by nobody
    why: str = ""  # what explains a difference from mergekit, measured


CASES = (
    Case("linear", "linear", False),
    Case("ties", "ties", True, "parameters: {density: 0.5}\n", why=(
        "every differing element sits at a model's k-th largest |task vector|, a value ~1.9 % "
        "of the bf16 task-vector entries share (checked on model.layers.3.mlp.down_proj): "
        "mergekit keeps an arbitrary k of the tied entries (unstable argsort), pacer-stream "
        "the lowest indices; without ties (fp32, benchmarks/results/parity-vm.md) the two "
        "agree bit for bit")),
    Case("dare_ties", "dare_ties", True, "parameters: {density: 0.5}\n", random=True),
    # PACER's dense path: alignment (certified identity for fine-tunes of one base) + mean
    Case("pacer (dense)", "pacer", False, "pacer: {enable_moe_upcycle: false}\n", mergekit=False),
    # 400 MB against 1.8 GB of inputs: the share a 70B merge gets in 16 GB
    Case("linear @ 400MB", "linear", False, budget="400MB", mergekit=False),
    Case("ties @ 400MB", "ties", True, "parameters: {density: 0.5}\n", "400MB", mergekit=False),
    Case("dare_ties @ 400MB", "dare_ties", True, "parameters: {density: 0.5}\n", "400MB",
         mergekit=False, random=True),
)


CASE_WHY = {case.name: case.why for case in CASES}


def slug(case: Case) -> str:
    return "".join(c if c.isalnum() else "-" for c in case.name).strip("-")


def write_plans(case: Case, family: Path, work: Path) -> tuple[Path, Path]:
    """The case's pacer-stream plan and mergekit configuration (weights 0.5 / 0.5)."""
    name = slug(case)
    plan = work / f"{name}.pacer.yaml"
    plan.write_text(
        "models:\n" + "".join(f"  - {{model: {family / n}, weight: 0.5}}\n" for n in ("ft1", "ft2"))
        + (f"base_model: {family / 'base'}\n" if case.base else "")
        + f"method: {case.method}\n{case.extra}output: {{path: {work / (name + '-pacer')}}}\n")
    mk = work / f"{name}.mergekit.yaml"
    mk.write_text(
        f"merge_method: {case.method}\n" + (f"base_model: {family / 'base'}\n" if case.base else "")
        + "models:\n" + "".join(
            f"  - model: {family / n}\n    parameters: {{weight: 0.5"
            + (", density: 0.5" if "density" in case.extra else "") + "}\n" for n in ("ft1", "ft2"))
        + "dtype: float32\nout_dtype: bfloat16\n")
    return plan, mk


def planned(plan: Path, budget: str | None) -> dict:
    """What `pacer-stream plan --json` estimates: CPU seconds and peak RAM."""
    done = subprocess.run([sys.executable, "-m", "pacer_stream", "plan", str(plan), "--json",
                           *(["--max-memory", budget] if budget else [])],
                          capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    return {"seconds": report["est_seconds"]["cpu"], "peak_ram_bytes": report["peak_ram_bytes"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pacer-bench"))
    parser.add_argument("--mergekit", help="path to mergekit-yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", help="comma list of case names (default: all)")
    args = parser.parse_args()
    work = args.work
    family = work / "family"
    if not (family / "ft2" / "model.safetensors").exists():
        subprocess.run([sys.executable, "-c", MAKE_FAMILY, str(family), str(ROOT / "scripts"),
                        json.dumps(CONFIG)], check=True)
    mergekit = find_mergekit(work, args.mergekit)
    mk_version = mergekit_version(mergekit)
    for name in ("base", "ft1", "ft2"):  # warm the page cache for everyone
        subprocess.run(["cat", str(family / name / "model.safetensors")], stdout=subprocess.DEVNULL)

    # Every pacer-stream run pays Python + torch start-up before reading a byte; measured
    # on its own so the merge itself can be compared with the floor.
    startup = min(timed([sys.executable, "-c", "import torch, pacer_stream.cli"])["seconds"]
                  for _ in range(3))
    results = {"machine": machine(), "mergekit_version": mk_version, "config": CONFIG,
               "param_count": (family / "ft1" / "model.safetensors").stat().st_size // 2,
               "startup_seconds": startup, "methods": {}}
    wanted = set(args.cases.split(",")) if args.cases else None
    for case in CASES:
        if wanted is not None and case.name not in wanted:
            continue
        name = slug(case)
        inputs = [family / n / "model.safetensors"
                  for n in (["base"] if case.base else []) + ["ft1", "ft2"]]
        out_size = (family / "ft1" / "model.safetensors").stat().st_size
        row: dict = {"input_bytes": sum(p.stat().st_size for p in inputs), "output_bytes": out_size,
                     "budget": case.budget}
        pacer_plan, mk_config = write_plans(case, family, work)
        row["plan"] = planned(pacer_plan, case.budget)
        pacer_cmd = [sys.executable, "-m", "pacer_stream", "run", str(pacer_plan), "--quiet",
                     *(["--max-memory", case.budget] if case.budget else [])]
        tools = ["floor", "pacer-stream"] + (["mergekit"] if case.mergekit else [])
        runs: dict[str, list] = {tool: [] for tool in tools}
        for _ in range(args.repeats):
            runs["floor"].append(timed([sys.executable, "-c", FLOOR, str(out_size),
                                        str(work / "floor.out"), *map(str, inputs)]))
            shutil.rmtree(work / (name + "-pacer"), ignore_errors=True)
            runs["pacer-stream"].append(timed(pacer_cmd))
            if case.mergekit:
                shutil.rmtree(work / (name + "-mergekit"), ignore_errors=True)
                runs["mergekit"].append(timed([mergekit, str(mk_config),
                                               str(work / (name + "-mergekit")), "--quiet",
                                               "--lazy-unpickle", "--no-copy-tokenizer",
                                               "--no-write-model-card"]))
        best = {tool: {"seconds": min(r["seconds"] for r in rs),
                       "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs), "runs": rs}
                for tool, rs in runs.items()}
        row.update(best)
        pacer = best["pacer-stream"]
        row["time_ratio_vs_floor"] = round(pacer["seconds"] / best["floor"]["seconds"], 2)
        row["time_ratio_vs_floor_after_startup"] = round(
            (pacer["seconds"] - startup) / best["floor"]["seconds"], 2)
        row["measured_vs_planned_seconds"] = round(pacer["seconds"] / row["plan"]["seconds"], 2)
        row["measured_vs_planned_ram"] = round(pacer["peak_rss_bytes"]
                                               / row["plan"]["peak_ram_bytes"], 2)
        if case.mergekit:
            row["speedup_vs_mergekit"] = round(best["mergekit"]["seconds"] / pacer["seconds"], 2)
            row["rss_ratio_vs_mergekit"] = round(pacer["peak_rss_bytes"]
                                                 / best["mergekit"]["peak_rss_bytes"], 3)
            if case.random:
                row["agreement"] = "random drops: masks differ by design (bench_parity compares " \
                                   "their statistics)"
            else:
                compare = subprocess.run([sys.executable, "-c", COMPARE, str(work / (name + "-pacer")),
                                          str(work / (name + "-mergekit"))],
                                         capture_output=True, text=True)
                row["agreement"] = json.loads(compare.stdout) if compare.returncode == 0 \
                    else compare.stderr[-500:]
        results["methods"][case.name] = row
        print(case.name, json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}),
              flush=True)

    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"dense-{platform.node() or 'host'}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    print(f"wrote {stem}.json and .md")
    return 0


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Dense merge benchmark (benchmarks/bench_dense.py)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 1e9:.0f} GB RAM, "
        f"Python {m['python']}; mergekit {results['mergekit_version']}. Warm page cache; "
        "3 × 0.3B-parameter Llama-shaped bf16 checkpoints (base + 2 variants). Best of the "
        "repeats for time, worst for peak RSS. `plan`: pacer-stream's own estimate before the "
        "run (measured / planned).", "",
        "| case | tool | seconds | peak RSS | vs floor | vs mergekit (time) | vs mergekit (RSS) "
        "| measured / plan: time | measured / plan: RAM |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, row in results["methods"].items():
        for tool in ("floor", "pacer-stream", "mergekit"):
            if tool not in row:
                continue
            r = row[tool]
            vs_floor = r["seconds"] / row["floor"]["seconds"]
            mk = row.get("mergekit")
            t_ratio = f"{mk['seconds'] / r['seconds']:.2f}× faster" if mk else ""
            m_ratio = f"{r['peak_rss_bytes'] / mk['peak_rss_bytes']:.2f}×" if mk else ""
            plan = (f"{row['measured_vs_planned_seconds']:.2f} ({row['plan']['seconds']:.1f} s) | "
                    f"{row['measured_vs_planned_ram']:.2f} "
                    f"({row['plan']['peak_ram_bytes'] / 1e6:.0f} MB)") \
                if tool == "pacer-stream" else " | "
            budget = f" (budget {row['budget']})" if row.get("budget") and tool == "pacer-stream" \
                else ""
            lines.append(f"| {case} | {tool}{budget} | {r['seconds']:.2f} | "
                         f"{r['peak_rss_bytes'] / 1e6:.0f} MB | {vs_floor:.2f}× | {t_ratio} | "
                         f"{m_ratio} | {plan} |")
        agreement = row.get("agreement")
        if isinstance(agreement, dict):
            lines.append(f"| {case} | agreement | max {agreement['max_ulps']} ulp (bf16, max abs "
                         f"{agreement['max_abs']:.2g}); {agreement['differing_fraction'] * 100:.3f}% of "
                         f"elements differ, {agreement['over_1_ulp_fraction'] * 100:.3f}% by more than "
                         "1 ulp" + (f": {CASE_WHY[case]}" if CASE_WHY.get(case) else "")
                         + " | | | | | | |")
        elif agreement:
            lines.append(f"| {case} | agreement | {agreement} | | | | | | |")
    lines += ["", f"Start-up (Python + `import torch, pacer_stream.cli`) is {results['startup_seconds']:.2f} s "
              "of every pacer-stream run; without it, pacer-stream takes "
              + ", ".join(f"{case} {row['time_ratio_vs_floor_after_startup']:.2f}×"
                          for case, row in results["methods"].items()) + " the floor's time."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
