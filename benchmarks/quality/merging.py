"""The merge rows: a plan per row, run as a whole `pacer-stream` process, then scored.

Every merge goes through the CLI exactly as a user would run it (`python -m pacer_stream`
from this checkout, the same program as the `pacer-stream` script), with a plan file written
here. A row whose command fails — a plan key the CLI does not know yet, a crash — is recorded
as ``failed: <the CLI's one-line error>`` and the benchmark carries on.

Split-Merge gives two rows: the oracle coefficient (each domain scored on
`pacer-stream materialize OUT --expert <its expert>`) and the TR-Merging router (each eval
item routed with a bank of the router samples; μ + (Σ α̂_t c_t)·η specialized in place with
pacer_stream.runtime.SplitMergeModel, which is what `materialize --coefficient c` writes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metrics import checkpoint_params
from settings import MergeSettings

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Row:
    slug: str  # for --rows and folder names
    name: str  # for the table
    method: str
    base: bool = False  # the plan names the shared base as base_model
    parameters: dict[str, Any] = field(default_factory=dict)
    pacer: dict[str, Any] = field(default_factory=dict)
    few_shot: bool = False  # pacer.router_samples: the router-sample file of every model


def merge_rows(m: MergeSettings) -> list[Row]:
    """Every merge row, in table order (Split-Merge's two rows come from the `split_merge` row)."""
    rows = [Row("linear", "linear", "linear"),
            Row("ties", "ties (base-free)", "ties", parameters={"density": m.ties_density}),
            Row("ties-base", "ties (base)", "ties", True, {"density": m.ties_density}),
            Row("dare_ties-base", "dare_ties (base)", "dare_ties", True,
                {"density": m.ties_density}),
            Row("split_merge", f"split_merge (density {m.split_density})", "split_merge",
                parameters={"density": m.split_density})]
    modes = [("pacer", "pacer threshold", {}),
             ("pacer-budget", f"pacer budget {m.budget_growth}x",
              {"max_param_growth": m.budget_growth}),
             ("pacer-all", "pacer all MLPs, M=N", {"upcycle_fraction": 1.0,
                                                   "expert_distance": 0.0})]
    for slug, name, pacer in modes:
        # the engine merges MLPs dense unless a router is asked for: data_free is explicit
        rows.append(Row(slug, f"{name}, data-free router", "pacer",
                        pacer={**pacer, "router": "data_free"}))
        rows.append(Row(f"{slug}-fewshot", f"{name}, few-shot router", "pacer", pacer=pacer,
                        few_shot=True))
    # PACER's dense path with samples (RegMean, token rows by usage), nothing upcycled: 1.00x
    rows.append(Row("pacer-dense", "pacer dense (no upcycling), data-free samples", "pacer",
                    pacer={"enable_moe_upcycle": False, "router": "data_free"}))
    rows.append(Row("pacer-dense-fewshot", "pacer dense (no upcycling), sample lines", "pacer",
                    pacer={"enable_moe_upcycle": False}, few_shot=True))
    return rows


def write_plan(row: Row, models: list[Path], base: Path, samples: dict[Path, Path], out: Path,
               path: Path, seed: int) -> str:
    """The row's plan file (absolute paths); returns its text."""
    plan: dict[str, Any] = {"project_name": row.slug, "models": [str(m) for m in models],
                            "output": {"path": str(out)}, "method": row.method, "seed": seed}
    if row.base:
        plan["base_model"] = str(base)
    if row.parameters:
        plan["parameters"] = dict(row.parameters)
    pacer = dict(row.pacer)
    if row.few_shot:  # keyed by each model path exactly as written under models:
        pacer["router_samples"] = {str(m): str(samples[m]) for m in models}
    if pacer:
        plan["pacer"] = pacer
    text = yaml.safe_dump(plan, sort_keys=False, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


@dataclass
class CliResult:
    ok: bool
    error: str  # the one-line error when not ok
    seconds: float
    command: str


def cli(args: list[str], threads: int, log: Path) -> CliResult:
    """Run `pacer-stream ARGS` as a process; its output goes to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pacer_stream", *args]
    t = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ pacer-stream {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    shown = "pacer-stream " + " ".join(args)
    if proc.returncode == 0:
        return CliResult(True, "", seconds, shown)
    return CliResult(False, one_line_error(proc.stderr, proc.returncode), seconds, shown)


def one_line_error(stderr: str, code: int) -> str:
    """The CLI's `pacer-stream: error: ...` line, else the last line of a traceback."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("pacer-stream: error:"):
            return line[len("pacer-stream: error:"):].strip()
    return (lines[-1] if lines else "no output") + f" (exit {code})"


# -----------------------------------------------------------------------------
# what a merge output says about itself

def report_facts(out: Path) -> dict[str, Any]:
    """From pacer_report.json: export format, upcycled blocks, M, clusters, growth, router."""
    path = out / "pacer_report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    pacer = report.get("pacer") or {}
    decision = pacer.get("decision") or {}
    facts = {"exported_as": pacer.get("exported_as"), "upcycled": decision.get("blocks"),
             "num_experts": decision.get("num_experts"), "mode": decision.get("mode"),
             "clusters": decision.get("clusters"),
             "reported_growth": (pacer.get("parameters") or {}).get("growth")}
    router = pacer.get("router")
    if isinstance(router, dict):  # the engine's own measurement of its gate
        facts["router"] = {"kind": router.get("kind"),
                           **{key: mean_of(find_keys(router, (key,)))
                              for key in ("held_out_accuracy", "calibration_accuracy")}}
    else:  # another layout: keep whatever it calls routing accuracy
        facts["router"] = find_keys(report, ("routing", "accuracy")) or None
    return {k: v for k, v in facts.items() if v is not None}


def mean_of(found: dict[str, Any]) -> float | None:
    values = [v for v in found.values() if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def find_keys(tree: Any, words: tuple[str, ...], path: str = "") -> dict[str, Any]:
    """Every value whose key contains all ``words``, by its JSON path."""
    found: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            where = f"{path}.{key}" if path else str(key)
            if all(w in str(key).lower() for w in words):
                found[where] = value
            else:
                found.update(find_keys(value, words, where))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found.update(find_keys(value, words, f"{path}[{i}]"))
    return found


def param_growth(out: Path, source_params: int) -> float:
    return checkpoint_params(out) / source_params


def fresh(folder: Path) -> Path:
    """An empty folder (our own work folder: a previous run's output is removed)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder
