"""Crash safety: SIGKILL at exact points, SIGINT, a full disk, then resume to identical bytes.
Also the run's refusals (foreign output folder, changed plan, NaN inputs, missing tensor)
and the memory bound measured on a real process."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import make_header_only
from runs import DESCRIBING

FAMILY = "llama"


def digests(folder: Path) -> dict[str, str]:
    """sha256 of the files that make up the model (weights, index, config, side files); not
    the report, card and plan as run, which name the folder (runs.DESCRIBING; test_card.py
    checks that a resume writes the card and the plan again byte for byte)."""
    names = [p for p in folder.iterdir() if p.is_file() and p.name not in DESCRIBING]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(names)}


def make_plan(tmp: Path, fixtures: Path, out: str = "out", density: float = 0.5) -> Path:
    models = ", ".join(str(fixtures / FAMILY / m) for m in ("ft1", "ft2", "ft3"))
    plan = tmp / f"{out}.yaml"
    plan.write_text(f"models: [{models}]\nbase_model: {fixtures / FAMILY / 'anchor'}\n"
                    f"method: dare_ties\nparameters: {{density: {density}}}\nseed: 3\n"
                    f"output: {{path: {tmp / out}, shard_size: 90KB}}\n")
    return plan


def run(plan: Path, *args: str, failpoint: str | None = None, fsize: int | None = None,
        env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k != "PACER_STREAM_FAILPOINT"}
    if failpoint:
        env["PACER_STREAM_FAILPOINT"] = failpoint

    def limit():
        # a child inherits an ignored SIGINT (a parent started in the background, or any
        # test of this session that ignored it), and Python then installs no KeyboardInterrupt
        # handler: give the run the default disposition a terminal user has
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "pacer_stream", "run", str(plan), *args],
                          capture_output=True, text=True, env=env, preexec_fn=limit)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, fixtures_dir) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("ref")
    proc = run(make_plan(tmp, fixtures_dir), "--quiet")
    assert proc.returncode == 0, proc.stderr
    files = digests(tmp / "out")
    assert sum(1 for f in files if f.endswith(".safetensors")) >= 3  # several shards
    return files


def assert_nothing_looks_complete(out: Path) -> None:
    assert not (out / "config.json").exists()
    assert not (out / "model.safetensors.index.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", ["unit-done:1", "unit-done:2", "unit-done:3",
                                       "tensor-written:4", "tensor-written:17"])
def test_sigkill_then_resume_is_byte_identical(failpoint, reference_run, fixtures_dir, tmp_path):
    plan = make_plan(tmp_path, fixtures_dir)
    killed = run(plan, "--quiet", failpoint=failpoint)
    assert killed.returncode == -signal.SIGKILL
    assert_nothing_looks_complete(tmp_path / "out")
    resumed = run(plan, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert digests(tmp_path / "out") == reference_run
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())
    skipped = report["this_run"]["units_skipped"]
    if failpoint.startswith("unit-done"):
        k = int(failpoint.split(":")[1])
        assert skipped == ["embed", "block.0", "block.1", "head"][:k]
        assert all(report["units"][u]["attempt"] == 1 for u in skipped)
    assert not set(skipped) & set(report["this_run"]["units_done"])
    assert all(u["attempt"] == 2 for n, u in report["units"].items() if n not in skipped)


@pytest.mark.slow
def test_repeated_kills_then_resume(reference_run, fixtures_dir, tmp_path):
    plan = make_plan(tmp_path, fixtures_dir)
    for _ in range(3):
        assert run(plan, "--quiet", failpoint="unit-done:1").returncode == -signal.SIGKILL
    assert run(plan, "--quiet").returncode == 0
    assert digests(tmp_path / "out") == reference_run
    again = run(plan)  # a finished run is left alone
    assert again.returncode == 0 and "already complete" in again.stdout
    assert digests(tmp_path / "out") == reference_run


@pytest.mark.slow
def test_sigint_exits_cleanly_and_resumes(reference_run, fixtures_dir, tmp_path):
    plan = make_plan(tmp_path, fixtures_dir)
    interrupted = run(plan, "--quiet", failpoint="unit-done:2:SIGINT")
    assert interrupted.returncode == 130
    assert interrupted.stderr.strip().count("\n") == 0 and "re-run" in interrupted.stderr
    assert_nothing_looks_complete(tmp_path / "out")
    assert run(plan, "--quiet").returncode == 0
    assert digests(tmp_path / "out") == reference_run


@pytest.mark.slow
def test_write_error_mid_shard_then_resume(reference_run, fixtures_dir, tmp_path):
    """A file-size limit makes a shard write fail (EFBIG) like a full disk would."""
    plan = make_plan(tmp_path, fixtures_dir)
    failed = run(plan, "--quiet", fsize=60_000)
    assert failed.returncode == 2, failed.stderr
    line = failed.stderr.strip()
    assert line.count("\n") == 0 and "write failed" in line and "resume" in line
    assert_nothing_looks_complete(tmp_path / "out")
    assert run(plan, "--quiet").returncode == 0
    assert digests(tmp_path / "out") == reference_run


@pytest.mark.slow
def test_changed_plan_refuses_to_resume(fixtures_dir, tmp_path):
    plan = make_plan(tmp_path, fixtures_dir)
    assert run(plan, "--quiet", failpoint="unit-done:2").returncode == -signal.SIGKILL
    changed = make_plan(tmp_path, fixtures_dir, density=0.7)
    refused = run(changed, "--quiet")
    assert refused.returncode == 2 and "--restart" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0
    restarted = run(changed, "--quiet", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    fresh = make_plan(tmp_path, fixtures_dir, out="fresh", density=0.7)
    assert run(fresh, "--quiet").returncode == 0
    assert digests(tmp_path / "out") == {k: v for k, v in digests(tmp_path / "fresh").items()}


@pytest.mark.slow
def test_changed_plan_over_a_finished_merge_says_so_and_keeps_it(fixtures_dir, tmp_path):
    plan = make_plan(tmp_path, fixtures_dir)
    assert run(plan, "--quiet").returncode == 0
    before = digests(tmp_path / "out")
    refused = run(make_plan(tmp_path, fixtures_dir, density=0.7), "--quiet")
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert line.count("\n") == 0 and "a finished merge" in line and "--restart" in line
    assert digests(tmp_path / "out") == before


@pytest.mark.slow
def test_foreign_output_folder_is_refused(fixtures_dir, tmp_path):
    plan = make_plan(tmp_path, fixtures_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    refused = run(plan, "--quiet")
    assert refused.returncode == 2 and "not empty" in refused.stderr and "--force" in refused.stderr
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["thesis.tex"]
    assert run(plan, "--quiet", "--force").returncode == 0
    assert not (tmp_path / "out" / "thesis.tex").exists()


def _copy_models(fixtures: Path, tmp: Path) -> Path:
    for m in ("anchor", "ft1", "ft2", "ft3"):
        shutil.copytree(fixtures / FAMILY / m, tmp / "models" / FAMILY / m)
    return tmp / "models"


@pytest.mark.slow
def test_nonfinite_inputs(fixtures_dir, tmp_path):
    models = _copy_models(fixtures_dir, tmp_path)
    index = json.loads((models / FAMILY / "ft2" / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    file = models / FAMILY / "ft2" / index["weight_map"][name]
    tensors = load_file(str(file))
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    plan = make_plan(tmp_path, models)
    refused = run(plan, "--quiet")
    assert refused.returncode == 2
    assert name in refused.stderr and "NaN" in refused.stderr and "--allow-nonfinite" in refused.stderr
    assert_nothing_looks_complete(tmp_path / "out")
    assert run(plan, "--quiet", "--allow-nonfinite").returncode == 0


def test_model_missing_a_tensor(fixtures_dir, tmp_path):
    models = _copy_models(fixtures_dir, tmp_path)
    folder = models / FAMILY / "ft3"
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    file = folder / index["weight_map"].pop(name)
    tensors = load_file(str(file))
    del tensors[name]
    save_file(tensors, str(file), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    refused = run(make_plan(tmp_path, models), "--quiet")
    assert refused.returncode == 2 and name in refused.stderr and "not in" in refused.stderr
    assert not (tmp_path / "out").exists()


# -- memory: measured peak RSS of a real process against the budget ----------------

SMALL_LLAMA = {**make_header_only.LLAMA3_70B, "hidden_size": 512, "intermediate_size": 2048,
               "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
               "head_dim": 64, "vocab_size": 8000, "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def small_family(tmp_path_factory) -> Path:
    """Three ~25M-parameter fp32 Llama-shaped models (100 MB each) and a base."""
    root = tmp_path_factory.mktemp("small")
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen) * 0.02 for n, s in make_header_only.llama_tensors(SMALL_LLAMA)}
    for k, name in enumerate(["base", "a", "b", "c"]):
        folder = root / name
        folder.mkdir()
        state = {n: (t + 0.001 * torch.randn(t.shape, generator=gen)) if k else t for n, t in base.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(SMALL_LLAMA))
    return root


@pytest.mark.slow
def test_peak_rss_stays_under_a_budget_just_above_the_estimate(small_family, tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text(f"models: [{small_family / 'a'}, {small_family / 'b'}, {small_family / 'c'}]\n"
                    f"base_model: {small_family / 'base'}\nmethod: ties\n"
                    f"parameters: {{density: 0.5}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    from click.testing import CliRunner

    from pacer_stream.cli import main

    from pacer_stream import accounting as acct

    tight = int((acct.PROCESS_BASE_BYTES + 60e6) / acct.HEADROOM)  # forces row slices
    for tight_budget in (None, tight):
        args = ["plan", str(plan), "--json"] + (["--max-memory", str(tight_budget)]
                                                if tight_budget else [])
        estimate = json.loads(CliRunner().invoke(main, args).stdout)
        assert estimate["fits"]
        budget = tight_budget or int(estimate["peak_ram_bytes"] * 1.02)
        if tight_budget:
            assert any(u["sliced"] for u in estimate["units"])
        out = tmp_path / f"out-{budget}"
        plan.write_text(plan.read_text().replace(str(tmp_path / "out"), str(out)))
        proc = run(plan, "--quiet", "--max-memory", str(budget))
        assert proc.returncode == 0, proc.stderr
        report = json.loads((out / "pacer_report.json").read_text())
        peak = report["this_run"]["peak_rss_bytes"]
        assert peak < budget, (peak, budget)
        plan.write_text(plan.read_text().replace(str(out), str(tmp_path / "out")))
