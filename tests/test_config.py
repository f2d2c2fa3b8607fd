"""Plan files: PacerKit's keys as they are, defaults, per-model parameters, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacer_stream.config import load_plan, parse_plan
from pacer_stream.config_schema import PACER_DEFAULTS
from pacer_stream.errors import PacerError

ROOT = Path(__file__).resolve().parents[1]


def test_pacerkit_example_plan_parses():
    plan = load_plan(ROOT / "plans/qwen-coder.yaml")
    assert plan.project_name == "qwen-coder-merge"
    assert [m.ref.repo_id for m in plan.models] == ["fluently/FluentlyQwen3-Coder-4B-0909",
                                                   "SamuelBang/AesCoder-4B"]
    assert plan.method == "pacer" and plan.pacer["top_k_experts"] == 2
    assert plan.pacer["interference_threshold"] == 0.35
    assert plan.output.path == (ROOT / "plans/merged_model").resolve()


def test_model_mappings_revisions_and_relative_paths(tmp_path):
    (tmp_path / "local").mkdir()
    plan = parse_plan({
        "models": ["./local", {"model": "org/name@v1.0", "weight": 0.25, "density": 0.5}],
        "method": "dare_ties", "seed": 7, "output": {"shard_size": "1GiB", "dtype": "bfloat16"},
    }, base_dir=tmp_path)
    assert plan.models[0].ref.path == (tmp_path / "local").resolve()
    assert plan.models[1].ref.repo_id == "org/name" and plan.models[1].ref.revision == "v1.0"
    assert plan.models[1].weight == 0.25 and plan.models[1].density == 0.5
    assert plan.output.shard_size == 2**30 and plan.output.dtype == "bfloat16"
    assert plan.output.target == "transformers"
    assert plan.pacer == PACER_DEFAULTS and plan.seed == 7


@pytest.mark.parametrize("raw, needle", [
    ({"models": ["a/b", "c/d"], "seed": -1}, "seed"),
    ({"models": ["a/b", "c/d"], "pacer": {"top_k_experts": 0}}, "top_k_experts"),
    ({"models": ["a/b", "c/d"], "pacer": {"anchor_strategy": "best"}}, "anchor_strategy"),
    ({"models": ["a/b", {"model": "c/d", "density": 2}]}, "density"),
    ({"models": ["a/b", {"model": "c/d", "weight": "x"}]}, "weight"),
    ({"models": ["a/b", "c/d"], "output": {"save_format": "bin"}}, "save_format"),
    ({"models": ["a/b", "c/d"], "output": {"dtype": "fp8"}}, "dtype"),
    ({"models": ["a/b", "c/d"], "output": {"target": "gguf"}}, "target: expected one of"),
    ({"models": ["a/b", "c/d"], "method": "task_arithmetic"}, "base_model"),
    ({"models": ["a/b", "not a ref!"]}, "hub id"),
])
def test_invalid_values_are_named(raw, needle, tmp_path):
    with pytest.raises(PacerError, match=needle):
        parse_plan(raw, base_dir=tmp_path)
