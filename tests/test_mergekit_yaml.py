"""mergekit configuration files run as they are (pacer_stream/mergekit_yaml.py), with
mergekit's per-tensor parameters: filters and layer gradients (methods/schedule.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import make_header_only
from pacer_stream.cli import main
from pacer_stream.config import load_plan
from pacer_stream.errors import PacerError
from pacer_stream.mergekit_yaml import to_plan
from pacer_stream.methods import schedule
from runs import fails_with

DIMS = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64,
        "torch_dtype": "float32"}

# mergekit's own documentation examples (examples/linear.yml and examples/ties.yml of
# arcee-ai/mergekit), verbatim: they must run unchanged
LINEAR_YML = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""
TIES_YML = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""
# the gradients of TIES_YML on 4 blocks, by hand: density [1, 0.7, 0.1] at t = 0, 1/3, 2/3, 1
# is 1, 1 - 0.3 * 2/3, 0.7 - 0.6 / 3, 0.1; weight [0, 0.3, 0.7, 1] hits its points exactly
ORCA_DENSITY = {None: 1.0, 0: 1.0, 1: 0.8, 2: 0.5, 3: 0.1}
PLATYPUS_WEIGHT = {None: 0.0, 0: 0.0, 1: 0.3, 2: 0.7, 3: 1.0}
REPOS = ["psmathur/orca_mini_v3_13b", "WizardLM/WizardLM-13B-V1.2", "garage-bAInd/Platypus2-13B",
         "WizardLM/WizardMath-13B-V1.0", "TheBloke/Llama-2-13B-fp16"]


# -- schedules: hand-computed values ------------------------------------------------------

def test_gradient_interpolates_over_the_layers():
    g = [0, 0.5, 0.3, 0.7, 1]  # mergekit's gradient-slerp example, 40 layers
    assert schedule.value_at(g, "x", 0.0) == 0
    assert schedule.value_at(g, "x", 1.0) == 1
    assert schedule.value_at(g, "x", 0.25) == pytest.approx(0.5)
    assert schedule.value_at(g, "x", 0.375) == pytest.approx(0.4)  # half way 0.5 -> 0.3
    t = schedule.layer_position(13, 40)  # 13/39 * 4 = 1.333: a third from 0.5 to 0.3
    assert schedule.value_at(g, "x", t) == pytest.approx(0.5 - 0.2 / 3)
    assert schedule.layer_position(None, 40) == 0.0
    assert schedule.layer_position(0, 1) == 1.0


def test_filters_take_the_first_match_and_fall_back():
    s = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 2},
         {"value": 3}]
    assert schedule.value_at(s, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert schedule.value_at(s, "model.layers.1.mlp.up_proj.weight", 0.5) == 2
    assert schedule.value_at(s, "model.norm.weight", 0.5) == 3
    only = {"filter": "mlp", "value": 0.7}
    assert schedule.value_at(only, "model.embed_tokens.weight", 0.0) is None
    assert schedule.resolve({"weight": only, "density": 0.5}, "lm_head.weight", 0) == \
        {"density": 0.5}
    assert schedule.value_at([True, False], "x", 0.4) is True  # booleans pick, no blend
    assert schedule.value_at([True, False], "x", 1.0) is False


@pytest.mark.parametrize("setting, needle", [
    ([1, {"value": 2}], "not both"),
    ({"filter": "mlp"}, "conditional value"),
    ({"filter": 3, "value": 1}, "filter must be a string"),
    ([], "expected a value"),
])
def test_bad_settings_are_refused(setting, needle):
    with pytest.raises(PacerError, match=needle):
        list(schedule.scalars(setting, "parameters.weight"))


# -- translation ---------------------------------------------------------------------------

def test_slices_become_a_plans_slices(tmp_path):
    raw = {"slices": [{"sources": [{"model": "a/x", "layer_range": [0, 40]},
                                   {"model": "a/y", "layer_range": [0, 40],
                                    "parameters": {"weight": 2}}],
                       "parameters": {"t": [{"filter": "mlp", "value": 1}]}}],
           "merge_method": "slerp", "base_model": "a/x",
           "parameters": {"t": 0.5, "rescale": True}, "dtype": "bf16"}
    plan, notes = to_plan(raw, "m.yml", tmp_path / "out", "m")
    assert plan["slices"] == [{"sources": [{"model": "a/x", "layer_range": [0, 40]},
                                           {"model": "a/y", "weight": 2, "layer_range": [0, 40]}],
                               "parameters": {"t": [{"filter": "mlp", "value": 1}]}}]
    assert "models" not in plan and plan["base_model"] == "a/x"  # listed among the sources
    assert plan["parameters"] == {"t": 0.5, "rescale": "l1"}  # mergekit's rescale: L1 ratio
    assert plan["output"] == {"path": str(tmp_path / "out"), "dtype": "bfloat16"}
    assert any("mergekit" in n for n in notes) and any("float32" in n for n in notes)


def test_a_slices_parameters_go_before_the_top_levels():
    merged = schedule.first_then({"t": [{"filter": "mlp", "value": 1}]}, {"t": 0.5, "w": 2})
    assert merged == {"t": [{"filter": "mlp", "value": 1}, {"value": 0.5}], "w": 2}
    assert schedule.value_at(merged["t"], "model.layers.0.mlp.up_proj.weight", 0) == 1
    assert schedule.value_at(merged["t"], "model.norm.weight", 0) == 0.5


def test_dare_from_mergekit_rescales_as_mergekit_does(tmp_path):
    models = [{"model": "a/x"}, {"model": "a/y"}]
    plan, notes = to_plan({"models": models, "merge_method": "dare_ties", "base_model": "b/b"},
                          "m.yml", tmp_path, "m")
    assert plan["parameters"]["rescale"] == "l1" and any("L1-norm" in n for n in notes)
    plan, _ = to_plan({"models": models, "merge_method": "dare_ties", "base_model": "b/b",
                       "parameters": {"rescale": False}}, "m.yml", tmp_path, "m")
    assert plan["parameters"]["rescale"] == "none"


def test_a_listed_base_is_no_task_vector_and_linear_ignores_the_base(tmp_path):
    models = [{"model": "b/base"}, {"model": "a/x"}, {"model": "a/y"}]
    ties, notes = to_plan({"models": models, "merge_method": "ties", "base_model": "b/base"},
                             "m.yml", tmp_path, "m")
    assert [m["model"] for m in ties["models"]] == ["a/x", "a/y"]
    assert any("dropped" in n for n in notes)
    linear, notes = to_plan({"models": models, "merge_method": "linear",
                                "base_model": "b/base"}, "m.yml", tmp_path, "m")
    assert "base_model" not in linear and len(linear["models"]) == 3
    assert any("ignored" in n for n in notes)
    # in slices too: mergekit's linear averages every source, the base's included
    sources = [{"model": m["model"], "layer_range": [0, 2]} for m in models]
    sliced, _ = to_plan({"slices": [{"sources": sources}], "merge_method": "linear",
                         "base_model": "b/base"}, "m.yml", tmp_path, "m")
    assert "base_model" not in sliced and sliced["slices"][0]["sources"] == sources


@pytest.mark.parametrize("extra, needle", [
    ({"modules": {}}, "modules"),
    ({"tokenizer_source": "union"}, "union"),
    ({"tokenizer": {"source": "base"}}, "tokenizer block"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"method": "ties"}, "both merge_method"),
    ({"lora": 1}, "'lora' is not a mergekit configuration key"),
    ({"dtype": "float64"}, "dtype 'float64'"),
])
def test_unsupported_mergekit_keys_are_refused_by_name(extra, needle, tmp_path):
    raw = {"models": [{"model": "a/x"}, {"model": "a/y"}], "merge_method": "linear", **extra}
    with pytest.raises(PacerError, match=needle):
        to_plan(raw, "m.yml", tmp_path, "m")


@pytest.mark.parametrize("slices, needle", [
    ([{"sources": [{"model": "a/x"}]}], "layer_range"),
    ([{"sources": [{"model": "a/x", "layer_range": [0, 8]}], "base_model": "a/x"}],
     "base per slice"),
    ([{"sources": [{"model": "a/x", "layer_range": [0, 8]}], "residual_weight": 1}],
     "not a mergekit slice key"),
])
def test_bad_slices_are_refused(slices, needle, tmp_path):
    with pytest.raises(PacerError, match=needle):
        to_plan({"slices": slices, "merge_method": "passthrough"}, "m.yml", tmp_path, "m")


def test_a_lora_reference_and_a_missing_out_are_refused(tmp_path):
    with pytest.raises(PacerError, match="LoRA"):
        to_plan({"models": [{"model": "a/x+b/lora"}, {"model": "a/y"}],
                 "merge_method": "linear"}, "m.yml", tmp_path, "m")
    with pytest.raises(PacerError, match="pacer-stream run m.yml OUT"):
        to_plan({"models": [{"model": "a/x"}, {"model": "a/y"}], "merge_method": "linear"},
                "m.yml", None, "m")


# -- end to end: mergekit's documentation examples, models from a (local) hub cache -------

def _tiny_llama(folder: Path, seed: int) -> Path:
    config = {**make_header_only.LLAMA3_70B, **DIMS}
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {name: torch.randn(shape, generator=gen) * 0.1
               for name, shape in make_header_only.llama_tensors(config)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _hub_cache(root: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """A hub cache (huggingface_hub's layout) holding a tiny Llama under each repo id."""
    cache, states = root / "hf-cache", {}
    for k, repo in enumerate(REPOS):
        folder = _tiny_llama(root / "src" / f"m{k}", seed=k)
        states[repo] = load_file(str(folder / "model.safetensors"))
        commit = hashlib.sha1(repo.encode()).hexdigest()
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text(commit)
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for path in folder.iterdir():
            (snapshot / path.name).write_bytes(path.read_bytes())
    return cache, states


def _run(config: Path, out: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pacer_stream", "run", str(config), str(out),
                           *args], capture_output=True, text=True, env=env, cwd=config.parent)


def _ties_reference(xs: list[torch.Tensor], base: torch.Tensor, weights: list[float],
                    densities: list[float]) -> torch.Tensor:
    """mergekit's TIES with a base, written plainly (fp64)."""
    d = torch.stack([x.double() - base.double() for x in xs])
    for k, density in enumerate(densities):
        flat = d[k].abs().reshape(-1)
        keep = flat.numel() if density >= 1 else int(density * flat.numel())
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.sort(-flat, stable=True).indices[:keep]] = True
        d[k] = d[k] * mask.reshape(d[k].shape)
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * base.dim())
    wd = w * d
    sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(wd) == sign
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base.double() + (wd * agree).sum(0) / divisor


def test_mergekit_documentation_examples_run_unchanged(tmp_path):
    cache, states = _hub_cache(tmp_path)
    (tmp_path / "linear.yml").write_text(LINEAR_YML)
    (tmp_path / "ties.yml").write_text(TIES_YML)

    done = _run(tmp_path / "linear.yml", tmp_path / "linear-out", cache)
    assert done.returncode == 0, done.stderr
    assert "as a mergekit configuration (merge_method linear)" in done.stdout
    merged = load_file(str(tmp_path / "linear-out" / "model.safetensors"))
    w = [1.0, 0.3, 0.5]
    for name, value in merged.items():
        xs = [states[r][name] for r in REPOS[:3]]  # orca, WizardLM, Platypus2: the file's order
        expected = sum(wk * x.double() for wk, x in zip(w, xs)) / sum(w)
        assert value.dtype == torch.float16
        assert torch.allclose(value.double(), expected, rtol=1e-3, atol=1e-4), name

    done = _run(tmp_path / "ties.yml", tmp_path / "ties-out", cache)
    assert done.returncode == 0, done.stderr
    assert "int8_mask has no effect" in done.stdout
    merged = load_file(str(tmp_path / "ties-out" / "model.safetensors"))
    orca, platypus, wizmath, base = (states[r] for r in (REPOS[0], REPOS[2], REPOS[3], REPOS[4]))
    checked = set()
    for name, value in merged.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        # by hand: block i of 4 sits at t = i/3; outside the blocks t = 0
        densities = [ORCA_DENSITY[layer], 0.5, 0.33]
        weights = [1.0, PLATYPUS_WEIGHT[layer], 0.5 if "mlp" in name else 0.0]
        expected = _ties_reference([orca[name], platypus[name], wizmath[name]], base[name],
                                   weights, densities)
        assert torch.allclose(value.double(), expected, rtol=1e-3, atol=1e-4), name
        checked.add((round(weights[1], 6), round(densities[0], 6)))
    assert len(checked) >= 4  # the gradients really gave the layers different values
    # the plan as run is a pacer-stream plan that reads back to the same merge
    again = load_plan(tmp_path / "ties-out" / "pacer_plan.yaml")
    assert again.method == "ties" and len(again.models) == 3
    assert again.models[1].parameters["weight"] == [0, 0.3, 0.7, 1]


def test_mergekit_run_refusals_lose_nothing(tmp_path):
    cache, _ = _hub_cache(tmp_path)
    (tmp_path / "deep.yml").write_text(
        "slices:\n  - sources:\n      - model: psmathur/orca_mini_v3_13b\n"
        "        layer_range: [0, 40]\n      - model: garage-bAInd/Platypus2-13B\n"
        "        layer_range: [0, 40]\nmerge_method: linear\n")
    done = _run(tmp_path / "deep.yml", tmp_path / "out", cache)
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and "layer_range [0, 40]" in line and "4 layers" in line, line
    assert not (tmp_path / "out").exists()
    # no OUT for a mergekit file; OUT also overrides a plan's output.path
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "deep.yml")])
    fails_with(result, "names no output folder", "OUT")


def test_out_and_no_copy_tokenizer_on_a_plan(fixtures_dir, tmp_path):
    plan = tmp_path / "p.yaml"
    family = fixtures_dir / "llama"
    plan.write_text(f"models: [{family / 'ft1'}, {family / 'ft2'}]\nmethod: linear\n"
                    f"output: {{path: {tmp_path / 'ignored'}}}\n")
    result = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "o"), "--quiet",
                                       "--no-copy-tokenizer", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "config.json").is_file() and not (tmp_path / "ignored").exists()
    assert not list((tmp_path / "o").glob("tokenizer*"))
    assert "copy_tokenizer: false" in (tmp_path / "o" / "pacer_plan.yaml").read_text()
    result = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "o2"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "o2").glob("tokenizer*")) == \
        [tmp_path / "o2" / p.name for p in sorted(family.joinpath("ft1").glob("tokenizer*"))]


def test_tokenizer_source_must_be_an_input(fixtures_dir, tmp_path):
    family = fixtures_dir / "llama"
    plan = tmp_path / "p.yaml"
    plan.write_text(f"models: [{family / 'ft1'}, {family / 'ft2'}]\nmethod: linear\n"
                    f"output: {{path: {tmp_path / 'o'}, tokenizer_source: {family / 'ft3'}}}\n")
    fails_with(CliRunner().invoke(main, ["plan", str(plan)]), "tokenizer_source",
               "not one of the models")
    plan.write_text(f"models: [{family / 'ft1'}, {family / 'ft2'}]\nmethod: linear\n"
                    f"output: {{path: {tmp_path / 'o'}, tokenizer_source: base}}\n")
    fails_with(CliRunner().invoke(main, ["plan", str(plan)]), "no base_model")


def test_a_plan_level_gradient_plans_and_runs(fixtures_dir, tmp_path):
    family = fixtures_dir / "llama"
    plan = tmp_path / "p.yaml"
    plan.write_text(f"models: [{family / 'ft1'}, {family / 'ft2'}]\nmethod: ties\n"
                    f"base_model: {family / 'anchor'}\nparameters: {{density: [0.2, 0.9]}}\n"
                    f"output: {{path: {tmp_path / 'o'}}}\n")
    for command in (["plan", str(plan)], ["run", str(plan), "--quiet"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, (result.output, result.exception)


def test_per_tensor_values_are_refused_where_the_method_reads_one(fixtures_dir, tmp_path):
    family = fixtures_dir / "llama"
    plan = tmp_path / "p.yaml"
    plan.write_text(f"models:\n  - {{model: {family / 'ft1'}, weight: [1, 2]}}\n"
                    f"  - {family / 'ft2'}\nmethod: pacer\noutput: {{path: {tmp_path / 'o'}}}\n")
    fails_with(CliRunner().invoke(main, ["plan", str(plan)]), "models[0].weight varies by tensor",
               "method pacer")


def test_a_zero_weight_sum_in_one_tensor_is_refused_before_writing(fixtures_dir, tmp_path):
    family = fixtures_dir / "llama"
    plan = tmp_path / "p.yaml"
    plan.write_text(
        f"models:\n  - {{model: {family / 'ft1'}, weight: [{{filter: mlp, value: 0}}, "
        f"{{value: 1}}]}}\n  - {{model: {family / 'ft2'}, weight: [{{filter: mlp, value: 0}}, "
        f"{{value: 1}}]}}\nmethod: linear\noutput: {{path: {tmp_path / 'o'}}}\n")
    result = CliRunner().invoke(main, ["run", str(plan), "--quiet"])
    fails_with(result, "mlp", "sum to zero")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["ties"])
def test_thread_count_does_not_change_a_byte(method, fixtures_dir, tmp_path):
    from runs import digests, run_cli

    family = fixtures_dir / "llama"
    outputs = []
    for threads in ("1", "2"):
        plan = tmp_path / f"p{threads}.yaml"
        plan.write_text(f"models: [{family / 'ft1'}, {family / 'ft2'}, {family / 'ft3'}]\n"
                        f"method: {method}\nbase_model: {family / 'anchor'}\n"
                        f"parameters: {{density: 0.5}}\noutput: {{path: {tmp_path / threads}}}\n")
        done = run_cli(plan, "--threads", threads)
        assert done.returncode == 0, done.stderr
        outputs.append(digests(tmp_path / threads))
    assert outputs[0] == outputs[1]


# mergekit's examples/gradient-slerp.yml, verbatim but for dtype (float32 here, so t = 0
# and t = 1 can be checked to the bit's neighbourhood)
GRADIENT_SLERP_YML = """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float32
"""


def test_mergekit_gradient_slerp_example_runs_unchanged(tmp_path, monkeypatch):
    monkeypatch.setitem(DIMS, "num_hidden_layers", 40)
    cache, states = _hub_cache(tmp_path)
    (tmp_path / "slerp.yml").write_text(GRADIENT_SLERP_YML)
    done = _run(tmp_path / "slerp.yml", tmp_path / "out", cache)
    assert done.returncode == 0, done.stderr
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base, other = states[REPOS[0]], states[REPOS[2]]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 40
    # t = 0 is the base, t = 1 the other model: block 0's attention and block 39's MLP are
    # the base's, block 0's MLP and block 39's attention the other's
    for name, value in merged.items():
        if ".layers.0.self_attn." in name or ".layers.39.mlp." in name:
            assert torch.allclose(value, base[name], rtol=1e-6, atol=1e-7), name
        elif ".layers.0.mlp." in name or ".layers.39.self_attn." in name:
            assert torch.allclose(value, other[name], rtol=1e-6, atol=1e-7), name
        elif ".layers.20." in name and ("mlp" in name or "self_attn" in name):
            # t in between: neither end
            assert not torch.allclose(value, base[name]) and not torch.allclose(value, other[name])
