"""Every named failpoint of every method: SIGKILL there, check that nothing looks
finished, resume, and compare the output byte for byte with an uninterrupted run.

The cases are data; a test reads the failpoint names out of the source, so a new
failpoint that no case reaches fails the suite instead of going untested.
"""

from __future__ import annotations

import hashlib
import re
import signal
from pathlib import Path

import pytest

from runs import DESCRIBING, run_cli

ROOT = Path(__file__).resolve().parents[1]

# method -> (fixture family, models, plan lines)
PLANS = {
    "ties": ("llama", ("ft1", "ft2", "ft3"),
             "method: ties\nparameters: {density: 0.5}\n"),
    "pacer": ("conflict", ("m1", "m2", "m3"),  # upcycles block 2 to experts
              "method: pacer\npacer: {interference_threshold: 0.35, router: data_free}\n"),
    # the same, written for llama.cpp (every block MoE; the calibration reads the written
    # blocks back through export/llamacpp.py's map, after the kill too)
    "pacer_llamacpp": ("conflict", ("m1", "m2", "m3"),
                       "method: pacer\npacer: {interference_threshold: 0.35, router: data_free}\n"),
    "split_merge": ("llama", ("ft1", "ft2", "perm"),
                    "method: split_merge\nparameters: {density: 0.3}\n"),
    "align_only": ("llama", ("anchor", "perm"), "method: linear\nalign: only\n"),
}
# (method, failpoint:n): the n-th time the run passes that point it is killed
CASES = [
    ("ties", "tensor-written:5"), ("ties", "unit-done:2"),
    ("pacer", "stats-unit:2"), ("pacer", "tensor-written:9"),  # align-unit: align_only's
    ("pacer", "calibrated-block:2"),  # the data-free router's stage
    ("pacer", "generated-model:2"), ("pacer", "regmean-block:3"),  # its samples, RegMean
    ("pacer_llamacpp", "calibrated-block:2"),
    # split_merge: 4 units a pass: variance-high 1-4, variance-low (μ) 5-8, gram 9-12,
    # eta 13-16; then its finish: η and split_merge.json written (1), μ's shards renamed (2)
    ("split_merge", "unit-done:2"), ("split_merge", "unit-done:6"),
    ("split_merge", "unit-done:10"), ("split_merge", "unit-done:15"),
    ("split_merge", "split-finish:1"), ("split_merge", "split-finish:2"),
    ("align_only", "align-unit:2"), ("align_only", "aligned-unit:1"),
]

pytestmark = pytest.mark.slow


def write_plan(tmp: Path, fixtures: Path, method: str, out: str) -> Path:
    family, names, lines = PLANS[method]
    refs = ", ".join(str(fixtures / family / m) for m in names)
    plan = tmp / f"{out}.yaml"
    target = ", target: llama.cpp" if method.endswith("llamacpp") else ""
    plan.write_text(f"models: [{refs}]\n{lines}seed: 2\n"
                    f"output: {{path: {tmp / out}, shard_size: 60KB{target}}}\n")
    return plan


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every output file, sub-folders included, but the state and the files that
    name the folder and the command (runs.DESCRIBING: report, card, plan as run)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name not in DESCRIBING and ".pacer-state" not in p.parts}


def looks_finished(folder: Path, finishing: bool = False) -> list[str]:
    """Files that would make a folder (or an align-only peer folder) look like a finished
    checkpoint or a finished run: a config, an index, model shards, the report. While a
    run is finishing (shards renamed, index written), config.json is still absent."""
    markers = ("config.json", "pacer_report.json")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name in markers or not finishing and (
                      p.name == "model.safetensors.index.json"
                      or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", p.name)))


@pytest.fixture(scope="module")
def references(tmp_path_factory, fixtures_dir) -> dict[str, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("fault-reference")
    out = {}
    for method in PLANS:
        proc = run_cli(write_plan(tmp, fixtures_dir, method, method))
        assert proc.returncode == 0, proc.stderr
        out[method] = tree(tmp / method)
    return out


def test_every_failpoint_in_the_source_has_a_case():
    named = set()
    for path in (ROOT / "pacer_stream").rglob("*.py"):
        named |= set(re.findall(r'failpoints\.hit\("([\w-]+)"\)', path.read_text()))
    covered = {case.split(":")[0] for _, case in CASES}
    assert named and named <= covered, f"failpoints without a case: {sorted(named - covered)}"
    assert {method for method, _ in CASES} == set(PLANS)


@pytest.mark.parametrize("method, failpoint", CASES)
def test_killed_at_every_failpoint_resumes_to_identical_bytes(method, failpoint, references,
                                                              fixtures_dir, tmp_path):
    plan = write_plan(tmp_path, fixtures_dir, method, "out")
    killed = run_cli(plan, failpoint=failpoint)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    assert looks_finished(tmp_path / "out", finishing="finish" in failpoint) == []
    resumed = run_cli(plan)
    assert resumed.returncode == 0, resumed.stderr
    assert tree(tmp_path / "out") == references[method]
