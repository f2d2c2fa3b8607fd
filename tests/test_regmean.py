"""PACER's few-shot dense path: RegMean for linear layers (methods/regmean.py, run by
regmean_pass.py) and token rows by usage (methods/vocabulary.py).

The formulas are checked on hand-computed cases; the run is checked against an independent
reference: each source model loaded with stock transformers runs its own sample lines, its
layers' inputs are caught with forward hooks, and the expected weights are computed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import make_fixtures
from runs import fails_with, run_cli
from pacer_stream.methods.regmean import RegMeanSum, gram, shrink
from pacer_stream.methods.vocabulary import merge_rows, row_weights, token_usage

VOCAB = " abcdefghijklmnopqrstuvwxyz"
LETTERS = ("abcdefgh", "ijklmnop", "aeiouxyz")  # each model's alphabet (a and e shared)


# -- the formulas, by hand ----------------------------------------------------------------

def test_token_usage_counts_real_tokens_inside_the_vocabulary():
    tokens = torch.tensor([[1, 2, 2, 0], [3, 9, 0, 0], [1, 1, 1, 1]])
    lengths = torch.tensor([3, 2, 4])
    model = torch.tensor([0, 0, 1])
    counts = token_usage(tokens, lengths, model, models=2, vocab=4)
    # padding (the zeros past each length) is not counted; id 9 is outside the vocabulary
    assert counts.tolist() == [[0, 1, 2, 1], [0, 4, 0, 0]]


def test_row_weights_by_hand():
    counts = torch.tensor([[3.0, 0.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    r = row_weights(counts, (1.0, 1.0))
    beta = 0.5 / 3  # half an occurrence at the mean sample size (4 and 2 tokens)
    f0, f1 = 3 / 4 + beta, 1 / 2 + beta
    assert r[:, 0].tolist() == pytest.approx([f0 / (f0 + f1), f1 / (f0 + f1)])
    assert r[:, 1].tolist() == pytest.approx([0.5, 0.5])  # no sample uses it: the mean
    g0, g1 = 1 / 4 + beta, 1 / 2 + beta  # used by both, relatively more by model 1
    assert r[:, 2].tolist() == pytest.approx([g0 / (g0 + g1), g1 / (g0 + g1)])
    weighted = row_weights(counts, (3.0, 1.0))
    assert weighted[:, 1].tolist() == pytest.approx([0.75, 0.25])  # model weights still count
    with pytest.raises(ValueError, match="at least one sample token"):
        row_weights(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64), (1.0, 1.0))


def test_merge_rows_is_the_row_weighted_sum():
    x = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    r = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]])
    assert merge_rows(x.clone(), r).tolist() == [[0, 1], [5, 6], [10, 11]]


def test_shrink_scales_off_diagonal_terms():
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=torch.float64)
    assert shrink(g, 0.5).tolist() == [[4.0, 1.0], [1.0, 9.0]]
    assert shrink(g, 0.0).tolist() == [[4.0, 0.0], [0.0, 9.0]]


def test_regmean_one_input_is_the_gram_weighted_mean():
    # in = 1: W = (g1 W1 + g2 W2) / (g1 + g2) exactly (the ridge scales with each g)
    total = RegMeanSum()
    total.add(torch.tensor([[1.0]], dtype=torch.float64), 1.0, {"w": torch.tensor([[2.0]])})
    total.add(torch.tensor([[3.0]], dtype=torch.float64), 1.0, {"w": torch.tensor([[6.0]])})
    assert total.solve()["w"].item() == pytest.approx((1 * 2 + 3 * 6) / 4)


def test_regmean_minimises_the_summed_output_error():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 5, generator=gen) * torch.tensor([1, 2, 3, 1, 0.5]) for _ in range(3)]
    ws = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    total = RegMeanSum()
    for x, w in zip(xs, ws):
        total.add(gram(x) / len(x), 1.0, {"w": w})
    solved = total.solve()["w"]

    def error(w):
        return sum(((x.double() @ (w.double() - wk.double()).T) ** 2).sum() / len(x)
                   for x, wk in zip(xs, ws))

    assert error(solved) < error(sum(ws) / 3)
    probe = torch.randn(4, 5, generator=gen, dtype=torch.float64) * 1e-3
    assert error(solved) <= error(solved + probe) and error(solved) <= error(solved - probe)
    # equal Gram matrices: the plain mean
    same = RegMeanSum()
    for w in ws:
        same.add(gram(xs[0]) / 40, 1.0, {"w": w})
    assert torch.allclose(same.solve()["w"], sum(w.double() for w in ws) / 3, atol=1e-6)


def test_regmean_an_input_no_sample_excites_merges_as_the_mean():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # feature 1 is never excited
    total = RegMeanSum()
    for w in (torch.tensor([[1.0, 4.0]]), torch.tensor([[3.0, 8.0]])):
        total.add(gram(x), 1.0, {"w": w})
    assert total.solve()["w"].tolist()[0] == pytest.approx([2.0, 6.0])


# -- a run, against transformers ------------------------------------------------------------

def char_tokenizer() -> str:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(VOCAB)}, merges=[])).to_str()


@pytest.fixture(scope="module")
def models(tmp_path_factory, fixtures_dir) -> Path:
    """Three "conflict" fixture models with a character tokenizer; sample lines of varied
    length (so batches are padded) in each model's own letters."""
    root = tmp_path_factory.mktemp("regmean-models")
    tokenizer = char_tokenizer()
    gen = torch.Generator().manual_seed(1)
    for k in (1, 2, 3):
        shutil.copytree(fixtures_dir / "conflict" / f"m{k}", root / f"m{k}")
        (root / f"m{k}" / "tokenizer.json").write_text(tokenizer)
        letters = LETTERS[k - 1]
        lines = ["".join(letters[i] for i in torch.randint(len(letters), (int(n),),
                                                            generator=gen).tolist())
                 for n in torch.randint(4, 16, (10,), generator=gen)]
        (root / f"samples{k}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_plan(tmp: Path, models: Path, extra: str = "", samples: bool = True) -> Path:
    refs = [str(models / f"m{k}") for k in (1, 2, 3)]
    files = ", ".join(f"{r}: {models}/samples{k}.txt" for k, r in enumerate(refs, 1))
    given = f"router_samples: {{{files}}}, " if samples else ""
    plan = tmp / "plan.yaml"
    plan.write_text(f"models: [{', '.join(refs)}]\nmethod: pacer\nseed: 0\n"
                    f"pacer: {{{given}enable_moe_upcycle: false, align: false{extra}}}\n"
                    f"output: {{path: {tmp / 'out'}, shard_size: 200KB}}\n")
    return plan


@pytest.fixture(scope="module")
def dense(tmp_path_factory, models) -> Path:
    tmp = tmp_path_factory.mktemp("regmean-run")
    proc = run_cli(write_plan(tmp, models))
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


def own_inputs(models: Path, k: int, modules: list[str]) -> tuple[dict[str, torch.Tensor], list]:
    """Model k (transformers) on its own sample lines: the inputs each module saw, real
    tokens only, and the token ids of every line."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(models / f"m{k}",
                                                              dtype=torch.float32).eval()
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    hooks = [model.get_submodule(m).register_forward_pre_hook(
        lambda mod, args, m=m: seen[m].append(args[0].reshape(-1, args[0].shape[-1])))
        for m in modules]
    ids = [[VOCAB.index(c) for c in line]
           for line in (models / f"samples{k}.txt").read_text().split()]
    with torch.no_grad():
        for line in ids:  # one line at a time: no padding anywhere
            model(input_ids=torch.tensor([line]))
    for h in hooks:
        h.remove()
    weights = {m: model.get_submodule(m).weight.detach() for m in modules}
    return {m: torch.cat(v) for m, v in seen.items()}, weights, ids


def test_linear_layers_are_the_regmean_of_the_models_own_inputs(dense, models):
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj",
               "model.layers.2.mlp.down_proj", "model.layers.3.mlp.up_proj"]
    total = {m: RegMeanSum() for m in modules}
    for k in (1, 2, 3):
        inputs, weights, _ = own_inputs(models, k, modules)
        for m in modules:
            x = inputs[m]
            total[m].add(shrink(gram(x) / len(x), 0.9), 1.0, {m: weights[m]})
    written = make_fixtures.file_state(dense)
    for m in modules:
        expected = total[m].solve()[m]
        got = written[m + ".weight"].double()
        assert torch.allclose(got, expected, atol=2e-3 * expected.abs().max()), m
    report = json.loads((dense / "pacer_report.json").read_text())
    assert report["vocabulary"]["rule"] == "usage"


def test_token_rows_are_weighted_by_each_models_use(dense, models):
    import transformers

    counts = torch.zeros(3, len(VOCAB), dtype=torch.float64)
    tables = {}
    for k in (1, 2, 3):
        _, _, ids = own_inputs(models, k, [])
        for line in ids:
            counts[k - 1] += torch.bincount(torch.tensor(line), minlength=len(VOCAB)).double()
        model = transformers.AutoModelForCausalLM.from_pretrained(models / f"m{k}",
                                                                  dtype=torch.float32)
        tables[k] = model.get_input_embeddings().weight.detach()
    vocab_rows = tables[1].shape[0]
    counts = torch.nn.functional.pad(counts, (0, vocab_rows - len(VOCAB)))
    n = counts.sum(1, keepdim=True)
    share = counts / n + 0.5 / float(n.mean())
    r = share / share.sum(0, keepdim=True)
    expected = sum(r[k - 1][:, None] * tables[k].double() for k in (1, 2, 3))
    got = make_fixtures.file_state(dense)["model.embed_tokens.weight"].double()
    assert torch.allclose(got, expected, atol=1e-2 * expected.abs().max())
    # a letter only model 2 writes takes model 2's row almost whole
    j = VOCAB.index("j")
    assert (got[j] - tables[2][j]).abs().max() < (got[j] - tables[1][j]).abs().max() / 5


@pytest.mark.slow
def test_mean_rules_give_the_plain_average(models, tmp_path):
    proc = run_cli(write_plan(tmp_path, models, ", dense: mean, vocabulary: mean"))
    assert proc.returncode == 0, proc.stderr
    written = make_fixtures.file_state(tmp_path / "out")
    sources = [make_fixtures.file_state(models / f"m{k}") for k in (1, 2, 3)]
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        mean = sum(s[name].float() for s in sources) / 3
        assert torch.allclose(written[name].float(), mean, atol=1e-2 * mean.abs().max()), name


def _refused(tmp: Path, plan: Path, *needles: str) -> None:
    from click.testing import CliRunner

    from pacer_stream.cli import main

    fails_with(CliRunner().invoke(main, ["run", str(plan), "--quiet"]), *needles)
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("extra, samples, needle", [
    (", dense: regmean", False, "regmean needs samples"),
    (", vocabulary: usage", False, "usage needs samples"),
    (", dense: ridge", True, "pacer.dense: expected one of regmean, mean"),
    (", vocabulary: most", True, "pacer.vocabulary: expected one of usage, mean"),
    (", regmean_alpha: 1.5", True, "regmean_alpha must be in [0, 1]"),
])
def test_bad_dense_rules_are_refused_by_name(extra, samples, needle, models, tmp_path):
    _refused(tmp_path, write_plan(tmp_path, models, extra, samples), needle)


def test_a_budget_too_small_for_the_regmean_pass_is_refused(models, tmp_path):
    from click.testing import CliRunner

    from pacer_stream.cli import main

    big = tmp_path / "models"
    shutil.copytree(models, big)
    for k in (1, 2, 3):  # 400 lines of 1000 letters a model: ~1.2 GB of hidden states
        (big / f"samples{k}.txt").write_text((LETTERS[k - 1] * 125 + "\n") * 400)
    result = CliRunner().invoke(main, ["run", str(write_plan(tmp_path, big)), "--quiet",
                                       "--max-memory", "600MB"])
    fails_with(result, "the RegMean pass needs", "pacer.dense: mean")
    assert not (tmp_path / "out").exists()
