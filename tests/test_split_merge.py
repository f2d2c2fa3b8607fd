"""Split-Merge, streamed, against an independent in-memory Split-Merge of the same models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import make_fixtures
from runs import digests, min_budget, random_llamas, run_cli
from pacer_stream.cli import main
from pacer_stream.inputs import ModelSet
from pacer_stream.io.sources import LocalFolder

DENSITY = 0.05


def write_plan(tmp: Path, models: list[Path], out: str = "out", density: float = DENSITY) -> Path:
    plan = tmp / f"{out}.yaml"
    plan.write_text(f"models: [{', '.join(map(str, models))}]\nmethod: split_merge\n"
                    f"parameters: {{density: {density}}}\n"
                    f"output: {{path: {tmp / out}, shard_size: 200KB}}\n")
    return plan


def in_memory_split_merge(models: list[Path], density: float) -> dict:
    """Algorithm 1 of the Split-Merge paper on whole vectors, with our tie and sign rules."""
    graph = ModelSet.open([LocalFolder(m) for m in models]).graph
    names = [t for u in graph.units for t in u.tensors if graph.nodes[t].info.is_float]
    states = [make_fixtures.file_state(m) for m in models]
    x = torch.stack([torch.cat([s[t].float().reshape(-1) for t in names]) for s in states])
    mu = x.mean(0)
    delta = x - mu
    var = delta.square().mean(0)
    k = max(1, int(density * x.shape[1]))
    order = torch.argsort(-var.double(), stable=True)  # ties: first position first
    psi = torch.sort(order[:k]).values
    hat = delta[:, psi].double()
    values, vectors = torch.linalg.eigh(hat @ hat.T)
    lam, u = values[-1], vectors[:, -1]
    v = hat.T @ u / lam.sqrt()
    c = hat @ v
    if c[torch.argmax(c.abs())] < 0:
        v, c = -v, -c
    eta = torch.zeros(x.shape[1], dtype=torch.float64)
    eta[psi] = v
    sizes = [graph.nodes[t].info.numel for t in names]
    split = dict(zip(names, zip(mu.split(sizes), eta.split(sizes))))
    shapes = {t: graph.nodes[t].info.shape for t in names}
    return {"k": k, "c": c, "lam": float(lam),
            "mu": {t: m.reshape(shapes[t]) for t, (m, _) in split.items()},
            "eta": {t: e.reshape(shapes[t]) for t, (_, e) in split.items()}}


def read_eta(folder: Path) -> dict[str, torch.Tensor]:
    """η densified, from eta.safetensors (sparse entries are NAME::indices + NAME::values)."""
    mu = make_fixtures.file_state(folder)
    out = {}
    with safe_open(str(folder / "eta.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pacer-split-merge-eta"
        for name in f.keys():
            if name.endswith("::values"):
                base = name[:-8]
                dense = torch.zeros(mu[base].numel())
                indices = f.get_tensor(base + "::indices")
                assert torch.all(indices[1:] > indices[:-1])  # ascending, unique
                dense[indices] = f.get_tensor(name)
                out[base] = dense.reshape(mu[base].shape)
            elif "::" not in name:
                out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def models(fixtures_dir) -> list[Path]:
    return [fixtures_dir / "llama" / m for m in ("ft1", "ft2", "perm")]


@pytest.fixture(scope="module")
def expected(models) -> dict:
    return in_memory_split_merge(models, DENSITY)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, models) -> Path:
    tmp = tmp_path_factory.mktemp("split")
    proc = run_cli(write_plan(tmp, models))
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


def test_streamed_split_merge_equals_in_memory(merged, expected):
    info = json.loads((merged / "split_merge.json").read_text())
    assert info["k"] == expected["k"]
    assert torch.allclose(torch.tensor(info["coefficients"], dtype=torch.float64),
                          expected["c"], rtol=1e-5)
    assert info["eigenvalue"] == pytest.approx(expected["lam"], rel=1e-6)
    mu = make_fixtures.file_state(merged)
    for name, tensor in expected["mu"].items():
        assert torch.allclose(mu[name], tensor, atol=1e-7), name
    eta = read_eta(merged)
    selected = sum(int((e != 0).sum()) for e in eta.values())
    assert selected == expected["k"]
    for name, tensor in expected["eta"].items():
        ours = eta.get(name, torch.zeros(tensor.shape))
        assert torch.equal(ours != 0, tensor != 0), name  # exactly the same positions
        assert torch.allclose(ours.double(), tensor, atol=1e-6), name


def test_mu_is_a_loadable_checkpoint_and_memory_growth_is_reported(merged):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    info = json.loads((merged / "split_merge.json").read_text())
    memory = info["memory"]
    assert memory["split_merge_params"] == info["numel"] + info["k"] + 3
    assert memory["extra_over_one_model"] == pytest.approx((info["k"] + 3) / info["numel"])
    assert memory["extra_bytes_on_disk"] == (merged / "eta.safetensors").stat().st_size
    assert memory["efficiency_ratio"]["16"] < memory["efficiency_ratio"]["2"]
    # Twin-Merging's rank-r experts, counted here from the checkpoint's own shapes
    shapes = [list(t.shape) for t in make_fixtures.file_state(merged).values()]
    for r in (2, 16):
        twin = sum(math.prod(s) + (3 * min(r, *s) * (s[0] + s[1] + 1) if len(s) == 2 else 0)
                   for s in shapes)
        assert memory["twin_merge_params"][str(r)] == twin
        assert memory["efficiency_ratio"][str(r)] == pytest.approx(
            memory["split_merge_params"] / twin)
    # the same figures in the run report
    report = json.loads((merged / "pacer_report.json").read_text())["split_merge"]
    assert report == {"k": info["k"], "coefficients": info["coefficients"], "memory": memory}


@pytest.mark.slow
def test_the_smallest_budget_that_fits_gives_the_same_result(merged, models, tmp_path):
    """Every tensor here is smaller than one Gram row group, which Split-Merge never
    splits, so this budget holds each whole (the sliced case, on wider models, is
    test_split_safety.py::test_gram_row_groups_make_the_result_budget_independent)."""
    plan = write_plan(tmp_path, models)
    tiny = min_budget(plan)
    proc = run_cli(plan, "--max-memory", str(tiny))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())
    assert report["this_run"]["peak_rss_bytes"] <= tiny
    # nothing depends on slicing: μ, split_merge.json (c_t, λ) and η are the same bytes
    assert digests(tmp_path / "out") == digests(merged)
    for label, out in (("whole", merged), ("sliced", tmp_path / "out")):
        result = CliRunner().invoke(main, ["materialize", str(out), "--expert", "2",
                                           "--to", str(tmp_path / f"{label}-e2")])
        assert result.exit_code == 0, result.output
    assert digests(tmp_path / "whole-e2") == digests(tmp_path / "sliced-e2")


@pytest.mark.slow
def test_runs_within_a_budget_smaller_than_one_model(tmp_path):
    """Three ~450 MB bf16 models merged under a 420 MB budget (peak RSS measured)."""
    models = random_llamas(tmp_path, 3, hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                           head_dim=128, vocab_size=96000)
    one_model = (models[0] / "model.safetensors").stat().st_size
    budget = 420 * 10**6
    assert budget < one_model
    proc = run_cli(write_plan(tmp_path, models, density=0.01), "--max-memory", str(budget))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())
    assert report["this_run"]["peak_rss_bytes"] <= budget


def test_materialize_writes_mu_plus_c_eta(merged, tmp_path):
    info = json.loads((merged / "split_merge.json").read_text())
    mu, eta = make_fixtures.file_state(merged), read_eta(merged)
    for expert, c in (("1", info["coefficients"][1]), ("ft1", info["coefficients"][0])):
        to = tmp_path / f"expert-{expert}"
        result = CliRunner().invoke(main, ["materialize", str(merged), "--expert", expert,
                                           "--to", str(to)])
        assert result.exit_code == 0, result.output
        dense = make_fixtures.file_state(to)
        for name, tensor in mu.items():
            want = tensor + c * eta[name] if name in eta else tensor
            assert torch.allclose(dense[name], want, atol=1e-6), name
    result = CliRunner().invoke(main, ["materialize", str(merged), "--coefficient", "0",
                                       "--to", str(tmp_path / "zero")])
    assert result.exit_code == 0
    zero = make_fixtures.file_state(tmp_path / "zero")
    assert all(torch.equal(zero[n], t) for n, t in mu.items())


def test_materialize_refuses_bad_requests(merged, tmp_path):
    cases = [(["--expert", "9"], "there are 3 experts"),
             (["--expert", "nope"], "not one of"),
             ([], "exactly one of"),
             (["--expert", "1", "--coefficient", "2"], "exactly one of")]
    for args, words in cases:
        result = CliRunner().invoke(main, ["materialize", str(merged), *args, "--to",
                                           str(tmp_path / "x")])
        assert result.exit_code == 2 and words in result.output, result.output
    result = CliRunner().invoke(main, ["materialize", str(tmp_path), "--expert", "1", "--to",
                                       str(tmp_path / "y")])
    assert result.exit_code == 2 and "split_merge.json" in result.output


@pytest.mark.slow
def test_split_merge_refuses_a_base_model(models, tmp_path, fixtures_dir):
    plan = write_plan(tmp_path, models)
    plan.write_text(plan.read_text() + f"base_model: {fixtures_dir / 'llama' / 'anchor'}\n")
    proc = run_cli(plan)
    assert proc.returncode == 2 and "base-free" in proc.stderr
    assert not (tmp_path / "out" / "split_merge.json").exists()
