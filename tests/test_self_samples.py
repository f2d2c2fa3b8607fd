"""Data-free samples that each model writes itself (pacer_stream/self_samples.py).

Checked against transformers: the cached one-token steps of runtime/decoder_blocks.py give the
logits the model gives the whole prefix (with a sliding window shorter than the text too),
and the generated tokens are what sampling transformers' own next-token distribution with
the same generator draws. A data-free run uses them for the gate, RegMean and the token
rows and says so in its report (killed and resumed: tests/test_faults.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runs import run_cli
from pacer_stream.errors import PacerError
from pacer_stream.runtime.blocks import BlockModel
from pacer_stream.seeding import generator
from pacer_stream.self_samples import end_tokens, generate, sample_set, start_token

transformers = pytest.importorskip("transformers")


def hf_and_blocks(folder: Path, **overrides):
    from pacer_stream.io.reader import CheckpointIndex
    from pacer_stream.io.sources import LocalFolder

    config = {**json.loads((folder / "config.json").read_text()), **overrides}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, **overrides).eval()
    index = CheckpointIndex.open(LocalFolder(folder))
    return model, BlockModel.from_config(config), index.read


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"sliding_window": 3}),
                                               ("qwen3", {})])
def test_cached_steps_give_the_logits_of_the_whole_prefix(fixtures_dir, family, overrides):
    model, bm, get = hf_and_blocks(fixtures_dir / family / "anchor", **overrides)
    tokens = torch.randint(0, bm.config["vocab_size"], (2, 9),
                           generator=torch.Generator().manual_seed(0))
    cache: dict = {}
    with torch.no_grad():
        want = model(tokens).logits
        got = [bm.step(get, tokens[:, :4], cache)]  # a prefix at once, then one at a time
        got += [bm.step(get, tokens[:, t:t + 1], cache) for t in range(4, 9)]
    for i, t in enumerate(range(3, 9)):
        assert torch.allclose(got[i], want[:, t], atol=1e-5), (family, t)


def test_generated_tokens_are_samples_of_the_models_own_distribution(fixtures_dir):
    folder = fixtures_dir / "llama" / "anchor"
    model, bm, get = hf_and_blocks(folder)
    tokens, lengths = generate(bm, get, start=1, ends=set(), seed=7, k=2, sequences=4, length=6)
    assert tokens.shape == (4, 7) and lengths.tolist() == [7] * 4 and (tokens[:, 0] == 1).all()
    # the same draws from transformers' next-token distribution, same generator
    gen = generator(7, "self-samples", 2)
    want = torch.full((4, 1), 1)
    with torch.no_grad():
        for _ in range(6):
            p = torch.softmax(model(want).logits[:, -1].double(), -1)
            want = torch.cat([want, torch.multinomial(p, 1, generator=gen)], dim=1)
    assert torch.equal(tokens, want)
    again, _ = generate(bm, get, start=1, ends=set(), seed=7, k=2, sequences=4, length=6)
    assert torch.equal(again, tokens)  # fixed seeds: the same samples every run
    other, _ = generate(bm, get, start=1, ends=set(), seed=7, k=1, sequences=4, length=6)
    assert not torch.equal(other, tokens)  # each model its own stream


def test_a_sequence_ends_at_an_end_token(fixtures_dir):
    _, bm, get = hf_and_blocks(fixtures_dir / "llama" / "anchor")
    everything = set(range(bm.config["vocab_size"]))
    _, lengths = generate(bm, get, start=1, ends=everything, seed=0, k=0, sequences=3, length=5)
    assert lengths.tolist() == [2, 2, 2]  # the start and the end token


def test_start_and_end_tokens():
    assert start_token({}, lambda text: [5] if text == "" else []) == 5  # the tokenizer's BOS
    assert start_token({"bos_token_id": 3, "eos_token_id": 4}, lambda text: []) == 3
    assert start_token({"eos_token_id": [8, 9]}, None) == 8
    with pytest.raises(PacerError, match="no start token"):
        start_token({"bos_token_id": None}, None)
    assert end_tokens({"eos_token_id": [8, 9]}) == {8, 9}
    assert end_tokens({"eos_token_id": None}) == set()


def test_sample_set_holds_out_a_share_of_every_model():
    generated = [(torch.ones(5, 3, dtype=torch.long) * k, torch.full((5,), 3)) for k in range(2)]
    s = sample_set(generated, 0.2)
    assert s.model.tolist() == [0] * 5 + [1] * 5
    assert s.held_out.sum() == 2 and (s.fit ^ s.held_out).all()


# -- a data-free run -----------------------------------------------------------------------

def write_plan(tmp: Path, fixtures: Path, extra: str = "") -> Path:
    refs = [str(fixtures / "conflict" / f"m{k}") for k in (1, 2, 3)]
    plan = tmp / "plan.yaml"
    plan.write_text(f"models: [{', '.join(refs)}]\nmethod: pacer\nseed: 0\n"
                    f"pacer: {{interference_threshold: 0.35, router: data_free{extra}}}\n"
                    f"output: {{path: {tmp / 'out'}, shard_size: 200KB}}\n")
    return plan


@pytest.fixture(scope="module")
def data_free(tmp_path_factory, fixtures_dir) -> Path:
    tmp = tmp_path_factory.mktemp("data-free")
    proc = run_cli(write_plan(tmp, fixtures_dir))
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


def test_a_data_free_run_fits_everything_to_the_generated_samples(data_free):
    report = json.loads((data_free / "pacer_report.json").read_text())
    router = report["pacer"]["router"]
    assert router["kind"] == "data_free" and "samples each model generated" in router["note"]
    assert router["sequences"] == {"fit": 3 * 26, "held_out": 3 * 6}  # every 5th held out
    vocabulary = report["vocabulary"]
    assert vocabulary["rule"] == "usage" and len(vocabulary["sample_tokens"]) == 3
    assert all(n > 0 for n in vocabulary["sample_tokens"])
    assert report["dense"]["rule"] == "regmean" and report["dense"]["tensors"] > 0


@pytest.mark.slow
def test_dense_mean_keeps_the_data_free_gate_only(fixtures_dir, tmp_path):
    proc = run_cli(write_plan(tmp_path, fixtures_dir, ", dense: mean, vocabulary: mean"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())
    assert report["pacer"]["router"]["kind"] == "data_free"
    assert report["vocabulary"] is None and report["dense"]["rule"] == "mean"
