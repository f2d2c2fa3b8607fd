"""Split-Merge never loses a byte: whole files, finite numbers, truthful summaries (issue 14)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import make_fixtures
from runs import digests, min_budget, plan_of, random_llamas, run_cli
from test_split_merge import write_plan
from pacer_stream.cli import main
from pacer_stream.errors import PacerError
from pacer_stream.io.writer import OutTensor, ShardWriter, plan_shards, verify_shards
from pacer_stream.sizes import format_size

NORM = "model.norm.weight"  # the last tensor of η's layout for the llama fixture


def save_models(tmp: Path, sources: list[Path], edit) -> list[Path]:
    """Copies of ``sources`` as single-file checkpoints, ``edit(k, state)`` applied to each."""
    out = []
    for k, src in enumerate(sources):
        folder = tmp / f"m{k}"
        folder.mkdir()
        shutil.copy(src / "config.json", folder / "config.json")
        state = make_fixtures.file_state(src)
        edit(k, state)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        out.append(folder)
    return out


def loud_norm(k: int, state: dict[str, torch.Tensor]) -> None:
    """The models disagree wildly on the first half of the final norm, agree on the second:
    η's last tensor is dense (half selected) with unselected trailing entries."""
    norm = torch.ones_like(state[NORM])
    half = norm.numel() // 2
    norm[:half] = 10.0 * (k + 1)
    state[NORM] = norm


def header_size(path: Path) -> int:
    """Bytes a safetensors file must have: 8 + header + the end of its last tensor."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return 8 + n + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")


def run_loud(plan: Path, *args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    """``pacer-stream run`` without --quiet: the summary line is printed."""
    env = {k: v for k, v in os.environ.items() if k != "PACER_STREAM_FAILPOINT"}
    if failpoint:
        env["PACER_STREAM_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "pacer_stream", "run", str(plan), *args],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def fixture_models(fixtures_dir) -> list[Path]:
    return [fixtures_dir / "llama" / m for m in ("ft1", "ft2", "perm")]


@pytest.fixture(scope="module")
def loud(tmp_path_factory, fixture_models) -> tuple[subprocess.CompletedProcess, Path]:
    """A Split-Merge whose last η tensor is dense with unselected trailing entries."""
    tmp = tmp_path_factory.mktemp("loud")
    models = save_models(tmp, fixture_models, loud_norm)
    proc = run_loud(write_plan(tmp, models))
    return proc, tmp / "out"


# -- 15: η (and every shard) is written whole -----------------------------------------------

def test_dense_eta_with_unselected_trailing_entries_is_whole(loud, tmp_path):
    proc, out = loud
    assert proc.returncode == 0, proc.stderr
    eta = out / "eta.safetensors"
    assert eta.stat().st_size == header_size(eta)
    from safetensors import safe_open
    with safe_open(str(eta), "pt") as f:
        assert NORM in f.keys()  # the dense form
        norm = f.get_tensor(NORM)
    half = norm.numel() // 2
    assert bool((norm[:half] != 0).all()) and bool((norm[half:] == 0).all())
    result = CliRunner().invoke(main, ["materialize", str(out), "--expert", "0",
                                       "--to", str(tmp_path / "e0")])
    assert result.exit_code == 0, result.output


def test_shard_writer_sizes_a_partial_file_in_full(tmp_path):
    shards = plan_shards([OutTensor("a", "F32", (4,)), OutTensor("b", "F32", (8,))], 1 << 30)
    writer = ShardWriter(tmp_path, shards)
    writer.write("a", torch.ones(4))  # "b" is never written: it must read back as zeros
    writer.sync()
    writer.finish(shards[0])
    writer.close()
    path = tmp_path / shards[0].file
    assert path.stat().st_size == shards[0].size
    verify_shards(tmp_path, shards)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("b"), torch.zeros(8))


def test_shard_writer_refuses_to_rename_a_short_file(tmp_path):
    shards = plan_shards([OutTensor("a", "F32", (4,))], 1 << 30)
    writer = ShardWriter(tmp_path, shards)
    writer.write("a", torch.ones(4))
    writer.sync()
    writer.close()
    os.truncate(tmp_path / shards[0].partial, shards[0].size - 4)  # e.g. a disk lost a block
    with pytest.raises(PacerError, match="incomplete"):
        ShardWriter(tmp_path, shards).finish(shards[0])
    assert not (tmp_path / shards[0].file).exists()


def test_shard_writer_never_writes_past_a_tensor(tmp_path):
    shards = plan_shards([OutTensor("a", "F32", (2, 2)), OutTensor("b", "F32", (4,))], 1 << 30)
    writer = ShardWriter(tmp_path, shards)
    writer.write("b", torch.ones(4))
    with pytest.raises(AssertionError, match="slot"):
        writer.write("a", torch.zeros(2, 2), first_row=1)  # one row too many
    writer.close()


def test_verify_shards_names_a_bad_file(tmp_path):
    shards = plan_shards([OutTensor("a", "F32", (4,))], 1 << 30)
    path = tmp_path / shards[0].file
    path.write_bytes(shards[0].header + bytes(12))  # 4 bytes short
    with pytest.raises(PacerError, match=shards[0].file):
        verify_shards(tmp_path, shards)
    path.write_bytes(b"x" * shards[0].size)  # right size, foreign header
    with pytest.raises(PacerError, match="header"):
        verify_shards(tmp_path, shards)
    with pytest.raises(PacerError, match="cannot read"):
        verify_shards(tmp_path / "nowhere", shards)


# -- 17: the summary line says what was done ---------------------------------------------------

def test_summary_line_counts_units_and_bytes(loud):
    proc, out = loud
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    info = json.loads((out / "split_merge.json").read_text())
    assert "merged 0 units" not in line
    assert "merged 4 units" in line  # embed, block.0, block.1, head
    assert f"wrote {format_size(info['mu_bytes'] + info['eta_bytes'])}" in line
    report = json.loads((out / "pacer_report.json").read_text())
    assert report["this_run"]["units_done"] == ["embed", "block.0", "block.1", "head"]


@pytest.mark.slow
def test_summary_line_after_a_resume(fixture_models, tmp_path):
    plan = write_plan(tmp_path, fixture_models)
    assert run_cli(plan, failpoint="unit-done:14").returncode == -9  # eta pass, unit 1 done
    proc = run_loud(plan)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert "merged 2 units, 2 resumed" in line  # block.1 and head still had their η to write
    assert "wrote 0 B" not in line


# -- 14: the result does not depend on the budget ---------------------------------------------

def wide_models(tmp: Path) -> list[Path]:
    """Three random Llama models whose embedding and head span four Gram row groups."""
    return random_llamas(tmp, 3, seed=1, prefix="w", hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=16384)


@pytest.mark.slow
def test_gram_row_groups_make_the_result_budget_independent(tmp_path):
    models = wide_models(tmp_path)
    # the smallest budget that fits: the Gram pass holds one 4096-row group at a time
    probe = write_plan(tmp_path, models, out="probe")
    tiny = min_budget(probe)
    assert plan_of(probe, tiny).units[0].sliced  # the embedding is sliced
    outs = []
    for name, args in (("whole", ()), ("sliced", ("--max-memory", str(tiny)))):
        proc = run_cli(write_plan(tmp_path, models, out=name), *args)
        assert proc.returncode == 0, proc.stderr
        outs.append(tmp_path / name)
    assert digests(outs[0]) == digests(outs[1])  # split_merge.json and η included
    for out in outs:
        result = CliRunner().invoke(main, ["materialize", str(out), "--expert", "1",
                                           "--to", str(out.with_name(out.name + "-e1"))])
        assert result.exit_code == 0, result.output
    assert digests(tmp_path / "whole-e1") == digests(tmp_path / "sliced-e1")


# -- non-finite numbers are refused ------------------------------------------------------------

def test_split_merge_refuses_a_non_finite_gram(fixture_models, tmp_path):
    def poison(k: int, state: dict[str, torch.Tensor]) -> None:
        if k == 1:
            state["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")

    models = save_models(tmp_path, fixture_models, poison)
    proc = run_cli(write_plan(tmp_path, models), "--allow-nonfinite")
    assert proc.returncode == 2, proc.stderr
    assert "NaN or Inf" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "split_merge.json").exists()
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.fixture(scope="module")
def split_out(tmp_path_factory, fixture_models) -> Path:
    tmp = tmp_path_factory.mktemp("plain")
    proc = run_cli(write_plan(tmp, fixture_models))
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


def materialize_cli(*args: str):
    return CliRunner().invoke(main, ["materialize", *map(str, args)])


def assert_refused(folder: Path, tmp_path: Path, *args: str, needle: str):
    """``materialize FOLDER ARGS --to <new folder>`` exits 2 naming ``needle``, writes nothing."""
    to = tmp_path / "x"
    result = materialize_cli(folder, *args, "--to", to)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not to.exists()
    return result


def damaged_copy(split_out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(split_out, copy)
    return copy


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_materialize_refuses_a_non_finite_coefficient(split_out, tmp_path, value):
    result = assert_refused(split_out, tmp_path, "--coefficient", value, needle="finite")
    assert len(result.output.strip().splitlines()) == 1


def test_materialize_refuses_non_finite_coefficients_in_the_info(split_out, tmp_path):
    copy = damaged_copy(split_out, tmp_path)
    info = json.loads((copy / "split_merge.json").read_text())
    info["coefficients"][0] = float("nan")
    (copy / "split_merge.json").write_text(json.dumps(info))  # json writes NaN
    assert_refused(copy, tmp_path, "--expert", "1", needle="finite")


def test_materialize_refuses_non_finite_eta(split_out, tmp_path):
    from safetensors import safe_open

    copy = damaged_copy(split_out, tmp_path)
    with safe_open(str(copy / "eta.safetensors"), "pt") as f:
        meta, eta = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    values = next(k for k in sorted(eta) if not k.endswith("::indices"))
    eta[values][0] = float("inf")
    save_file(eta, str(copy / "eta.safetensors"), metadata=meta)
    assert_refused(copy, tmp_path, "--expert", "0", needle="NaN or Inf")


def test_materialize_refuses_an_overflowing_coefficient(split_out, tmp_path):
    assert_refused(split_out, tmp_path, "--coefficient", "1e300", needle="overflow")


def test_materialize_refuses_a_target_overlapping_the_split_output(split_out, tmp_path):
    before = digests(split_out)
    link = tmp_path / "link"
    link.symlink_to(split_out)
    for to in (split_out, split_out / "expert", link / "expert", split_out.parent,
               split_out / ".." / split_out.name):
        result = materialize_cli(split_out, "--expert", "0", "--to", to)
        assert result.exit_code == 2, (to, result.output)
        assert "split output" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (split_out / "expert").exists()
    assert digests(split_out) == before


def test_materialize_refuses_an_unfinished_split_output(fixture_models, tmp_path):
    plan = write_plan(tmp_path, fixture_models)
    assert run_cli(plan, failpoint="split-finish:1").returncode == -9  # η and its json written
    assert_refused(tmp_path / "out", tmp_path, "--expert", "0", needle="not finished")


def test_materialize_refuses_a_file_as_target(split_out, tmp_path):
    to = tmp_path / "file"
    to.write_text("x")
    result = materialize_cli(split_out, "--expert", "0", "--to", to)
    assert result.exit_code == 2 and "not a folder" in result.output, result.output
