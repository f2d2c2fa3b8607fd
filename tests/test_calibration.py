"""The router calibration stage (pacer_stream/calibration.py) end to end.

Three copies of the "conflict" fixture family (block 2's MLP in conflict) get a
character-level tokenizer; each model gets sample lines written with its own letters,
so the hidden states of the three "domains" are easy to tell apart. Checked: the gate
written equals an independent fit on the MLP inputs that stock transformers computes
for the same lines; routing accuracy is reported; bytes do not depend on the budget;
every bad router_samples input is refused by name with nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import make_fixtures
from runs import digests, fails_with, run_cli
from pacer_stream.calibration import held_out_lines
from pacer_stream.methods.gate import fit_gate

BLOCK = make_fixtures.CONFLICT_BLOCK
LETTERS = ("abcdefgh", "ijklmnop", "qrstuvwx")  # each model's alphabet


def char_tokenizer() -> str:
    """tokenizer.json of a character-level BPE (no merges): id = position in the vocab."""
    from tokenizers import Tokenizer, models

    vocab = {ch: i for i, ch in enumerate(" abcdefghijklmnopqrstuvwxyz")}
    return Tokenizer(models.BPE(vocab=vocab, merges=[])).to_str()


def sample_lines(letters: str, count: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(letters), (count, 12), generator=gen)
    return ["".join(letters[i] for i in row) for row in picks.tolist()]


@pytest.fixture(scope="module")
def models(tmp_path_factory, fixtures_dir) -> Path:
    root = tmp_path_factory.mktemp("calibration-models")
    tokenizer = char_tokenizer()
    for k in (1, 2, 3):
        shutil.copytree(fixtures_dir / "conflict" / f"m{k}", root / f"m{k}")
        (root / f"m{k}" / "tokenizer.json").write_text(tokenizer)
        lines = sample_lines(LETTERS[k - 1], 20, seed=k)
        (root / f"samples{k}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_plan(tmp: Path, models: Path, out: str = "out", samples: bool = True,
               extra: str = "") -> Path:
    refs = [str(models / f"m{k}") for k in (1, 2, 3)]
    lines = f"router_samples: {{{', '.join(f'{r}: {models}/samples{k}.txt' for k, r in enumerate(refs, 1))}}}, " \
        if samples else ""
    plan = tmp / f"{out}.yaml"
    plan.write_text(f"models: [{', '.join(refs)}]\nmethod: pacer\nseed: 0\n"
                    f"pacer: {{{lines}interference_threshold: 0.35, top_k_experts: 2{extra}}}\n"
                    f"output: {{path: {tmp / out}, shard_size: 200KB}}\n")
    return plan


@pytest.fixture(scope="module")
def few_shot(tmp_path_factory, models) -> Path:
    tmp = tmp_path_factory.mktemp("few-shot")
    proc = run_cli(write_plan(tmp, models), "--max-memory", "600MB")
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


def test_gate_is_the_fit_on_the_mlp_inputs_transformers_computes(few_shot, models):
    import transformers

    report = json.loads((few_shot / "pacer_report.json").read_text())["pacer"]
    assert report["decision"]["blocks"] == [BLOCK]
    labels = report["decision"]["clusters"][str(BLOCK)]
    model = transformers.AutoModelForCausalLM.from_pretrained(few_shot).eval()
    seen = []
    hook = model.model.layers[BLOCK].mlp.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    vocab = {ch: i for i, ch in enumerate(" abcdefghijklmnopqrstuvwxyz")}
    u, y = [], []
    with torch.no_grad():
        for k in range(3):
            lines = (models / f"samples{k + 1}.txt").read_text().split()
            for line, held in zip(lines, held_out_lines(len(lines), 0.2)):
                if held:
                    continue
                model(input_ids=torch.tensor([[vocab[c] for c in line]]))
                u.append(seen.pop())
                y += [labels[k]] * len(line)
    hook.remove()
    expected = fit_gate(torch.cat(u), torch.tensor(y), report["decision"]["num_experts"])
    written = make_fixtures.file_state(few_shot)[f"model.layers.{BLOCK}.mlp.gate.weight"]
    assert torch.allclose(written.double(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max())


def test_routing_accuracy_is_reported_per_upcycled_block(few_shot):
    router = json.loads((few_shot / "pacer_report.json").read_text())["pacer"]["router"]
    assert router["kind"] == "few_shot"
    entry = router["layers"][str(BLOCK)]
    # each model writes with its own letters: the gate tells them apart on lines it never saw
    assert entry["held_out_accuracy"] > 0.9 and entry["held_out_tokens"] == 3 * 4 * 12
    assert router["sequences"] == {"fit": 48, "held_out": 12}


@pytest.mark.slow
def test_bytes_do_not_depend_on_the_budget(few_shot, models, tmp_path):
    proc = run_cli(write_plan(tmp_path, models), "--max-memory", "380MB")
    assert proc.returncode == 0, proc.stderr
    assert digests(tmp_path / "out") == digests(few_shot)


def test_data_free_gate_is_measured_on_the_sample_lines(models, tmp_path):
    from click.testing import CliRunner

    from pacer_stream.cli import main

    result = CliRunner().invoke(main, ["run", str(write_plan(tmp_path, models,
                                                             extra=", router: data_free"))])
    assert result.exit_code == 0, result.output
    # the CLI says which router was written and how well it routes
    # and that the dense layers were fitted to the samples the models wrote
    assert "linear layers by RegMean (alpha 0.9); token rows by usage" in result.output
    assert "from samples each model generated" in result.output
    assert f"router: data_free; routing accuracy per upcycled block (held-out sample tokens) " \
        f"{BLOCK}: " in result.output
    router = json.loads((tmp_path / "out" / "pacer_report.json").read_text())["pacer"]["router"]
    assert router["kind"] == "data_free"
    # every real line measures the data-free gate; none fits it
    assert router["layers"][str(BLOCK)]["held_out_tokens"] == 3 * 20 * 12
    assert router["sequences"]["held_out"] == 60


def _refused(tmp: Path, plan: Path, needle: str) -> None:
    from click.testing import CliRunner

    from pacer_stream.cli import main

    fails_with(CliRunner().invoke(main, ["run", str(plan), "--quiet"]), needle)
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("case, needle", [
    ("unknown model", "is not one of the models"),
    ("missing file", "not found"),
    ("one model without samples", "no sample file for"),
    ("few_shot without samples", "few_shot needs pacer.router_samples"),
    ("bad router", "expected one of few_shot, data_free"),
    ("holdout", "router_holdout"),
])
def test_bad_router_samples_are_refused_by_name(case, needle, models, tmp_path):
    refs = [str(models / f"m{k}") for k in (1, 2, 3)]
    plan = write_plan(tmp_path, models)
    text = plan.read_text()
    if case == "unknown model":
        text = text.replace(f"{refs[0]}: ", f"{models / 'elsewhere'}: ", 1).replace(
            f"models: [{models / 'elsewhere'}", f"models: [{refs[0]}")
    elif case == "missing file":
        text = text.replace("samples1.txt", "absent.txt")
    elif case == "one model without samples":
        text = text.replace(f", {refs[2]}: {models}/samples3.txt", "")
    elif case == "few_shot without samples":
        text = write_plan(tmp_path, models, samples=False, extra=", router: few_shot").read_text()
    elif case == "bad router":
        text = text.replace("top_k_experts: 2", "top_k_experts: 2, router: hidden")
    else:
        text = text.replace("top_k_experts: 2", "top_k_experts: 2, router_holdout: 1.5")
    plan.write_text(text)
    _refused(tmp_path, plan, needle)


def test_sample_file_problems_are_refused_by_name(models, tmp_path):
    bad = tmp_path / "models"
    shutil.copytree(models, bad)
    (bad / "samples2.txt").write_text("\n\n")
    _refused(tmp_path, write_plan(tmp_path, bad), "holds no non-empty line")
    (bad / "samples2.txt").write_bytes(b"\xff\xfe")
    _refused(tmp_path, write_plan(tmp_path, bad), "is not UTF-8")
    (bad / "samples2.txt").write_text("abc\n")
    (bad / "m1" / "tokenizer.json").unlink()
    _refused(tmp_path, write_plan(tmp_path, bad), "has no tokenizer.json")


def test_vit_few_shot_router_from_sample_images(fixtures_dir, tmp_path):
    """ViT: samples are .npy pixel arrays; each model's images differ in brightness."""
    import numpy as np

    refs = [str(fixtures_dir / "vit" / m) for m in ("ft1", "ft2", "ft3")]
    gen = np.random.default_rng(0)
    files = []
    for k in range(3):
        images = (gen.standard_normal((10, 3, 32, 32)) * 0.2 + (k - 1) * 2).astype(np.float32)
        np.save(tmp_path / f"images{k}.npy", images)
        files.append(f"{refs[k]}: {tmp_path / f'images{k}.npy'}")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{', '.join(refs)}]\nmethod: pacer\n"
                    f"pacer: {{interference_threshold: 0.0, router_samples: {{{', '.join(files)}}}}}\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    proc = run_cli(plan)
    assert proc.returncode == 0, proc.stderr
    router = json.loads((tmp_path / "out" / "pacer_report.json").read_text())["pacer"]["router"]
    assert router["kind"] == "few_shot" and sorted(router["layers"]) == ["0", "1"]
    assert router["layers"]["0"]["held_out_tokens"] == 3 * 2 * 17  # 2 held-out images each
    assert router["layers"]["0"]["held_out_accuracy"] > 0.9


def test_samples_that_do_not_fit_the_budget_are_refused_up_front(models, tmp_path):
    bad = tmp_path / "models"
    shutil.copytree(models, bad)
    for k in (1, 2, 3):  # 512 lines of 256 tokens per model: ~100 MB of hidden states
        (bad / f"samples{k}.txt").write_text(("abcdefgh" * 32 + "\n") * 512)
    proc = run_cli(write_plan(tmp_path, bad), "--max-memory", "600MB")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "router samples' hidden states take" in line and "at least" in line, line
    assert not (tmp_path / "out").exists()
