"""benchmarks/bench_parity.py: its comparison on hand-made tensors, its table of cases, and
(slow, only where a mergekit venv exists) one method end to end against mergekit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_parity  # noqa: E402

FOLDERS = {name: Path("/models") / name for name in bench_parity.MODELS}
RANDOM_DROP = ("dare_linear", "dare_ties", "della", "della_linear")


def reference_ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| over numpy's fp32 spacing at the larger magnitude, in float64."""
    larger = np.maximum(np.abs(a), np.abs(b)).astype(np.float32)
    return np.abs(a.astype(np.float64) - b.astype(np.float64)) / np.spacing(larger).astype(np.float64)


def test_ulp_distance_counts_fp32_steps_at_the_larger_magnitude():
    one = torch.tensor([1.0])
    up = torch.nextafter(one, torch.tensor([2.0]))
    down = torch.nextafter(one, torch.tensor([0.0]))
    assert bench_parity.ulp_distance(one, up).item() == 1.0
    assert bench_parity.ulp_distance(one + 3 * 2.0 ** -23, one).item() == 3.0
    # 1 - 2^-24 is one step below 1, but the spacing is taken at the larger value, 1.0
    assert bench_parity.ulp_distance(one, down).item() == 0.5
    tiny = torch.tensor([2.0 ** -149])  # the smallest subnormal
    assert bench_parity.ulp_distance(torch.zeros(1), tiny).item() == 1.0
    assert bench_parity.ulp_distance(torch.tensor([-0.0]), torch.tensor([0.0])).item() == 0.0
    nan = torch.tensor([float("nan")])
    assert bench_parity.ulp_distance(nan, nan).item() == 0.0
    assert bench_parity.ulp_distance(nan, one).item() == float("inf")


def test_ulp_distance_matches_numpy_spacing_on_random_values():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4096, generator=gen) * torch.logspace(-30, 30, 4096)
    b = a + a * 1e-6 * torch.randn(4096, generator=gen)
    got = bench_parity.ulp_distance(a, b).numpy()
    np.testing.assert_allclose(got, reference_ulps(a.numpy(), b.numpy()), rtol=1e-12)


def test_compare_finds_the_worst_tensor_and_the_ones_missing_on_either_side():
    same = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    off = same.clone()
    off[1, 2] += 2 * 2.0 ** -21  # 5 + 2^-20: 5 is in [4, 8), spacing 2^-21, so 2 ulp
    a = {"same": same, "off": off, "only_a": same, "bent": torch.zeros(3),
         "half": torch.ones(2, dtype=torch.float16)}
    b = {"same": same.clone(), "off": same.clone(), "only_b": same, "bent": torch.zeros(1, 3),
         "half": torch.ones(2)}
    result = bench_parity.compare(a, b)
    assert result["compared"] == 3
    assert result["dtype_mismatch"] == ["half: torch.float16 vs torch.float32"]
    assert result["max_ulp"] == 2.0 and result["max_abs"] == 2.0 ** -20
    assert result["worst"]["tensor"] == "off" and result["worst"]["mergekit"] == 5.0
    assert result["only_pacer"] == ["only_a"] and result["only_mergekit"] == ["only_b"]
    assert result["shape_mismatch"] == ["bent: [3] vs [1, 3]"]


def test_a_case_with_tensors_in_one_output_only_does_not_agree():
    case = bench_parity.CASES[0]
    row = {"mergekit": {"ok": True}, "pacer": {"ok": True},
           "diff": bench_parity.compare({"x": torch.ones(2)}, {"x": torch.ones(2), "y": torch.ones(1)})}
    assert row["diff"]["max_ulp"] == 0
    assert bench_parity.verdict(case, row).startswith("differs: tensors in one output only")


def test_rounding_verdict_needs_pacer_no_further_from_float64_than_mergekit_fp32():
    ref = {"x": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    mergekit = {"x": torch.tensor([1.0, 4e-8])}  # mergekit's own fp32 rounding error: 4e-8
    near, far = {"x": torch.tensor([1.0, -7e-8])}, {"x": torch.tensor([1.0, 1e-6])}
    case = bench_parity.Case("karcher", "hand-made", "merge_method: karcher\n")
    for pacer_out, agrees in ((near, True), (far, False)):
        row = {"mergekit": {"ok": True}, "pacer": {"ok": True},
               "diff": bench_parity.compare(pacer_out, mergekit),
               "reference": {"ok": True, "pacer": bench_parity.compare(pacer_out, ref),
                             "mergekit": bench_parity.compare(mergekit, ref)}}
        assert row["diff"]["max_ulp"] > bench_parity.ULP_TOLERANCE
        assert bench_parity.verdict(case, row).startswith("agrees to fp32 rounding") == agrees


def test_drop_stats_against_the_formula():
    base = {"w": torch.zeros(4), "b": torch.ones(2)}
    merged = {"w": torch.tensor([0.0, 2.0, 0.0, -1.0]), "b": torch.tensor([1.0, 4.0])}
    deltas = np.array([0.0, 3.0, 0.0, 2.0, 0.0, -1.0])  # sorted by name: b, then w
    stats = bench_parity.drop_stats(merged, base)
    assert stats["at_base"] == 0.5
    assert stats["mean"] == pytest.approx(deltas.mean())
    assert stats["std"] == pytest.approx(deltas.std(ddof=1))
    # one model alone: ‖merged - base‖₁ / ‖alone - base‖₁ is 3/5 for w and 3/2 for b
    alone = {"w": torch.tensor([1.0, 1.0, -1.0, -2.0]), "b": torch.tensor([1.0, 3.0])}
    assert bench_parity.drop_stats(merged, base, alone)["l1_dev"] == pytest.approx(0.5)


@pytest.mark.parametrize("case", bench_parity.CASES, ids=lambda c: f"{c.method}-{c.summary[:24]}")
def test_every_case_is_a_mergekit_config_of_its_method(case):
    config = yaml.safe_load(bench_parity.case_yaml(case, FOLDERS))
    assert config["merge_method"] == case.method
    assert config["dtype"] == "float32"
    assert bool(config.get("models")) != bool(config.get("slices"))
    named = [m["model"] for m in config.get("models") or []]
    named += [s["model"] for sl in config.get("slices") or [] for s in sl["sources"]]
    assert named and all(Path(m).parent == Path("/models") for m in named)
    densities = [(config.get("parameters") or {}).get("density", 1.0)]
    densities += [(m.get("parameters") or {}).get("density", 1.0) for m in config.get("models") or []]
    assert case.random == (case.method in RANDOM_DROP and min(densities) < 1)


def test_translate_maps_mergekit_keys_to_a_plan():
    ties = next(c for c in bench_parity.CASES if c.method == "ties" and "0.5/0.7/0.3" in c.summary)
    config = yaml.safe_load(bench_parity.case_yaml(ties, FOLDERS))
    config["models"].insert(0, {"model": config["base_model"]})  # a base listed as a model
    plan = bench_parity.translate(config, Path("/out"))
    assert plan["method"] == "ties" and "merge_method" not in plan
    assert plan["base_model"] == str(FOLDERS["base"])
    assert plan["models"][0] == {"model": str(FOLDERS["ft1"]), "weight": 1.0, "density": 0.5}
    assert len(plan["models"]) == 3
    assert plan["output"] == {"path": "/out", "dtype": "float32"}
    dare = bench_parity.translate({"merge_method": "dare_ties", "models": ["a", "b"]}, Path("/o"))
    assert dare["parameters"] == {"rescale": "l1"}  # mergekit 0.1.5's default: the L1 ratio
    off = bench_parity.translate({"merge_method": "dare_ties", "models": ["a", "b"],
                                  "parameters": {"rescale": False}}, Path("/o"))
    assert off["parameters"] == {"rescale": "none"}
    slerp = bench_parity.translate({"merge_method": "slerp", "base_model": "a",
                                    "models": ["a", "b"]}, Path("/o"))
    assert [m["model"] for m in slerp["models"]] == ["a", "b"]  # two models stay two


def mergekit_exe() -> Path | None:
    for work in (Path("/tmp/pacer-parity"), Path("/tmp/pacer-bench")):
        exe = work / "mergekit-venv" / "bin" / "mergekit-yaml"
        if exe.exists():
            return exe
    return None


@pytest.mark.slow
@pytest.mark.skipif(mergekit_exe() is None, reason="no mergekit venv (run benchmarks/bench_parity.py once)")
def test_linear_agrees_with_mergekit_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_parity, "CASES", bench_parity.CASES[:1])  # linear, 3 weights
    stem = tmp_path / "parity"
    assert bench_parity.main(["--work", str(tmp_path), "--mergekit", str(mergekit_exe()),
                              "--results", str(stem)]) == 0
    [row] = json.loads(stem.with_suffix(".json").read_text())["cases"]
    assert row["method"] == "linear" and row["verdict"] == "agrees", row["verdict"]
    assert row["diff"]["compared"] == 4 * 9 + 3  # per block 9 tensors; embed, norm, lm_head
    assert "| linear |" in stem.with_suffix(".md").read_text()
