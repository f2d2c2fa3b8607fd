"""Merged outputs convert to GGUF with llama.cpp's own converter.

llama.cpp's convert_hf_to_gguf.py (as vendored in the llama-cpp-python 0.3.36 sdist) is
pure Python: we extract it, with its gguf-py, from the sdist, and convert tiny merges of a
fixture family with GPT-2's real vocabulary (the converter refuses a tokenizer whose
pre-tokenizer it does not recognise, so a toy vocabulary would not do). A dense merge must
become a llama.cpp ``qwen3`` model; a PACER merge with every block upcycled under
``output: {target: llama.cpp}`` a ``qwen3moe`` one with experts in every block. Running the
GGUF (the compiled binding) is benchmarks/bench_runtimes.py's job.

The sdist is $PACER_LLAMACPP_SDIST, or the copy bench_runtimes.py caches under
~/.cache/pacer-stream/; without it every test here skips.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import make_fixtures
from runs import run_cli

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    """benchmarks/bench_runtimes.py (the llama.cpp tooling), without benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location("bench_runtimes", ROOT / "benchmarks" /
                                                  "bench_runtimes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_runtimes = load_bench()
pytestmark = pytest.mark.slow  # ~40 s: the sdist is read, two merges, two conversions

FAMILY = "qwen3"
LAYERS = make_fixtures.GPT2_LAYERS
EXPERTS = 3  # one per fine-tune
# The GGUF tensors of a qwen3 model: three outside the blocks, then per block the attention
# and norms, and the MLP as three dense tensors or a router and three stacked expert tensors.
OUTER = ("token_embd", "output_norm", "output")
ATTENTION = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
             "attn_k_norm", "ffn_norm")
DENSE_MLP = ("ffn_gate", "ffn_up", "ffn_down")
MOE_MLP = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
SENTENCEPIECE_STANDIN = '''"""Stand-in for sentencepiece (tests/test_runtimes.py): convert_hf_to_gguf.py
imports it before it looks for tokenizer.model, which our fixtures do not have; nothing else
uses it."""


class SentencePieceProcessor:
    def __init__(self, *args, **kwargs):
        raise ImportError("sentencepiece stand-in: install sentencepiece for a tokenizer.model")
'''


def expected_names(mlp: tuple[str, ...]) -> set[str]:
    return {f"{n}.weight" for n in OUTER} | {f"blk.{i}.{n}.weight" for i in range(LAYERS)
                                               for n in ATTENTION + mlp}


@pytest.fixture(scope="module")
def converter(tmp_path_factory) -> Path:
    sdist = bench_runtimes.find_sdist()
    if sdist is None:
        cached = bench_runtimes.CACHE / bench_runtimes.SDIST
        pytest.skip(f"no llama-cpp-python sdist: set PACER_LLAMACPP_SDIST or run "
                    f"benchmarks/bench_runtimes.py once (it caches {cached})")
    return bench_runtimes.extract_converter(sdist, tmp_path_factory.mktemp("llamacpp") / "llama.cpp")


@pytest.fixture(scope="module")
def extras(tmp_path_factory) -> Path | None:
    """Where sentencepiece comes from: this Python, the benchmark's cache, or a stand-in."""
    if importlib.util.find_spec("sentencepiece"):
        return None
    cached = bench_runtimes.CACHE / "convert-deps"
    if any(cached.glob("sentencepiece*")):
        return cached
    folder = tmp_path_factory.mktemp("convert-deps")
    (folder / "sentencepiece.py").write_text(SENTENCEPIECE_STANDIN)
    return folder


@pytest.fixture(scope="module")
def family(tmp_path_factory, converter) -> Path:
    vocab = make_fixtures.gpt2_vocab(converter / "models" / "ggml-vocab-gpt-2.gguf")
    return make_fixtures.make_gpt2_family(FAMILY, tmp_path_factory.mktemp("gpt2"), vocab)


def write_plan(tmp: Path, family: Path, name: str, body: str, output: str = "") -> Path:
    models = ", ".join(str(family / f"ft{k}") for k in (1, 2, 3))
    plan = tmp / f"{name}.yaml"
    plan.write_text(f"models: [{models}]\nseed: 0\n{body}output: {{path: {tmp / name}{output}}}\n")
    return plan


def convert(converter: Path, extras: Path | None, folder: Path):
    """convert_hf_to_gguf.py --outtype f32 on folder; the GGUF's reader."""
    out = folder.with_suffix(".gguf")
    proc = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(folder),
                           "--outfile", str(out), "--outtype", "f32"], capture_output=True,
                          text=True, env=bench_runtimes.convert_env(converter, extras))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return bench_runtimes.gguf_module(converter).GGUFReader(str(out))


def value(reader, key: str):
    return reader.fields[key].contents()


def test_the_fixture_tokenizer_is_gpt2s(family, converter):
    """llama.cpp's own test texts for this vocabulary encode to its expected ids."""
    vocab_file = converter / "models" / "ggml-vocab-gpt-2.gguf"
    assert make_fixtures.gpt2_tokenizer_mismatches(family / "anchor", vocab_file) == []
    config = json.loads((family / "anchor" / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["eos_token_id"] == 50256


def test_dense_merge_converts_to_a_qwen3_gguf(family, converter, extras, tmp_path):
    proc = run_cli(write_plan(tmp_path, family, "dense", "method: linear\n"))
    assert proc.returncode == 0, proc.stderr
    reader = convert(converter, extras, tmp_path / "dense")
    assert value(reader, "general.architecture") == "qwen3"
    assert value(reader, "tokenizer.ggml.pre") == "gpt-2"  # the converter knew the tokenizer
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 50257
    names = [t.name for t in reader.tensors]
    assert len(names) == len(OUTER) + LAYERS * (len(ATTENTION) + len(DENSE_MLP))
    assert set(names) == expected_names(DENSE_MLP)


def test_full_moe_for_llamacpp_converts_with_experts_in_every_block(family, converter, extras,
                                                                     tmp_path):
    lines = {1: "the cat sat on the mat and looked at the dog",
             2: "prices rose in the market as traders sold their shares",
             3: "the function returns a sorted list of the keys it found"}
    samples = {}
    for k, text in lines.items():
        (tmp_path / f"samples{k}.txt").write_text("".join(f"{text} {i}\n" for i in range(12)))
        samples[str(family / f"ft{k}")] = str(tmp_path / f"samples{k}.txt")
    pacer = json.dumps({"interference_threshold": 0.0, "top_k_experts": 2,
                        "router_samples": samples})
    plan = write_plan(tmp_path, family, "moe", f"method: pacer\npacer: {pacer}\n",
                      ", target: llama.cpp")
    checked = subprocess.run([sys.executable, "-m", "pacer_stream", "plan", str(plan)],
                             capture_output=True, text=True)
    if checked.returncode != 0 and bench_runtimes.target_refused(checked.stderr):
        pytest.skip(f"output.target is not in this version: {checked.stderr.strip()}")
    proc = run_cli(plan)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] == EXPERTS
    assert not config.get("mlp_only_layers")  # llama.cpp wants a router in every block
    report = json.loads((tmp_path / "moe" / "pacer_report.json").read_text())["pacer"]
    assert [b["layer"] for b in report["blocks"] if b["upcycled"]] == list(range(LAYERS))
    reader = convert(converter, extras, tmp_path / "moe")
    assert value(reader, "general.architecture") == "qwen3moe"
    assert value(reader, "qwen3moe.expert_count") == EXPERTS
    assert value(reader, "qwen3moe.expert_used_count") == 2
    names = [t.name for t in reader.tensors]
    assert len(names) == len(OUTER) + LAYERS * (len(ATTENTION) + len(MOE_MLP))
    assert set(names) == expected_names(MOE_MLP)
    experts = {t.name: [int(d) for d in t.shape] for t in reader.tensors if "_exps" in t.name}
    assert len(experts) == 3 * LAYERS  # GGUF shapes are reversed: experts last
    assert all(shape[-1] == EXPERTS for shape in experts.values()), experts
