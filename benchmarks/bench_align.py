#!/usr/bin/env python
"""Alignment at 70B width: a two-block slice of Llama-3-70B's shapes, aligned under a budget.

Builds (once) an anchor and a peer with Llama-3-70B's widths (hidden 8192, intermediate
28672, 64 query / 8 KV heads of 128, RoPE) but only ``--blocks`` blocks and a small
vocabulary, in bf16 with random weights, then times ``pacer-stream run`` with
``align: only`` (find the permutations, write the re-based peer) as a whole process
under ``--max-memory``, with its peak RSS from wait4. The peer is either

* ``finetune``: the anchor plus 1% noise, same basin (the certificate should hold), or
* ``permuted``: the same, moved to another basin by a random valid permutation.

It also records ``pacer-stream plan``'s alignment estimate for the same plan, per sweep,
next to the measured seconds per sweep. Results: benchmarks/results/align-<host>.{json,md}.
LAP and GEMM timings by size come from benchmarks/bench_lap.py.

    python benchmarks/bench_align.py [--blocks 2] [--mode finetune] [--max-memory 16GB]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[3])
    from make_header_only import llama_tensors
    out, config, mode = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[4]
    gen = torch.Generator().manual_seed(0)
    anchor = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
              for n, s in llama_tensors(config)}
    for name, state in (("anchor", anchor), ("peer", None)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        if state is None:
            state = {}
            for n, t in anchor.items():
                state[n] = (t.float() + 0.0002 * torch.randn(t.shape, generator=gen)).to(torch.bfloat16)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        del state
    if mode == "permuted":
        import make_fixtures
        tmp = out / "peer-unpermuted"
        (out / "peer").rename(tmp)
        make_fixtures.permute_folder(tmp, out / "peer", seed=1)
        shutil = __import__("shutil"); shutil.rmtree(tmp)
""")


def config(blocks: int, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
            "intermediate_size": 28672, "num_hidden_layers": blocks, "num_attention_heads": 64,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": vocab, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}


def timed(cmd: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed: {err[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": out}


def machine() -> dict:
    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "")
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pacer-bench/align70"))
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--mode", choices=["finetune", "permuted"], default="finetune")
    parser.add_argument("--max-memory", default="16GB")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="1/16 of the width, to try the script")
    args = parser.parse_args()
    work = args.work / f"{args.mode}-{args.blocks}{'-smoke' if args.smoke else ''}"
    cfg = config(args.blocks, args.vocab)
    if args.smoke:
        cfg.update(hidden_size=512, intermediate_size=1792, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=64)
    if not (work / "peer" / "model.safetensors").exists():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", MAKE, str(work), json.dumps(cfg), str(ROOT / "scripts"),
                        args.mode], check=True)
    plan = work / "plan.yaml"
    plan.write_text(f"models: [{work / 'anchor'}, {work / 'peer'}]\nmethod: linear\nalign: only\n"
                    f"output: {{path: {work / 'out'}}}\n")
    for name in ("anchor", "peer"):  # warm the page cache
        subprocess.run(["cat", str(work / name / "model.safetensors")], stdout=subprocess.DEVNULL)
    estimate = json.loads(subprocess.run(
        [sys.executable, "-m", "pacer_stream", "plan", str(plan), "--json", "--max-memory",
         args.max_memory, "--device", args.device], capture_output=True, text=True, check=True).stdout)
    align_stage = next(s for s in estimate["stages"] if s["name"] == "align")
    shutil.rmtree(work / "out", ignore_errors=True)
    run = timed([sys.executable, "-m", "pacer_stream", "run", str(plan), "--max-memory",
                 args.max_memory, "--device", args.device, "--quiet"])
    report = json.loads((work / "out" / "pacer_report.json").read_text())
    (peer,) = report["align"]["peers"].values()
    measured_per_sweep = report["align"]["seconds_this_run"] / max(peer["sweeps"], 1)
    est_per_sweep = align_stage["seconds"][args.device] / align_stage["passes"]
    from pacer_stream.sizes import parse_size

    results = {
        "machine": machine(), "mode": args.mode, "blocks": args.blocks, "vocab": args.vocab,
        "budget_bytes": parse_size(args.max_memory, "--max-memory"), "device": args.device,
        "process_seconds": run["seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
        "align_seconds": report["align"]["seconds_this_run"], "sweeps": peer["sweeps"],
        "measured_seconds_per_sweep": round(measured_per_sweep, 2),
        "plan_seconds_per_sweep": round(est_per_sweep, 2),
        "plan_over_measured": round(est_per_sweep / measured_per_sweep, 2),
        "plan_peak_ram_bytes": estimate["peak_ram_bytes"],
        "peer": {k: v for k, v in peer.items() if k != "objective_by_sweep"},
    }
    out_dir = ROOT / "benchmarks" / "results"
    stem = out_dir / f"align-{platform.node() or 'host'}-{args.mode}{'-smoke' if args.smoke else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    kinds = "; ".join(f"{k}: {v['problems']} problems, {v['certified']} certified, "
                      f"{v['moved'] / max(v['slots'], 1):.1%} moved, {v['seconds']:.1f} s solving"
                      for k, v in sorted(peer["kinds"].items()))
    m = results["machine"]
    stem.with_suffix(".md").write_text("\n".join([
        f"# Alignment at 70B width (benchmarks/bench_align.py, {args.mode})", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 1e9:.0f} GB RAM, device "
        f"{args.device}. Anchor + 1 peer, {args.blocks} blocks of Llama-3-70B width (hidden 8192, "
        f"MLP 28672, 64/8 heads), vocab {args.vocab}, bf16, random weights; peer = anchor + 1% "
        f"noise{', permuted' if args.mode == 'permuted' else ''}. `align: only` under "
        f"--max-memory {args.max_memory}.", "",
        "| figure | value |", "|---|---:|",
        f"| whole process | {run['seconds']:.1f} s |",
        f"| align stage | {results['align_seconds']:.1f} s in {peer['sweeps']} sweep(s) |",
        f"| peak RSS (wait4) | {run['peak_rss_bytes'] / 1e9:.2f} GB of {args.max_memory} |",
        f"| plan's peak RAM estimate | {estimate['peak_ram_bytes'] / 1e9:.2f} GB |",
        f"| plan's align estimate per sweep | {est_per_sweep:.1f} s |",
        f"| measured per sweep | {measured_per_sweep:.1f} s ({results['plan_over_measured']}× plan/measured) |",
        "", f"Per group kind: {kinds}.", ""]))
    print(json.dumps({k: v for k, v in results.items() if k != "peer"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
