"""The result files: a Markdown page for people and a JSON file with every number.

One table per task. A domain's cell is `score (retention)`; then mean retention, parameter
growth (output parameters / one source model's), what PACER upcycled, and routing accuracy
where a router was measured.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import transformers


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "pacer_stream": checkout(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def checkout() -> str:
    """The commit of this checkout, and whether pacer_stream/ has uncommitted changes."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "pacer_stream"], cwd=repo,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in pacer_stream/" if dirty else "")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value + 0.0 if value != 0 else 0.0:.{digits}f}"  # never "-0.000"
    return str(value)


def task_table(task: dict[str, Any]) -> list[str]:
    domains = task["domains"]
    head = ["row", "params ×", *domains, "mean retention", "upcycled (M)",
            "routing acc. (eval)", "router (report: held-out acc.)", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))
             + "|"]
    for row in task["rows"]:
        if row["status"] != "ok":
            cells = [row["name"], "", f"{row['status']}", *[""] * (len(head) - 3)]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
            continue
        cells = [row["name"], fmt(row.get("params_x"), 2)]
        for d in domains:
            cells.append(f"{fmt(row['scores'][d])} ({fmt(row['retention'][d], 2)})")
        facts = row.get("facts", {})
        upcycled = facts.get("upcycled")
        cells.append(fmt(row.get("mean_retention"), 3))
        cells.append("" if upcycled is None else
                     f"{upcycled} ({facts.get('num_experts', '–')})")
        cells.append(routing_cell(row))
        cells.append(reported_router(facts))
        cells.append(fmt(row.get("seconds"), 0))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def routing_cell(row: dict[str, Any]) -> str:
    """Our measurement on the eval data: the mean over layers (or over domains)."""
    acc = row.get("routing_accuracy")
    if not acc:
        return ""
    return fmt(sum(acc.values()) / len(acc), 2)


def reported_router(facts: dict[str, Any]) -> str:
    """The engine's pacer_report.json router section: its kind and held-out accuracy."""
    router = facts.get("router")
    if not router:
        return ""
    if "kind" not in router:
        return json.dumps(router)[:60]
    held = router.get("held_out_accuracy")
    calibration = router.get("calibration_accuracy")
    shown = f"{fmt(held, 2)}" if held is not None else (
        f"calib. {fmt(calibration, 2)}" if calibration is not None else "–")
    return f"{router['kind']}: {shown}"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    m = result["machine"]
    lines = [f"# Merge quality on real data: domain set {result['set']}", "",
             "Written by `benchmarks/quality/run.py` (see the README "
             "section *Merge quality benchmark*).", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; "
             f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; "
             f"pacer_stream at {m['pacer_stream']}.", "",
             f"Profile `{result['profile']['name']}`, seeds: text "
             f"{result['profile']['text']['seed']}, images {result['profile']['images']['seed']}, "
             f"merges {result['merge_seed']}. "
             "Settings (JSON has all of them):", ""]
    t, i = result["profile"]["text"], result["profile"]["images"]
    lines += [f"- text: byte-level Llama, hidden {t['hidden']}, {t['layers']} layers, "
              f"{t['heads']} heads, MLP {t['intermediate']}, context {t['context']}; base "
              f"{t['base_steps']} steps (lr {t['base_lr']}) on all domains, experts "
              f"{t['expert_steps']} steps (lr {t['expert_lr']}) each, batch {t['batch']}, AdamW",
              f"- images: ViT, hidden {i['hidden']}, {i['layers']} layers, {i['heads']} heads, "
              f"MLP {i['intermediate']}, patch {i['patch']}; base {i['base_steps']} steps, "
              f"experts {i['expert_steps']} steps (lr {i['expert_lr']}), batch {i['batch']}",
              f"- merges: {json.dumps(result['profile']['merge'])}; each row's plan keys besides "
              "models, output and seed:", ""]
    lines += [f"  - {name}: `{keys}`" for name, keys in result["row_plans"].items()]
    lines.append("")
    if "text" in result["tasks"]:
        lines += ["Text data (train / router / eval chunks of at most "
                  f"{t['context'] - 1} bytes, split by document):", ""]
        for name, d in result["tasks"]["text"]["data"].items():
            lines.append(f"- `{name}`: {d['description']}; {d['train']} train chunks "
                         f"({d['train_bytes']} bytes), {d['router']} router, {d['eval']} eval; "
                         f"documents {d['documents']}")
        lines.append("")
    if "images" in result["tasks"]:
        d = result["tasks"]["images"]["data"]
        lines += [f"Image data: {d['description']}; groups {d['groups']}; {d['train']} train, "
                  f"{d['router']} router, {d['eval']} eval images.", ""]
    for kind, title in (("text", "Text: held-out bits per byte (retention)"),
                        ("images", "Images: held-out accuracy (retention)")):
        if kind in result["tasks"]:
            task = result["tasks"][kind]
            lines += [f"## {title}", "", f"Metric: {task['metric']}. Retention = (base − merge) "
                      "/ (base − that domain's expert); 1.0 keeps the expert's whole gain. "
                      "params × = output parameters / one source model's.", ""]
            lines += task_table(task) + [""]
            notes = task.get("notes") or []
            lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["## Timings", "", "| phase | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in result["timings"].items()]
    for kind, task in result["tasks"].items():  # what training cost, even when cached
        trained = {k: v["seconds"] for k, v in task["training"].items() if isinstance(v, dict)}
        lines += ["", f"{kind} training, seconds per model when trained: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in trained.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(no_nan(result), indent=1, default=str) + "\n")


def no_nan(tree: Any) -> Any:
    """NaN (an undefined retention) as null: strict JSON has no NaN."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    if isinstance(tree, dict):
        return {k: no_nan(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [no_nan(v) for v in tree]
    return tree
