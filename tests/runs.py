"""Helpers for tests that run `pacer-stream` as a real process or through click's CliRunner."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def run_cli(plan: Path, *args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    """``pacer-stream run PLAN --quiet ARGS`` in a subprocess, optionally with a failpoint."""
    env = {k: v for k, v in os.environ.items() if k != "PACER_STREAM_FAILPOINT"}
    if failpoint:
        env["PACER_STREAM_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "pacer_stream", "run", str(plan), "--quiet",
                           *args], capture_output=True, text=True, env=env)


# Files that describe the run rather than the model: the report records timings, the card
# and the plan as run name the output folder and the command (test_card.py checks that a
# resumed run writes them byte for byte again).
DESCRIBING = ("pacer_report.json", "README.md", "pacer_plan.yaml")


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every output file that makes up the model (all but DESCRIBING), so that
    outputs in different folders, made by different commands, compare."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in DESCRIBING}


def random_llamas(tmp: Path, count: int, seed: int = 0, prefix: str = "m",
                  **dims: int) -> list[Path]:
    """``count`` random bf16 Llama checkpoints of the given dims (a one-file safetensors
    each), in ``tmp/<prefix><k>``: models that share nothing, for budget and slicing tests."""
    import json

    import torch
    from safetensors.torch import save_file

    import make_header_only

    config = {**make_header_only.LLAMA3_70B, **dims}
    gen = torch.Generator().manual_seed(seed)
    models = []
    for k in range(count):
        folder = tmp / f"{prefix}{k}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        tensors = {name: torch.randn(shape, generator=gen).to(torch.bfloat16)
                   for name, shape in make_header_only.llama_tensors(config)}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        models.append(folder)
    return models


def plan_of(plan: Path, budget: int | None = None):
    """What ``pacer-stream plan`` computes for a plan file (under ``budget``)."""
    from pacer_stream.config import load_plan
    from pacer_stream.inputs import ModelSet
    from pacer_stream.planner import make_plan

    config = load_plan(plan)
    return make_plan(config, ModelSet.from_plan(config), budget or 10**12)


def min_budget(plan: Path) -> int:
    """The smallest --max-memory the plan fits in (the planner's own figure)."""
    return plan_of(plan).min_budget_bytes


def fails_with(result, *needles: str) -> None:
    """A CliRunner result refused the user's way: exit 2, one stderr line naming the problem."""
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("pacer-stream: error: "), line
    for needle in needles:
        assert needle in line, line
