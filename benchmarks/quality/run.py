"""Merge quality on real data, in one command: train experts, merge them every way, score.

    python benchmarks/quality/run.py                     # domain set A, full profile (~20 min)
    python benchmarks/quality/run.py --domains B         # the second, independent data set
    python benchmarks/quality/run.py --domains man-en,c-headers,man-fr --tasks text
    python benchmarks/quality/run.py --profile tiny --rows linear,pacer-all-fewshot  # seconds

1. Text: a byte-level Llama base trained on a mix of the domains, one expert per domain
   fine-tuned from it (textdata.py, training.py). Images: a tiny ViT on the 8x8 digits, one
   expert per group of classes (imagedata.py).
2. Every merge row (merging.py) writes a plan, runs `pacer-stream` on the experts as a
   process, loads the output with transformers and scores each domain's held-out data.
3. Retention per domain = (base − merge) / (base − that domain's expert), and its mean; the
   tables go to benchmarks/results/quality-<set>.md and .json (report.py).

Trained models are cached (--cache) under a hash of the settings and the data, so a re-run
only merges and scores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # the benchmark's modules
sys.path.insert(0, str(REPO))  # this checkout's pacer_stream

import torch  # noqa: E402

from imagedata import DESCRIPTION as DIGITS, load_digits_splits  # noqa: E402
from merging import (Row, cli, fresh, merge_rows, param_growth, report_facts,  # noqa: E402
                     write_plan)
from metrics import checkpoint_params, mean, retention  # noqa: E402
from routing_probe import routing_accuracy  # noqa: E402
from report import machine, write_json, write_markdown  # noqa: E402
from settings import PROFILES, MergeSettings, Profile  # noqa: E402
from tasks import ImageTask, TextTask  # noqa: E402
from textdata import load_domain, resolve_domains  # noqa: E402
from training import train_images, train_text  # noqa: E402

MERGE_SEED = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", default="A",
                   help="a domain set (A, B) or a comma list of sources (textdata.SOURCES)")
    p.add_argument("--profile", default="full", choices=sorted(PROFILES))
    p.add_argument("--tasks", default="text,images", help="text, images or both")
    p.add_argument("--rows", default="all",
                   help="merge rows to run, comma list of slugs (base, experts and oracle "
                        "always): " + ", ".join(r.slug for r in merge_rows(MergeSettings())))
    p.add_argument("--work", type=Path, default=REPO / "out" / "quality",
                   help="merge outputs, plans and logs (rebuilt every run)")
    p.add_argument("--cache", type=Path, default=REPO / "out" / "quality-cache",
                   help="trained models, reused when settings and data match")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", help="result file name without extension (default quality-<set>)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads here and OMP_NUM_THREADS of every pacer-stream process")
    return p.parse_args(argv)


def select_rows(rows: list[Row], spec: str) -> list[Row]:
    if spec == "all":
        return rows
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    known = {r.slug: r for r in rows}
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; known: {', '.join(known)}")
    return [known[s] for s in wanted]


@contextmanager
def phase(timings: dict[str, float], name: str, say) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t
    say(f"[{name}: {timings[name]:.0f} s]")


# -----------------------------------------------------------------------------
# one task: the reference rows, then the merges

def source_rows(task, base: Path, experts: dict[str, Path]) -> tuple[list[dict], dict]:
    """Rows for the base, each expert and the oracle; and each domain's own-expert score."""
    def row(name: str, scores: dict[str, float], params_x: float) -> dict:
        return {"name": name, "slug": name.replace(" ", "-"), "status": "ok", "scores": scores,
                "params_x": params_x}

    base_model = task.load(base)
    rows = [row("base", {d: task.score(base_model, d) for d in task.domains}, 1.0)]
    own: dict[str, float] = {}
    for name, folder in experts.items():
        model = task.load(folder)
        scores = {d: task.score(model, d) for d in task.domains}
        own[name] = scores[name]
        rows.append(row(f"expert {name}", scores, 1.0))
    rows.append(row("oracle (own expert per domain)", dict(own), float(len(experts))))
    return rows, own


def merge_row(task, row: Row, base: Path, experts: dict[str, Path], samples: dict[str, Path],
              work: Path, threads: int, source_params: int) -> dict:
    """Plan, `pacer-stream run`, load, score one merge row."""
    out = fresh(work / "merges" / row.slug)
    models = [experts[d] for d in task.domains]
    plan = work / "plans" / f"{row.slug}.yaml"
    text = write_plan(row, models, base, {experts[d]: samples[d] for d in task.domains}, out,
                      plan, MERGE_SEED)
    result: dict[str, Any] = {"name": row.name, "slug": row.slug, "plan": text}
    run = cli(["run", str(plan), "--quiet"], threads, work / "logs" / f"{row.slug}.log")
    result.update(seconds=run.seconds, command=run.command)
    if not run.ok:
        return {**result, "status": f"failed: {run.error}"}
    try:
        model = task.load(out)
        scores = {d: task.score(model, d) for d in task.domains}
    except Exception as exc:  # an output transformers cannot load is a result too
        return {**result, "status": f"failed: loading the output: {one_line(exc)}"}
    facts = report_facts(out)
    return {**result, "status": "ok", "scores": scores,
            "params_x": param_growth(out, source_params), "facts": facts,
            "routing_accuracy": routing_accuracy(model, task, facts.get("clusters") or {})}


def split_merge_rows(task, row: Row, experts: dict[str, Path], work: Path, threads: int,
                     base: Path, samples: dict[str, Path], m: MergeSettings) -> list[dict]:
    """Split-Merge's two rows: the oracle coefficient and the TR-Merging router."""
    from pacer_stream.runtime import RouterBank, SplitMergeModel

    tau = "default" if m.route_temperature is None else m.route_temperature
    names = (f"{row.name}, oracle c_t", f"{row.name}, TR router (τ {tau}, top-{m.route_top_k})")
    out = fresh(work / "merges" / row.slug)
    plan = work / "plans" / f"{row.slug}.yaml"
    text = write_plan(row, [experts[d] for d in task.domains], base, {}, out, plan, MERGE_SEED)
    run = cli(["run", str(plan), "--quiet"], threads, work / "logs" / f"{row.slug}.log")
    common = {"slug": row.slug, "plan": text, "command": run.command}
    if not run.ok:
        return [{**common, "name": n, "status": f"failed: {run.error}"} for n in names]
    info = json.loads((out / "split_merge.json").read_text())
    # memory of μ + η + the c_t against one model: (d + k + n) / d
    params_x = (info["numel"] + info["k"] + len(experts)) / info["numel"]
    expert_of = {d: experts[d].name for d in task.domains}  # router names = model basenames

    oracle: dict[str, Any] = {**common, "name": names[0], "scores": {}, "params_x": params_x,
                              "seconds": run.seconds, "status": "ok"}
    for d in task.domains:
        to = fresh(work / "materialized" / d)
        made = cli(["materialize", str(out), "--expert", expert_of[d], "--to", str(to)], threads,
                   work / "logs" / f"materialize-{d}.log")
        oracle["seconds"] += made.seconds
        if not made.ok:
            oracle["status"] = f"failed: materialize {d}: {made.error}"
            break
        oracle["scores"][d] = task.score(task.load(to), d)

    t = time.perf_counter()
    routed: dict[str, Any] = {**common, "name": names[1], "params_x": params_x, "status": "ok"}
    if task.kind == "text":  # the bank is built by the CLI from the router-sample files
        bank_dir = fresh(work / "router-bank")
        built = cli(["router", "build", *[f"--samples={expert_of[d]}={samples[d]}"
                                          for d in task.domains], "--out", str(bank_dir)],
                    threads, work / "logs" / "router-build.log")
        if not built.ok:
            return [oracle, {**routed, "status": f"failed: router build: {built.error}"}]
        bank = RouterBank.load(bank_dir)
    else:
        bank = task.router_bank(task.load(base), expert_of)
    sm = SplitMergeModel.load(out, model_cls=task.model_cls)
    temperature = bank.temperature if m.route_temperature is None else m.route_temperature
    outcome = task.route_split_merge(sm, bank, temperature, m.route_top_k, expert_of)
    routed["temperature"] = temperature
    routed.update(scores=outcome.scores, routing_accuracy=outcome.routing_accuracy,
                  seconds=run.seconds + time.perf_counter() - t)
    return [oracle, routed]


def plan_keys(row: Row) -> str:
    """What a row's plan sets besides models, output and seed (shown in the report)."""
    keys: dict[str, Any] = {"method": row.method}
    if row.base:
        keys["base_model"] = "the shared base"
    if row.parameters:
        keys["parameters"] = row.parameters
    pacer = dict(row.pacer, **({"router_samples": "{each model: its router-sample file}"}
                               if row.few_shot else {}))
    if pacer:
        keys["pacer"] = pacer
    return json.dumps(keys, ensure_ascii=False)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def add_retention(rows: list[dict], base_scores: dict[str, float], own: dict[str, float]) -> None:
    for row in rows:
        if row["status"] != "ok":
            continue
        row["retention"] = {d: retention(base_scores[d], row["scores"][d], own[d])
                            for d in base_scores}
        row["mean_retention"] = mean(list(row["retention"].values()))


def run_task(task, base: Path, experts: dict[str, Path], rows: list[Row], work: Path,
             threads: int, m: MergeSettings, say) -> dict[str, Any]:
    """Every row of one task, scored, with retention."""
    work = fresh(work / task.kind)
    samples = task.write_router_samples(work / "router-samples")
    results, own = source_rows(task, base, experts)
    source_params = checkpoint_params(base)
    for row in rows:
        if row.method == "split_merge":
            new = split_merge_rows(task, row, experts, work, threads, base, samples, m)
        else:
            new = [merge_row(task, row, base, experts, samples, work, threads, source_params)]
        for r in new:
            say(f"  {task.kind}: {r['name']}: {r['status']}"
                + (f", {r.get('seconds', 0):.0f} s" if r['status'] == 'ok' else ""))
        results.extend(new)
    add_retention(results, results[0]["scores"], own)
    return {"domains": task.domains, "metric": task.metric, "rows": results, "notes": task.notes,
            "source_params": source_params,
            "router_samples": {d: str(p) for d, p in samples.items()}}


# -----------------------------------------------------------------------------

def main(argv: list[str] | None = None, say=print) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    profile: Profile = PROFILES[args.profile]
    set_label, names = resolve_domains(args.domains)
    rows = select_rows(merge_rows(profile.merge), args.rows)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    timings: dict[str, float] = {}
    result: dict[str, Any] = {
        "set": set_label, "command": "python benchmarks/quality/run.py " + shlex.join(
            argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "profile": profile.as_dict(), "merge_seed": MERGE_SEED,
        "tasks": {}, "timings": timings,
        "row_plans": {r.name: plan_keys(r) for r in rows}}
    start = time.perf_counter()
    if "text" in tasks:
        s = profile.text
        with phase(timings, "text data", say):
            domains = [load_domain(n, s.context - 1, s.n_eval, s.n_router, s.train_bytes)
                       for n in names]
        with phase(timings, "text training", say):
            base, experts, info = train_text(domains, s, args.cache, say)
        with phase(timings, "text merges + scoring", say):
            out = run_task(TextTask(domains), base, experts, rows, args.work, args.threads,
                           profile.merge, say)
        out["data"] = {d.name: {"description": d.description, "train": len(d.train),
                                "train_bytes": d.train_bytes, "router": len(d.router),
                                "eval": len(d.eval), "documents": d.documents} for d in domains}
        out["training"] = info
        result["tasks"]["text"] = out
    if "images" in tasks:
        s = profile.images
        with phase(timings, "image data + training", say):
            digits = load_digits_splits(s.seed, s.eval_fraction, s.router_per_class)
            base, experts, info = train_images(digits, s, args.cache, say)
        with phase(timings, "image merges + scoring", say):
            out = run_task(ImageTask(digits, s), base, experts, rows, args.work, args.threads,
                           profile.merge, say)
        out["data"] = {"description": DIGITS, "groups": [list(g) for g in s.groups],
                       "train": len(digits.train.y), "router": len(digits.router.y),
                       "eval": len(digits.eval.y)}
        out["training"] = info
        result["tasks"]["images"] = out
    timings["total"] = time.perf_counter() - start
    name = args.name or f"quality-{set_label}"
    write_markdown(result, args.results / f"{name}.md")
    write_json(result, args.results / f"{name}.json")
    say(f"wrote {args.results / name}.md and .json ({timings['total']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
