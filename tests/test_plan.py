"""`pacer-stream plan`: the tiny smoke plan and a header-only Llama-3-70B plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

import make_header_only
from pacer_stream.cli import main
from pacer_stream.config import load_plan
from pacer_stream.io import sources

ROOT = Path(__file__).resolve().parents[1]
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}


def _file_tensor_bytes(folder: Path) -> int:
    """Sum of tensor byte sizes, computed with the safetensors library, not ours."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                view = f.get_slice(name)
                n = 1
                for d in view.get_shape():
                    n *= d
                total += n * ITEMSIZE[view.get_dtype()]
    return total


def _plan_json(*args: str, status: int = 0) -> dict:
    result = CliRunner().invoke(main, ["plan", *args, "--json"])
    assert result.exit_code == status, result.output  # 3: does not fit
    return json.loads(result.stdout)


def test_tiny_smoke_plan_json(fixtures_dir):
    plan = _plan_json(str(ROOT / "plans/tiny-smoke.yaml"), "--max-memory", "4GB")
    for key in ("peak_ram_bytes", "read_bytes", "write_bytes", "units", "groups", "est_seconds",
                "fits"):
        assert key in plan
    config = load_plan(ROOT / "plans/tiny-smoke.yaml")
    folders = [m.ref.path for m in config.models]
    expected = sum(_file_tensor_bytes(f) for f in folders)
    assert plan["input_bytes"] == expected
    stages = {s["name"]: s for s in plan["stages"]}
    # a full data-free PACER merge, in the run's order: each model writes its samples, then
    # RegMean reads every model's blocks once; calibration reads back at most the output
    assert list(stages) == ["align", "generate", "consensus", "regmean", "merge", "calibrate"]
    assert stages["generate"]["read_bytes"] == stages["regmean"]["read_bytes"] == expected
    assert stages["calibrate"]["read_bytes"] == plan["write_bytes"]
    assert plan["router"].startswith("data_free")
    assert stages["merge"]["read_bytes"] == expected
    # the statistics pass reads the blocks' MLP and attention weights, not embeddings or norms
    assert 0.5 * expected < stages["consensus"]["read_bytes"] < expected
    # output: one model's worth at the inputs' dtype; more if MLPs are upcycled
    assert plan["write_bytes"] == _file_tensor_bytes(config.models[0].ref.path)
    assert plan["write_bytes_max"] > plan["write_bytes"]
    assert [u["name"] for u in plan["units"]] == ["embed", *[f"block.{i}" for i in range(4)],
                                                   "head"]
    assert plan["fits"] is True and 0 < plan["peak_ram_bytes"] <= 4e9
    assert set(plan["est_seconds"]) == {"cpu", "gpu"}
    assert {"kind": "mlp", "size": 128, "count": 4} in [
        {k: g[k] for k in ("kind", "size", "count")} for g in plan["groups"]]


def test_data_free_stages_only_for_models_that_write_samples(fixtures_dir, tmp_path):
    """An encoder writes no samples: the run neither generates nor solves RegMean for it, and
    the plan says the same (self_samples.writes_samples decides both)."""
    models = [fixtures_dir / "bert" / n for n in ("ft1", "ft2")]
    plan_file = tmp_path / "p.yaml"
    plan_file.write_text("models: [" + ", ".join(map(str, models)) + "]\nmethod: pacer\n"
                         "pacer: {router: data_free}\n")
    stages = [s["name"] for s in _plan_json(str(plan_file))["stages"]]
    assert "generate" not in stages and "regmean" not in stages and "merge" in stages


def test_pacer_plan_counts_alignment_sweeps(fixtures_dir, tmp_path):
    models = [fixtures_dir / "llama" / n for n in ("ft1", "ft2", "perm")]
    plan_file = tmp_path / "p.yaml"
    plan_file.write_text("models: [" + ", ".join(map(str, models)) + "]\nmethod: pacer\n"
                         "pacer: {max_sweeps: 2}\n")
    plan = _plan_json(str(plan_file))
    expected = sum(_file_tensor_bytes(m) for m in models)
    stages = {s["name"]: s for s in plan["stages"]}
    # every llama tensor carries a permuted axis, so each sweep reads all of them
    assert stages["align"]["read_bytes"] == 2 * expected and stages["align"]["passes"] == 2
    assert stages["merge"]["read_bytes"] == expected
    # no router samples and no `router: data_free`: nothing will be upcycled, no calibration
    assert "calibrate" not in stages and plan["router"] is None
    assert plan["read_bytes"] == 3 * expected + stages["consensus"]["read_bytes"]


def test_plan_human_report(fixtures_dir):
    result = CliRunner().invoke(main, ["plan", str(ROOT / "plans/tiny-smoke.yaml")])
    assert result.exit_code == 0
    for text in ("symmetry groups", "residual", "merge", "peak RAM", "fits: yes"):
        assert text in result.output


def test_output_dtype_changes_write_bytes(fixtures_dir, tmp_path):
    models = [fixtures_dir / "qwen2" / n for n in ("ft1", "ft2")]
    plan = tmp_path / "p.yaml"
    plan.write_text(f"models: [{models[0]}, {models[1]}]\nmethod: ties\n"
                    "output: {path: out, dtype: bfloat16}\n")
    data = _plan_json(str(plan))
    assert data["write_bytes"] * 2 == _file_tensor_bytes(models[0])  # fp32 -> bf16
    assert [s["name"] for s in data["stages"]] == ["merge"]


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("l70")
    for k in range(3):
        make_header_only.write_model(out / f"m{k}", make_header_only.LLAMA3_70B)
    (out / "plan.yaml").write_text("project_name: l70\nmodels: [m0, m1, m2]\noutput: {path: out}\n")
    return out


def test_llama3_70b_plan_from_headers(llama70b, monkeypatch):
    read = []
    original = sources.LocalFile.read
    monkeypatch.setattr(sources.LocalFile, "read",
                        lambda self, off, n: read.append(n) or original(self, off, n))
    plan = _plan_json(str(llama70b / "plan.yaml"), "--max-memory", "16GB")
    groups = {(g["kind"], g["size"]): g for g in plan["groups"]}
    assert groups[("residual", 8192)]["count"] == 1
    assert groups[("mlp", 28672)]["count"] == 80
    assert groups[("kv", 8)]["count"] == 80
    assert groups[("q", 8)]["batch"] == [8] and groups[("q", 8)]["problems"] == 640
    assert plan["peak_ram_bytes"] < 16e9 and plan["fits"] is True
    assert plan["input_bytes"] == 3 * 70553706496 * 2  # 70.55B bf16 parameters per model
    assert len(plan["units"]) == 82
    # header-only: a few MB of headers read out of 423 GB of checkpoints
    assert sum(read) < 10 * 2**20


def test_llama3_70b_too_small_budget_names_the_unit(llama70b):
    plan = _plan_json(str(llama70b / "plan.yaml"), "--max-memory", "8GB", status=3)
    assert plan["fits"] is False
    assert plan["reason"].startswith("block.0: aligning its mlp group (28672x28672) needs ")
    assert 8e9 < plan["min_budget_bytes"] < 16e9
    assert plan["reason"].endswith(f"--max-memory {-(-plan['min_budget_bytes'] // 10**6)}MB")


def test_llama3_70b_plan_as_a_process(llama70b):
    proc = subprocess.run([sys.executable, "-m", "pacer_stream", "plan",
                           str(llama70b / "plan.yaml"), "--max-memory", "16GB"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fits: yes" in proc.stdout and "28672" in proc.stdout


def test_split_merge_example_plan_lists_its_four_passes(fixtures_dir):
    plan = _plan_json(str(ROOT / "plans/tiny-split.yaml"))
    stages = {s["name"]: s for s in plan["stages"]}
    assert list(stages) == ["variance-high", "variance-low", "gram", "eta"]
    # every pass reads every model once; mu is written in the second, eta in the last
    assert len({s["read_bytes"] for s in stages.values()}) == 1
    assert stages["variance-low"]["write_bytes"] > stages["eta"]["write_bytes"] > 0
    assert stages["variance-high"]["write_bytes"] == stages["gram"]["write_bytes"] == 0


def test_help_and_a_dense_plan_do_not_import_torch(fixtures_dir, tmp_path):
    """Start-up: reading headers and planning a dense merge need neither torch nor zarr."""
    import subprocess
    import sys

    family = fixtures_dir / "llama"
    plan = tmp_path / "p.yaml"
    plan.write_text(f"models: [{family / 'ft1'}, {family / 'ft2'}]\nmethod: ties\n"
                    f"base_model: {family / 'anchor'}\noutput: {{path: {tmp_path / 'o'}}}\n")
    code = ("import sys\nfrom click.testing import CliRunner\nfrom pacer_stream.cli import main\n"
            "for args in (['--help'], ['plan', sys.argv[1]]):\n"
            "    result = CliRunner().invoke(main, args)\n"
            "    assert result.exit_code == 0, result.output\n"
            "print(sorted(m for m in ('torch', 'zarr', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code, str(plan)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("method", ["ties", "pacer", "split_merge"])
def test_cluster_estimate_of_a_70b_plan(llama70b, method):
    """plan --backend ray --workers W: the unit stages spread over W machines, the passes
    that carry state from unit to unit on the driver, the assumptions beside it."""
    text = {"ties": "method: ties\nbase_model: m2\nparameters: {density: 0.5}\n",
            "pacer": "method: pacer\npacer: {enable_moe_upcycle: false}\n",
            "split_merge": "method: split_merge\nparameters: {density: 0.3}\n"}[method]
    plan = llama70b / f"cluster-{method}.yaml"
    models = "[m0, m1]" if method == "ties" else "[m0, m1, m2]"
    plan.write_text(f"models: {models}\n{text}output: {{path: out}}\n")
    runs = {w: _plan_json(str(plan), "--max-memory", "16GB", "--backend", "ray",
                          "--workers", str(w))["cluster"] for w in (1, 2, 8)}
    one, two, eight = runs[1], runs[2], runs[8]
    assert one["one_process_seconds"] == two["one_process_seconds"] > 0
    assert one["seconds"] >= one["one_process_seconds"]  # one machine: Ray only adds
    assert one["seconds"] > two["seconds"] > eight["seconds"]
    # Split-Merge's gram and eta passes (half its time) stay on the driver
    assert (1.5 if method != "split_merge" else 1.0) < two["speedup"] <= 2.0
    assert eight["speedup"] <= 8.0
    tasks = {"ties": ["merge"], "pacer": ["align", "merge"],
             "split_merge": ["variance-high", "variance-low"]}[method]
    for name in tasks:
        assert eight["stages"][name] < one["stages"][name] / 4
    for name in set(one["stages"]) - set(tasks):  # the driver's passes do not spread
        assert eight["stages"][name] == one["stages"][name]
    assert (eight["assumptions"]["driver_only_seconds"] > 0) == (method == "split_merge")
    shown = CliRunner().invoke(main, ["plan", str(plan), "--max-memory", "16GB",
                                      "--backend", "ray", "--workers", "8"])
    assert shown.exit_code == 0 and "Ray, 8 machines:" in shown.output
    assert "the shared storage 10 GB/s" in shown.output


def test_workers_without_the_ray_backend_are_refused(llama70b):
    result = CliRunner().invoke(main, ["plan", str(llama70b / "plan.yaml"), "--workers", "4"])
    assert result.exit_code == 2 and "--backend ray" in result.stderr
