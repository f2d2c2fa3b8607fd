"""The merge-quality benchmark (benchmarks/quality): its metric code, and a CI-sized run.

The unit tests check bits per byte, retention and parameter counts on hand-computed values,
the byte tokenizer and the text preparation. The slow test runs the benchmark end to end with
the `tiny` profile (a ~30k-parameter byte-level Llama trained for seconds on real text found
on this machine, merged by `pacer-stream` processes) and asserts the ranking that matters:
PACER with every MLP upcycled and the few-shot router keeps more of the experts' gains than
a plain average.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import bytetok  # noqa: E402
import metrics  # noqa: E402
import textdata  # noqa: E402


def load_module(name: str):
    """benchmarks/quality/<name>.py under a name no other test module uses."""
    spec = importlib.util.spec_from_file_location(f"quality_{name}", QUALITY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_run_module():
    return load_module("run")


# -----------------------------------------------------------------------------
# metrics on hand-computed values

class UniformLM(torch.nn.Module):
    """Logits all zero: every one of the 257 tokens has probability 1/257."""

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, bytetok.VOCAB_SIZE))


class SureLM(torch.nn.Module):
    """Puts probability ~1 on the byte 'a' everywhere: 'aaaa' costs ~0 bits."""

    def forward(self, input_ids, attention_mask=None):
        logits = torch.full((*input_ids.shape, bytetok.VOCAB_SIZE), -1e4)
        logits[..., ord("a")] = 0.0
        return SimpleNamespace(logits=logits)


def test_bits_per_byte_from_nll():
    assert metrics.bits_per_byte_from_nll(8 * math.log(2), 8) == pytest.approx(1.0)
    assert metrics.bits_per_byte_from_nll(3 * math.log(4), 2) == pytest.approx(3.0)


def test_bits_per_byte_of_a_uniform_model_is_log2_of_the_vocabulary():
    # lines of different lengths (padding in the batch) and a 2-byte character
    lines = ["ab", "a much longer line of text", "größe"]
    assert metrics.bits_per_byte(UniformLM(), lines) == pytest.approx(math.log2(257))


def test_bits_per_byte_counts_every_byte_once():
    # 'aaaa' is free, 'ab' pays for 'b' only (~1e4 nats); pooled over 6 bytes
    nats = metrics.line_nats(SureLM(), ["aaaa", "ab"])
    assert nats[0] == pytest.approx(0.0, abs=1e-3)
    assert nats[1] == pytest.approx(1e4, rel=1e-3)
    expected = (nats[0] + nats[1]) / math.log(2) / 6
    assert metrics.bits_per_byte(SureLM(), ["aaaa", "ab"]) == pytest.approx(expected)


def test_retention_bits_per_byte_lower_is_better():
    assert metrics.retention(base=2.0, merge=1.5, expert=1.0) == pytest.approx(0.5)
    assert metrics.retention(2.0, 1.0, 1.0) == pytest.approx(1.0)
    assert metrics.retention(2.0, 2.0, 1.0) == pytest.approx(0.0)
    assert metrics.retention(2.0, 2.5, 1.0) == pytest.approx(-0.5)  # worse than the base


def test_retention_accuracy_higher_is_better_same_formula():
    assert metrics.retention(base=0.2, merge=0.6, expert=1.0) == pytest.approx(0.5)
    assert metrics.retention(0.2, 0.1, 1.0) == pytest.approx(-0.125)


def test_retention_undefined_without_a_gain():
    assert math.isnan(metrics.retention(1.0, 0.5, 1.0))
    assert math.isnan(metrics.mean([0.5, float("nan")]))
    assert metrics.mean([0.25, 0.75]) == pytest.approx(0.5)


def test_checkpoint_params_counts_header_shapes(tmp_path):
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "m-1.safetensors"))
    save_file({"c": torch.zeros(2, 2, 2)}, str(tmp_path / "m-2.safetensors"))
    assert metrics.checkpoint_params(tmp_path) == 12 + 5 + 8


def test_accuracy():
    class Fixed(torch.nn.Module):
        def forward(self, pixel_values):
            logits = torch.zeros(len(pixel_values), 10)
            logits[:, 3] = 1.0
            return SimpleNamespace(logits=logits)

    import numpy as np
    x = np.zeros((4, 1, 8, 8), dtype=np.float32)
    assert metrics.accuracy(Fixed(), x, np.array([3, 3, 1, 3])) == pytest.approx(0.75)


# -----------------------------------------------------------------------------
# tokenizer and text preparation

def test_tokenizer_json_encodes_bytes(tmp_path):
    from tokenizers import Tokenizer

    bytetok.write_tokenizer(tmp_path)  # asserts the equality itself
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ("plain ASCII", "  leading spaces", "Größe", "изменяет", "日本", "a\tb"):
        assert tok.encode(text).ids == [bytetok.BOS, *text.encode("utf-8")]  # BOS, then bytes
    assert tok.token_to_id("<bos>") == bytetok.BOS


def test_chunks_join_lines_within_paragraphs():
    lines = ["one two", "three", "", "four   five", "x" * 30]
    assert textdata.chunks_of(lines, max_bytes=20, min_bytes=4) == [
        "one two three", "four five", "x" * 20, "x" * 10]
    # never more than max_bytes UTF-8 bytes, never a broken character
    for chunk in textdata.chunks_of(["ä" * 50], max_bytes=15, min_bytes=1):
        assert len(chunk.encode("utf-8")) <= 15 and "\ufffd" not in chunk


def test_strip_roff():
    lines = ['.\\" a comment', ".TH LS 1", ".SH NAME", "ls \\- list \\fBdirectory\\fR contents",
             ".PP", "gr\\(:o\\(sser"]
    assert textdata.strip_roff(lines) == ["", "NAME", "ls - list directory contents", "",
                                          "größer"]


def test_english_paragraphs_are_recognized():
    assert not textdata.not_english("The options which apply to the command are listed here")
    assert textdata.not_english("Diese Transportmethode ermöglicht die Verwendung von Depots")


# -----------------------------------------------------------------------------
# the benchmark, CI-sized

@pytest.mark.slow
def test_upcycled_pacer_with_few_shot_router_beats_linear(tmp_path):
    run = load_run_module()
    argv = ["--profile", "tiny", "--tasks", "text",
            "--rows", "linear,pacer-all-fewshot,pacer-dense-fewshot",
            "--work", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"),
            "--results", str(tmp_path / "results"), "--threads", "1"]
    try:
        result = run.main(argv, say=lambda *args: None)
    except SystemExit as exc:  # a domain's source files are not on this machine
        pytest.skip(str(exc))
    rows = {row["slug"]: row for row in result["tasks"]["text"]["rows"]}
    pacer, linear = rows["pacer-all-fewshot"], rows["linear"]
    assert linear["status"] == "ok", linear["status"]
    assert pacer["status"] == "ok", pacer["status"]
    assert pacer["facts"]["upcycled"], "every MLP block should be upcycled"
    assert pacer["mean_retention"] > linear["mean_retention"], (
        f"pacer (all MLPs, few-shot router) mean retention {pacer['mean_retention']:.3f} is not "
        f"above linear's {linear['mean_retention']:.3f}")
    assert (tmp_path / "results" / "quality-A.md").is_file()
    # ceiling.py merges the same models with PACER's sample rules itself (RegMean through
    # transformers hooks, token rows by usage): the engine's dense row must score the same
    ceiling = load_module("ceiling").main(["--profile", "tiny", "--cache", str(tmp_path / "cache"),
                                           "--results", str(tmp_path / "results")])
    engine = rows["pacer-dense-fewshot"]["mean_retention"]
    assert abs(ceiling["nothing"][1] - engine) < 0.01, (ceiling["nothing"], engine)
    assert ceiling["mlp"][1] >= ceiling["nothing"][1]  # each domain's own MLPs can only help
    # gate_bound.py re-runs the M = N merge and scores it under oracle routing: its exported
    # row is the run's own figure (same plan, same bytes); routing every token right keeps at
    # least what routing 30 % of them at random keeps; the linear bound is an accuracy
    bound = load_module("gate_bound").main(
        ["--profile", "tiny", "--cache", str(tmp_path / "cache"), "--work",
         str(tmp_path / "bound"), "--results", str(tmp_path / "results")])
    table = bound["table"]
    assert abs(table["exported gate"][1] - pacer["mean_retention"]) < 1e-9, (table, pacer)
    assert table["oracle 1.0"][1] >= table["oracle 0.7"][1]
    assert all(0.25 <= a <= 1.0 for a in bound["bound"].values()), bound["bound"]
    assert (tmp_path / "results" / "quality-gate-bound-A.md").is_file()
