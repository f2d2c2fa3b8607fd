"""Gemma (1, 2, 3 text), Phi-3 and the MoE inputs (mixtral, qwen2_moe, qwen3_moe), end to
end through `pacer-stream run`.

A linear and a TIES merge of the tiny fixtures must load in transformers and compute what
an in-memory merge computes: the models' state dicts merged in the test (plain formulas,
fp32, whole tensors), saved and loaded by transformers into the same class. The output
keeps the family's config.json and leaves a tied LM head tied. Phi-3's fused qkv_proj and
the MoE experts have no exact permutation rule here, so alignment is refused up front (and
PACER for MoE inputs); PACER's sample stages are refused for gemma* and phi3 (the block
runtime has no forward pass for them). The symmetries the specs do state are checked
through transformers in test_symmetry.py (every family is in make_fixtures.FAMILIES).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import make_fixtures
from pacer_stream.cli import main
from runs import fails_with

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
FAMILIES = ["gemma", "gemma2", "gemma3_text", "phi3", *MOE]
TIED = {"gemma", "gemma2", "gemma3_text"}
MODELS = ["ft1", "ft2", "ft3"]
WEIGHTS = [0.5, 0.3, 0.2]
DENSITY, LAMBDA = 0.5, 0.9


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def write_plan(tmp: Path, models: list[Path], method: str, extra: str = "",
               out: str = "out") -> Path:
    listed = "".join(f"  - {{model: {m}, weight: {w}}}\n" for m, w in zip(models, WEIGHTS))
    plan = tmp / f"{method}-{out}.yaml"
    plan.write_text(f"models:\n{listed}method: {method}\noutput: {{path: {tmp / out}}}\n{extra}")
    return plan


def run(*args: str):
    return CliRunner().invoke(main, ["run", *args, "--quiet"])


# -- independent references: plain formulas over whole fp32 tensors ----------------------


def linear(xs: list[torch.Tensor]) -> torch.Tensor:
    """sum_k w_k x_k / sum_k w_k."""
    w = torch.tensor(WEIGHTS).reshape(-1, *[1] * xs[0].dim())
    return (w * torch.stack(xs)).sum(0) / w.sum()


def ties(xs: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """base + lambda * disjoint mean of the trimmed task vectors that agree with the elected
    sign: d_k = x_k - base keeps its top density fraction of |d_k|; the sign of
    sum_k w_k d_k (0 counts as +) is elected; the kept w_k d_k of that sign are summed and
    divided by the sum of their weights."""
    w = torch.tensor(WEIGHTS).reshape(-1, *[1] * base.dim())
    trimmed = []
    for x in xs:
        d = (x - base).reshape(-1)
        keep = torch.zeros_like(d, dtype=torch.bool)  # equal |d| (fp32 does tie): lowest index
        keep[torch.sort(-d.abs(), stable=True).indices[:max(1, int(DENSITY * d.numel()))]] = True
        trimmed.append((d * keep).reshape(base.shape))
    wd = w * torch.stack(trimmed)
    sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(wd) == sign
    divisor = (w * agree).sum(0)
    return base + LAMBDA * (wd * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def with_weights(family: str, state: dict[str, torch.Tensor], config: Path, folder: Path):
    """The family's transformers model holding ``state`` (the names as saved), loaded by
    transformers from ``folder`` (state and config.json written there)."""
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_bytes(config.read_bytes())
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_and_ties_match_an_in_memory_merge(family, fixtures_dir, tmp_path):
    folders = [fixtures_dir / family / m for m in MODELS]
    inputs = [{k: v.float() for k, v in tensors(f).items()} for f in folders]
    anchor = {k: v.float() for k, v in tensors(fixtures_dir / family / "anchor").items()}
    expected = {
        "linear": {k: linear([m[k] for m in inputs]) for k in inputs[0]},
        "ties": {k: ties([m[k] for m in inputs], anchor[k]) for k in inputs[0]},
    }
    ties_plan = (f"base_model: {fixtures_dir / family / 'anchor'}\n"
                 f"parameters: {{density: {DENSITY}, lambda: {LAMBDA}}}\n")
    for method, extra in (("linear", ""), ("ties", ties_plan)):
        result = run(str(write_plan(tmp_path, folders, method, extra, out=method)))
        assert result.exit_code == 0, (result.output, result.exception)
        out = tmp_path / method
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == family
        assert set(tensors(out)) == set(inputs[0])  # no lm_head added to a tied model
        assert ("lm_head.weight" in inputs[0]) == (family not in TIED)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert type(loaded).__name__ == make_fixtures.FAMILIES[family][1]
        if family in TIED:
            assert config["tie_word_embeddings"] is True
            assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        config_file = folders[0] / "config.json"
        got = logits(loaded.eval())
        reference = with_weights(family, expected[method], config_file, tmp_path / f"{method}-ref")
        want = logits(reference)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (method, (got - want).abs().max())
        # the check can fail: the first model alone computes something else
        first = with_weights(family, inputs[0], config_file, tmp_path / f"{method}-first")
        assert not torch.allclose(logits(first), want, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma", "gemma3_text"])
def test_alignment_undoes_a_permuted_gemma(family, fixtures_dir, tmp_path):
    """"perm" is ft3 with every symmetry group permuted: aligned onto ft3, the two are one
    model, so their average computes what ft3 computes."""
    twins = [fixtures_dir / family / "ft3", fixtures_dir / family / "perm"]
    result = run(str(write_plan(tmp_path, twins, "linear", "align: true\n")))
    assert result.exit_code == 0, (result.output, result.exception)
    ft3 = tensors(twins[0])
    merged = tensors(tmp_path / "out")
    assert all(torch.allclose(merged[k], ft3[k], atol=1e-6) for k in ft3)
    unaligned = run(str(write_plan(tmp_path, twins, "linear", out="plain")))
    assert unaligned.exit_code == 0
    plain = tensors(tmp_path / "plain")
    assert not all(torch.allclose(plain[k], ft3[k], atol=1e-3) for k in ft3)


@pytest.mark.parametrize("extra", ["align: true\n", "align: only\n"])
def test_phi3_alignment_is_refused_up_front(extra, fixtures_dir, tmp_path):
    folders = [fixtures_dir / "phi3" / m for m in MODELS]
    result = run(str(write_plan(tmp_path, folders, "linear", extra)))
    fails_with(result, "phi3", "qkv_proj", "align: false")
    assert not (tmp_path / "out").exists()


def test_phi3_pacer_is_refused_unless_it_does_not_align(fixtures_dir, tmp_path):
    folders = [fixtures_dir / "phi3" / m for m in MODELS[:2]]
    fails_with(run(str(write_plan(tmp_path, folders, "pacer"))), "phi3", "pacer aligns by default")
    assert not (tmp_path / "out").exists()
    plan = CliRunner().invoke(main, ["plan", str(write_plan(tmp_path, folders, "linear",
                                                            "align: true\n"))])
    fails_with(plan, "phi3", "qkv_proj")


@pytest.mark.parametrize("family", MOE)
def test_moe_inputs_refuse_alignment_and_pacer(family, fixtures_dir, tmp_path):
    folders = [fixtures_dir / family / m for m in MODELS[:2]]
    fails_with(run(str(write_plan(tmp_path, folders, "ties", "align: true\n"))), family,
               "experts have no alignment rule", "align: false")
    fails_with(run(str(write_plan(tmp_path, folders, "pacer", "align: false\n"))), family,
               "method pacer", "plain method")
    assert not (tmp_path / "out").exists()


def test_moe_experts_merge_expert_by_expert(fixtures_dir, tmp_path):
    """Every expert of the output is the mean of that expert of the inputs, as stored."""
    folders = [fixtures_dir / "mixtral" / m for m in MODELS]
    assert run(str(write_plan(tmp_path, folders, "linear"))).exit_code == 0
    merged, inputs = tensors(tmp_path / "out"), [tensors(f) for f in folders]
    experts = [k for k in merged if ".experts." in k]
    assert len(experts) == 2 * 3 * 3  # layers x experts x (w1, w2, w3)
    for name in experts:
        assert torch.allclose(merged[name], linear([m[name] for m in inputs]), atol=1e-6)


@pytest.mark.parametrize("family", ["gemma2", "phi3", "bert"])
def test_pacer_with_samples_is_refused_up_front(family, fixtures_dir, tmp_path):
    """Sample lines (RegMean, calibration) need the block runtime's forward pass."""
    folders = [fixtures_dir / family / m for m in MODELS[:2]]
    lines = tmp_path / "lines.txt"
    lines.write_text("a sample line\n")
    extra = ("align: false\npacer: {router_samples: {" + ", ".join(
        f"{f}: {lines}" for f in folders) + "}}\n")
    fails_with(run(str(write_plan(tmp_path, folders, "pacer", extra))), family,
               "forward pass", "router_samples")
    assert not (tmp_path / "out").exists()
