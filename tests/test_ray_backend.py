"""The Ray backend on a local Ray cluster (two CPUs, started and stopped here): the same
bytes as the local backend for ties, PACER (alignment + upcycling) and Split-Merge, and
the same result after a worker or the driver is killed mid-run."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from pacer_stream.cli import main
from pacer_stream.config import load_plan
from pacer_stream.errors import PacerError
from pacer_stream.job import RunOptions
from pacer_stream.run import run_merge
from runs import digests, fails_with, run_cli

BUDGET = 2**30


def plan_text(fixtures: Path, method: str, out: Path) -> str:
    conflict = ", ".join(str(fixtures / "conflict" / f"m{k}") for k in (1, 2, 3))
    llama = ", ".join(str(fixtures / "llama" / m) for m in ("ft1", "ft2", "ft3"))
    body = {
        "ties": f"models: [{llama}]\nbase_model: {fixtures / 'llama' / 'anchor'}\n"
                "method: ties\nparameters: {density: 0.5}\n",
        "pacer": f"models: [{conflict}]\nmethod: pacer\nalign: true\n"
                 "pacer: {interference_threshold: 0.35, top_k_experts: 2, router: data_free}\n",
        "split_merge": f"models: [{conflict}]\nmethod: split_merge\nparameters: {{density: 0.3}}\n",
    }[method]
    return f"{body}seed: 0\noutput: {{path: {out}, shard_size: 200KB}}\n"


def write_plan(tmp: Path, fixtures: Path, method: str, name: str) -> Path:
    plan = tmp / f"{name}.yaml"
    plan.write_text(plan_text(fixtures, method, tmp / name))
    return plan


def merge(plan: Path, backend: str, layout: str | None = "unit"):
    return run_merge(load_plan(plan), RunOptions(budget=BUDGET, backend=backend,
                                                 shard_layout=layout, quiet=True))


def tensors(folder: Path) -> dict:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    arm = tmp_path_factory.mktemp("failpoint") / "failpoint"
    os.environ["PACER_STREAM_FAILPOINT_FILE"] = str(arm)  # the workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield SimpleNamespace(address=ray.get_runtime_context().gcs_address, arm=arm)
    finally:
        ray.shutdown()
        del os.environ["PACER_STREAM_FAILPOINT_FILE"]


@pytest.fixture(scope="module")
def local(tmp_path_factory, fixtures_dir) -> dict[str, Path]:
    """Each method merged by the local backend, in the unit layout."""
    tmp = tmp_path_factory.mktemp("local")
    outputs = {}
    for method in ("ties", "pacer", "split_merge"):
        merge(write_plan(tmp, fixtures_dir, method, method), "local")
        outputs[method] = tmp / method
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "pacer", "split_merge"])
def test_ray_writes_the_local_backends_bytes(method, cluster, local, tmp_path, fixtures_dir):
    summary = merge(write_plan(tmp_path, fixtures_dir, method, "ray"), "ray", layout=None)
    out = tmp_path / "ray"
    assert digests(out) == digests(local[method])
    report = json.loads((out / "pacer_report.json").read_text())
    assert report["backend"] == "ray"
    assert summary.read_bytes > 0  # the workers' reads are counted by the driver
    if method == "pacer":  # the stages that ran as tasks had something to do
        assert report["align"]["peers"] and report["pacer"]["exported_as"] != "dense"
        assert any(key.startswith("consensus/") for key in report["units"])


@pytest.mark.slow
def test_unit_layout_holds_the_default_layouts_tensors(local, tmp_path, fixtures_dir):
    merge(write_plan(tmp_path, fixtures_dir, "ties", "sized"), "local", layout=None)
    by_size, by_unit = tensors(tmp_path / "sized"), tensors(local["ties"])
    assert len(list((tmp_path / "sized").glob("*.safetensors"))) < \
        len(list(local["ties"].glob("*.safetensors")))  # the layouts differ ...
    assert by_size.keys() == by_unit.keys()  # ... the tensors do not
    assert all(by_size[k].equal(by_unit[k]) for k in by_size)


@pytest.mark.slow
def test_a_worker_killed_mid_unit_is_retried(cluster, local, tmp_path, fixtures_dir):
    cluster.arm.write_text("tensor-written:2")  # the first worker to write two tensors dies
    merge(write_plan(tmp_path, fixtures_dir, "ties", "killed"), "ray")
    assert not cluster.arm.exists() and cluster.arm.with_name("failpoint.fired").exists()
    assert digests(tmp_path / "killed") == digests(local["ties"])


@pytest.mark.slow
def test_a_unit_whose_worker_always_dies_is_a_one_line_error(cluster, tmp_path, fixtures_dir):
    cluster.arm.write_text("tensor-written:1 always")  # every worker dies at its first tensor
    plan = write_plan(tmp_path, fixtures_dir, "ties", "dying")
    try:
        result = CliRunner().invoke(main, ["run", str(plan), "--backend", "ray",
                                           "--max-memory", str(BUDGET)])
    finally:
        cluster.arm.unlink()
    fails_with(result, "unit embed: its Ray worker died 4 times", "re-run the same command")
    assert not (tmp_path / "dying" / "config.json").exists()


@pytest.mark.slow
def test_a_killed_driver_resumes(cluster, local, tmp_path, fixtures_dir):
    plan = write_plan(tmp_path, fixtures_dir, "ties", "driver")
    args = ("--backend", "ray", "--address", cluster.address, "--max-memory", str(BUDGET))
    killed = run_cli(plan, *args, failpoint="unit-done:3")
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "driver" / "config.json").exists()
    resumed = run_cli(plan, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert digests(tmp_path / "driver") == digests(local["ties"])
    report = json.loads((tmp_path / "driver" / "pacer_report.json").read_text())
    assert len(report["this_run"]["units_skipped"]) == 3


def test_bad_backend_options_are_refused(tmp_path, fixtures_dir):
    plan = write_plan(tmp_path, fixtures_dir, "ties", "refused")
    runner = CliRunner()
    fails_with(runner.invoke(main, ["run", str(plan), "--backend", "ray",
                                    "--shard-layout", "size"]), "--shard-layout unit")
    fails_with(runner.invoke(main, ["run", str(plan), "--address", "127.0.0.1:6379"]),
               "--backend ray")
    assert not (tmp_path / "refused").exists()


def test_a_dead_address_is_refused_at_once(tmp_path, fixtures_dir):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = write_plan(tmp_path, fixtures_dir, "ties", "dead")
    fails_with(CliRunner().invoke(main, ["run", str(plan), "--backend", "ray", "--address",
                                         f"127.0.0.1:{port}"]), "no Ray cluster answers")
    assert not (tmp_path / "dead").exists()


@pytest.mark.slow
def test_a_task_too_big_for_every_machine_is_refused(cluster, tmp_path, fixtures_dir,
                                                    monkeypatch):
    import ray

    from pacer_stream import accounting

    largest = max(node["Resources"]["memory"] for node in ray.nodes() if node["Alive"])
    # every task's process base alone is more than any machine offers (Ray would queue the
    # tasks forever)
    monkeypatch.setattr(accounting, "PROCESS_BASE_BYTES", int(largest) + 1)
    plan = write_plan(tmp_path, fixtures_dir, "ties", "huge")
    with pytest.raises(PacerError, match="more than the largest machine"):
        run_merge(load_plan(plan), RunOptions(budget=int(largest * 4), backend="ray", quiet=True))
    assert not list((tmp_path / "huge").glob("*.safetensors"))


def test_without_ray_the_error_says_how_to_install(tmp_path, fixtures_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    plan = write_plan(tmp_path, fixtures_dir, "ties", "no-ray")
    fails_with(CliRunner().invoke(main, ["run", str(plan), "--backend", "ray"]),
               'pip install "pacer-stream[ray]"')
    assert not (tmp_path / "no-ray").exists()


def test_units_run_at_once_never_share_a_file(tmp_path, fixtures_dir):
    from pacer_stream.backends.ray_cluster import check_disjoint
    from pacer_stream.job import MergeContext
    from pacer_stream.stages.merge import MergeStage

    config = load_plan(write_plan(tmp_path, fixtures_dir, "ties", "layouts"))
    stage = MergeStage()
    for layout, shared in (("size", True), ("unit", False)):
        ctx = MergeContext.from_plan(config, RunOptions(shard_layout=layout))
        units = stage.units(ctx)
        files = [stage.writes(ctx, u) for u in units]
        assert all(files) and set().union(*files) == {s.file for s in ctx.shards}
        if shared:  # 200 KB shards: one holds the end of a unit and the start of the next
            with pytest.raises(AssertionError, match="would both write it"):
                check_disjoint(stage, ctx, units)
        else:
            check_disjoint(stage, ctx, units)
    assert not (tmp_path / "layouts").exists()


@pytest.mark.slow
def test_the_plan_can_choose_the_ray_backend(cluster, local, tmp_path, fixtures_dir):
    plan = write_plan(tmp_path, fixtures_dir, "ties", "planned")
    plan.write_text(plan.read_text() + "backend: ray\n")
    result = CliRunner().invoke(main, ["run", str(plan), "--quiet", "--max-memory", str(BUDGET)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "planned"
    assert json.loads((out / "pacer_report.json").read_text())["backend"] == "ray"
    assert digests(out) == digests(local["ties"])
    # the card's command reproduces the files: it names the layout they were written in
    assert "--shard-layout unit" in (out / "README.md").read_text()
    # the command line wins over the plan
    again = CliRunner().invoke(main, ["run", str(plan), "--quiet", "--backend", "local",
                                      str(tmp_path / "planned-local")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "planned-local" / "pacer_report.json").read_text())[
        "backend"] == "local"


@pytest.mark.parametrize("given, needle", [
    ("gpu", "'gpu' is not a backend"),
    ("{name: local, address: '127.0.0.1:6379'}", "for name: ray"),
    ("{name: ray, adress: '127.0.0.1:6379'}", "adress"),
])
def test_a_bad_backend_in_the_plan_is_refused(given, needle, tmp_path, fixtures_dir):
    plan = write_plan(tmp_path, fixtures_dir, "ties", "bad")
    plan.write_text(plan.read_text() + f"backend: {given}\n")
    fails_with(CliRunner().invoke(main, ["run", str(plan)]), "backend", needle)
    assert not (tmp_path / "bad").exists()
