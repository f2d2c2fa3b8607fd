"""Never lose a byte: inputs are never written, every check runs before any delete,
garbage is refused instead of merged, and every failure is one line with exit status 2.

Each test reproduces one way the fault probe of issue 14 lost data or produced a
bad model with exit 0.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import make_fixtures
from runs import DESCRIBING, run_cli

FAMILY = "llama"
PEERS = ("ft1", "ft2", "ft3")


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def model_digest(folder: Path) -> dict[str, str]:
    """sha256 of the files of a merged model (not runs.DESCRIBING: the report records
    timings, the card and the plan as run name the folder and the command)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in DESCRIBING}


@pytest.fixture
def models(fixtures_dir, tmp_path) -> Path:
    """Private copies of the llama fixtures, so a test may damage or watch them."""
    for m in ("anchor", *PEERS):
        shutil.copytree(fixtures_dir / FAMILY / m, tmp_path / "models" / m)
    return tmp_path / "models"


def write_plan(tmp: Path, models: Path, out: Path | str = "out", method: str = "ties",
               extra: str = "", names: tuple[str, ...] = PEERS) -> Path:
    refs = ", ".join(str(models / m) for m in names)
    out = out if isinstance(out, Path) else tmp / out
    params = "parameters: {density: 0.5}\n" if method == "ties" else ""
    plan = tmp / f"plan-{abs(hash((str(out), method, extra)))}.yaml"
    plan.write_text(f"models: [{refs}]\nmethod: {method}\n{params}seed: 1\n"
                    f"output: {{path: {out}, shard_size: 90KB}}\n{extra}")
    return plan


def run_here(plan: Path, *args: str) -> SimpleNamespace:
    """``pacer-stream run PLAN --quiet ARGS`` in this process (no start-up cost), with the
    same exit status and streams as the console script."""
    from pacer_stream.cli import main

    result = CliRunner().invoke(main, ["run", str(plan), "--quiet", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout,
                           stderr=result.stderr)


def one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and "Traceback" not in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# -- data lost -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["input", "inside", "parent", "symlink"])
def test_output_never_is_contains_or_lies_inside_an_input(where, models, tmp_path):
    target = {"input": models / "ft2", "inside": models / "ft2" / "merged",
              "parent": models, "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        target.symlink_to(models / "ft2", target_is_directory=True)
    before = tree_digest(models)
    proc = run_here(write_plan(tmp_path, models, out=target), "--force")
    one_line_error(proc, "input model", "choose another output path")
    assert tree_digest(models) == before
    assert not (models / "ft2" / "merged").exists()


def test_state_dir_inside_an_input_is_refused(models, tmp_path):
    before = tree_digest(models)
    proc = run_here(write_plan(tmp_path, models), "--state-dir", str(models / "ft1" / "state"))
    one_line_error(proc, "--state-dir", "input model")
    assert tree_digest(models) == before


def test_restart_with_a_foreign_state_dir_deletes_nothing(models, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("1,2,3")
    proc = run_here(write_plan(tmp_path, models), "--state-dir", str(precious), "--restart")
    one_line_error(proc, str(precious), "not a pacer-stream run state")
    assert (precious / "thesis.tex").read_text() == "precious"
    assert (out / "results.csv").read_text() == "1,2,3"


def test_restart_does_not_empty_a_foreign_output_folder(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("1,2,3")
    proc = run_here(write_plan(tmp_path, models), "--restart")
    one_line_error(proc, "not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]


def test_state_dir_of_another_output_is_refused(models, tmp_path):
    state = tmp_path / "state"
    assert run_here(write_plan(tmp_path, models, out="first"), "--state-dir", str(state)) \
        .returncode == 0
    proc = run_here(write_plan(tmp_path, models, out="second"), "--state-dir", str(state))
    one_line_error(proc, "another output folder", str(tmp_path / "first"))
    assert not any((tmp_path / "second").glob("*.safetensors"))


def test_restart_with_a_budget_too_small_keeps_the_finished_merge(models, tmp_path):
    plan = write_plan(tmp_path, models, method="pacer")
    assert run_here(plan).returncode == 0
    before = model_digest(tmp_path / "out")
    proc = run_here(plan, "--restart", "--max-memory", "2MB")
    one_line_error(proc, "--max-memory")
    assert model_digest(tmp_path / "out") == before


def test_plan_file_inside_the_output_folder_is_refused(models, tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    plan = write_plan(out, models, out=out)
    proc = run_here(plan, "--force")
    one_line_error(proc, "holds the plan file")
    assert plan.exists()


# -- garbage with exit 0 -------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    ("models_weight", "weight"),
    ("parameters: {density: .nan}\n", "density"),
    ("parameters: {lambda: .inf}\n", "lambda"),
    ("parameters: {weight: -.inf}\n", "weight"),
])
def test_non_finite_numbers_in_the_plan_are_refused(extra, needle, models, tmp_path):
    if extra == "models_weight":
        plan = tmp_path / "nan.yaml"
        plan.write_text(f"models: [{{model: {models / 'ft1'}, weight: .nan}}, {models / 'ft2'}]\n"
                        f"method: linear\noutput: {{path: {tmp_path / 'out'}}}\n")
    else:
        plan = write_plan(tmp_path, models, method="dare_ties", extra=extra)
    one_line_error(run_here(plan), needle, "finite")
    assert not (tmp_path / "out").exists()


def _retype(folder: Path, name: str, dtype: torch.dtype) -> None:
    """Store tensor ``name`` of the model in ``folder`` as ``dtype`` (bit pattern or value)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    file = folder / index["weight_map"][name]
    tensors = load_file(str(file))
    tensor = tensors[name]
    if dtype == torch.int32:  # same byte size, other meaning: the probe's F32 -> I32
        tensors[name] = tensor.float().view(torch.int32)
    else:
        tensors[name] = tensor.to(dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_float_and_integer_dtypes_are_not_merged(models, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    _retype(models / "ft2", name, torch.int32)
    proc = run_here(write_plan(tmp_path, models))
    one_line_error(proc, name, "I32", "only floating-point dtypes may differ")
    assert not (tmp_path / "out").exists()


def test_different_float_dtypes_merge_in_fp32(models, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight"
    _retype(models / "ft2", name, torch.float32)  # the fixtures are stored in another dtype
    plan = write_plan(tmp_path, models, method="linear", names=("ft1", "ft2"))
    proc = run_here(plan)
    assert proc.returncode == 0, proc.stderr
    a = make_fixtures.file_state(models / "ft1")[name]
    b = make_fixtures.file_state(models / "ft2")[name]
    merged = make_fixtures.file_state(tmp_path / "out")[name]
    assert merged.dtype == a.dtype
    assert torch.equal(merged, ((a.float() + b.float()) / 2).to(a.dtype))


def _damage_values(folder: Path) -> Path:
    """Change a shard's tensor data without changing its header or size."""
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    shard.write_bytes(bytes(data))
    return shard


def test_inputs_changed_before_a_resume_are_refused_by_name(models, tmp_path):
    plan = write_plan(tmp_path, models)
    assert run_cli(plan, failpoint="unit-done:2").returncode == -signal.SIGKILL
    shard = _damage_values(models / "ft3")
    proc = run_here(plan)
    one_line_error(proc, shard.name, "changed", "--restart")
    assert not (tmp_path / "out" / "config.json").exists()
    assert run_here(plan, "--restart").returncode == 0


def test_hashed_inputs_accept_a_touched_file_and_refuse_a_changed_one(models, tmp_path):
    plan = write_plan(tmp_path, models)
    assert run_cli(plan, "--hash-inputs", failpoint="unit-done:2").returncode == -signal.SIGKILL
    shard = sorted((models / "ft1").glob("model-*.safetensors"))[0]
    os.utime(shard, ns=(1, 1))  # touched: another mtime, the same bytes
    assert run_here(plan, "--hash-inputs").returncode == 0
    reference = tmp_path / "reference"
    assert run_here(write_plan(tmp_path, models, out=reference)).returncode == 0
    assert model_digest(tmp_path / "out") == model_digest(reference)
    # a finished merge over changed inputs is no longer "already complete"
    _damage_values(models / "ft1")
    one_line_error(run_here(plan), "changed since the finished merge", "--restart")


def test_config_differences_that_change_the_function_are_refused(models, tmp_path):
    config = json.loads((models / "ft2" / "config.json").read_text())
    config["rope_theta"] = 1234.0
    config["rms_norm_eps"] = 1e-3
    (models / "ft2" / "config.json").write_text(json.dumps(config))
    proc = run_here(write_plan(tmp_path, models))
    one_line_error(proc, "rope_theta", "1234.0", "rms_norm_eps", "accept_config_differences")
    assert not (tmp_path / "out").exists()
    accepted = write_plan(tmp_path, models, out="accepted",
                          extra="accept_config_differences: [rope_theta, rms_norm_eps]\n")
    assert run_here(accepted).returncode == 0
    written = json.loads((tmp_path / "accepted" / "config.json").read_text())
    anchor = json.loads((models / "ft1" / "config.json").read_text())
    assert written["rms_norm_eps"] == anchor["rms_norm_eps"] != 1e-3


def test_plan_level_weight_is_used(models, tmp_path):
    plan = tmp_path / "weights.yaml"
    plan.write_text(f"models: [{{model: {models / 'ft1'}, weight: 1.0}}, {models / 'ft2'}]\n"
                    f"method: linear\nparameters: {{weight: 3.0}}\n"
                    f"output: {{path: {tmp_path / 'out'}, dtype: float32}}\n")
    assert run_here(plan).returncode == 0
    name = "model.layers.0.mlp.down_proj.weight"
    a = make_fixtures.file_state(models / "ft1")[name].float()
    b = make_fixtures.file_state(models / "ft2")[name].float()
    merged = make_fixtures.file_state(tmp_path / "out")[name]
    assert torch.allclose(merged, (a + 3 * b) / 4, atol=1e-6)


@pytest.mark.parametrize("method, extra, needle", [
    ("linear", "parameters: {density: 0.5}\n", "parameters.density"),
    ("task_arithmetic", "parameters: {rescale: l1}\n", "parameters.rescale"),
    ("split_merge", "parameters: {weight: 0.5}\n", "parameters.weight"),
    ("pacer", "parameters: {density: 0.5}\n", "dense layers are the models' mean"),
    ("pacer", "pacer: {dropout_rate: 0.2}\n", "pacer.dropout_rate"),  # dense layers: the mean
    ("pacer", "parameters: {lambda: 0.5}\n", "parameters.lambda"),
    ("ties", "pacer: {interference_threshold: 0.2}\n", "pacer.interference_threshold"),
    ("ties", "pacer: {anchor_strategy: lowest_magnitude}\n", "without align"),
    ("ties", "pacer: {align: true}\n", "pacer.align"),
    ("linear", "base_model: BASE\n", "base_model"),
])
def test_plan_values_a_method_ignores_are_refused_by_name(method, extra, needle, models,
                                                          tmp_path):
    extra = extra.replace("BASE", str(models / "anchor"))
    if method == "task_arithmetic":
        extra += f"base_model: {models / 'anchor'}\n"
    plan = write_plan(tmp_path, models, method=method, extra=extra)
    one_line_error(run_here(plan), needle)


# -- errors: one line, exit 2 --------------------------------------------------------

@pytest.mark.parametrize("flag", ["--shard-size", "--max-memory"])
def test_absurd_sizes_are_one_line_errors(flag, models, tmp_path):
    one_line_error(run_here(write_plan(tmp_path, models), flag, "1e400"), flag)


def _invoke(args: list[str]):
    from pacer_stream.cli import main

    return CliRunner().invoke(main, args)


def test_unreadable_shard_is_one_line(models, tmp_path, monkeypatch):
    from pacer_stream.io import sources

    def denied(self, offset, length):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

    monkeypatch.setattr(sources.LocalFile, "read", denied)
    result = _invoke(["run", str(write_plan(tmp_path, models)), "--quiet"])
    assert result.exit_code == 2
    assert "Permission denied" in result.output and "permissions" in result.output
    assert result.output.strip().count("\n") == 0


def test_full_disk_while_saving_the_state_is_one_line(models, tmp_path, monkeypatch):
    from pacer_stream.state import RunState

    def full(self, unit, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "zarr.json"))

    monkeypatch.setattr(RunState, "mark_done", full)
    result = _invoke(["run", str(write_plan(tmp_path, models)), "--quiet"])
    assert result.exit_code == 2
    assert "No space left on device" in result.output and "resume" in result.output
    assert result.output.strip().count("\n") == 0


def test_a_second_run_on_a_locked_output_refuses_at_once(models, tmp_path):
    from pacer_stream.lock import OutputLock

    plan = write_plan(tmp_path, models)
    with OutputLock(tmp_path / "out"):
        proc = run_here(plan)
    one_line_error(proc, "in use by another pacer-stream run", f"pid {os.getpid()}")
    assert not any((tmp_path / "out").glob("*.safetensors"))
    assert run_here(plan).returncode == 0  # released: the next run goes ahead


def test_a_killed_run_leaves_no_lock_that_blocks_the_resume(models, tmp_path):
    plan = write_plan(tmp_path, models)
    assert run_cli(plan, failpoint="unit-done:1").returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "out" / ".pacer-lock").read_text())["pid"] > 0
    assert run_here(plan).returncode == 0
    assert (tmp_path / "out" / ".pacer-lock").read_bytes() == b""


# -- nothing half-written looks complete ----------------------------------------------

def test_no_shard_or_config_looks_final_before_the_run_is(models, tmp_path):
    plan = write_plan(tmp_path, models)
    assert run_cli(plan, failpoint="unit-done:3").returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert not (out / "config.json").exists()
    assert not list(out.glob("model*.safetensors")), sorted(p.name for p in out.iterdir())
    assert list(out.glob(".model*.partial"))
    assert run_here(plan).returncode == 0


@pytest.mark.slow
def test_align_only_summary_counts_what_it_wrote(models, tmp_path):
    from pacer_stream.sizes import format_size

    plan = write_plan(tmp_path, models, method="linear", extra="align: only\n")
    proc = subprocess.run([sys.executable, "-m", "pacer_stream", "run", str(plan)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*.safetensors"))
    assert written > 0 and "wrote 0 B" not in proc.stdout
    assert f"wrote {format_size(written)}" in proc.stdout


def test_analyze_never_writes_into_an_input(models, tmp_path):
    before = tree_digest(models)
    result = _invoke(["analyze", "--models", str(models / "ft1"), str(models / "ft2"),
                      "--output", str(models / "ft1" / "analysis.json"), "--quiet"])
    assert result.exit_code == 2 and "input model" in result.output
    assert tree_digest(models) == before


def test_a_disk_too_small_for_the_output_is_refused_before_writing(models, tmp_path,
                                                                   monkeypatch):
    from collections import namedtuple

    from pacer_stream import preflight

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000,
                                                                           5000))
    result = _invoke(["run", str(write_plan(tmp_path, models)), "--quiet"])
    assert result.exit_code == 2
    assert "5.0 KB free" in result.output and "the output needs" in result.output
    assert not (tmp_path / "out").exists()
