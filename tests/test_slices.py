"""Slices (pacer_stream/slices.py): outputs assembled from layer ranges of the inputs,
against plain references built tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pacer_stream.cli import main
from runs import digests, fails_with, min_budget, run_cli

transformers = pytest.importorskip("transformers")


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def moved(name: str, old: int, new: int) -> str:
    return name.replace(f".layers.{new}.", f".layers.{old}.")


def write(tmp: Path, text: str, name: str = "p.yaml") -> Path:
    plan = tmp / name
    plan.write_text(text)
    return plan


def test_passthrough_frankenmerge_stacks_the_layers(fixtures_dir, tmp_path):
    family = fixtures_dir / "llama"
    a, b = family / "ft1", family / "ft2"
    plan = write(tmp_path, f"""\
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [1, 2]}}]
  - sources: [{{model: {a}, layer_range: [0, 1]}}]
method: passthrough
output: {{path: {tmp_path / 'out'}}}
""")
    done = run_cli(plan)
    assert done.returncode == 0, done.stderr
    out, xa, xb = load_all(tmp_path / "out"), load_all(a), load_all(b)
    # output block i <- (model, block): 0 <- a.0, 1 <- a.1, 2 <- b.1, 3 <- a.0
    source = {0: (xa, 0), 1: (xa, 1), 2: (xb, 1), 3: (xa, 0)}
    for name, value in out.items():
        if ".layers." in name:
            i = int(name.split(".")[2])
            model, j = source[i]
            expected = model[moved(name, j, i)]
        elif name.startswith(("model.norm", "lm_head")):
            expected = xa[name]  # the last slice's model
        else:
            expected = xa[name]  # the first slice's
        assert torch.equal(value, expected), name
    assert len(out) == len(xa) + 2 * (len(xa) - 3) // 2  # 4 blocks instead of 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.num_hidden_layers == 4
    # the plan as run reads back to the same bytes
    again = write(tmp_path, (tmp_path / "out" / "pacer_plan.yaml").read_text().replace(
        str(tmp_path / "out"), str(tmp_path / "again")), "again.yaml")
    done = run_cli(again)
    assert done.returncode == 0, done.stderr
    assert digests(tmp_path / "out") == digests(tmp_path / "again")


def test_merged_slices_with_gradients_within_each_slice(fixtures_dir, tmp_path):
    """Each slice merges its sources at the same offset; t runs 0 -> 1 within a slice."""
    family = fixtures_dir / "llama"
    a, b = family / "ft1", family / "ft2"
    plan = write(tmp_path, f"""\
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2], weight: [1, 3]}}
      - {{model: {b}, layer_range: [0, 2]}}
  - sources:
      - {{model: {a}, layer_range: [1, 2]}}
      - {{model: {b}, layer_range: [0, 1], weight: 0.25}}
    parameters: {{weight: 0.5}}
method: linear
output: {{path: {tmp_path / 'out'}, dtype: float32}}
""")
    done = run_cli(plan)
    assert done.returncode == 0, done.stderr
    out, xa, xb = load_all(tmp_path / "out"), load_all(a), load_all(b)
    # block: (a's block, a's weight, b's block, b's weight), by hand
    blocks = {0: (0, 1.0, 0, 1.0), 1: (1, 3.0, 1, 1.0), 2: (1, 0.5, 0, 0.25)}
    for name, value in out.items():
        if ".layers." in name:
            i = int(name.split(".")[2])
            ja, wa, jb, wb = blocks[i]
            expected = (wa * xa[moved(name, ja, i)].float() + wb * xb[moved(name, jb, i)].float()
                        ) / (wa + wb)
        elif name.startswith(("model.norm", "lm_head")):  # the last slice: weights 0.5, 0.25
            expected = (0.5 * xa[name].float() + 0.25 * xb[name].float()) / 0.75
        else:  # embeddings: the first slice at t = 0: weights 1 and 1
            expected = (xa[name].float() + xb[name].float()) / 2
        assert torch.allclose(value, expected, atol=1e-6, rtol=1e-6), name


def test_a_sliced_merge_is_the_same_bytes_at_any_budget(fixtures_dir, tmp_path):
    family = fixtures_dir / "llama"
    text = f"""\
slices:
  - sources:
      - {{model: {family / 'ft1'}, layer_range: [0, 2]}}
      - {{model: {family / 'ft2'}, layer_range: [0, 2]}}
      - {{model: {family / 'anchor'}, layer_range: [0, 2]}}
  - sources:
      - {{model: {family / 'ft3'}, layer_range: [1, 2]}}
      - {{model: {family / 'ft1'}, layer_range: [0, 1]}}
      - {{model: {family / 'anchor'}, layer_range: [1, 2]}}
method: ties
base_model: {family / 'anchor'}
parameters: {{density: 0.5}}
output: {{path: OUT}}
"""
    whole = write(tmp_path, text.replace("OUT", str(tmp_path / "whole")), "whole.yaml")
    sliced = write(tmp_path, text.replace("OUT", str(tmp_path / "sliced")), "sliced.yaml")
    assert run_cli(whole).returncode == 0
    done = run_cli(sliced, "--max-memory", str(min_budget(sliced)))
    assert done.returncode == 0, done.stderr
    assert digests(tmp_path / "whole") == digests(tmp_path / "sliced")
    report = json.loads((tmp_path / "sliced" / "pacer_report.json").read_text())
    assert report["budget_bytes"] == min_budget(sliced)


@pytest.mark.parametrize("body, needle", [
    ("slices:\n  - sources: [{model: A, layer_range: [0, 2]}, {model: B, layer_range: [0, 2]}]\n"
     "  - sources: [{model: A, layer_range: [0, 2]}]\nmethod: linear\n",
     "same number of sources"),
    ("slices:\n  - sources: [{model: A, layer_range: [0, 3]}]\nmethod: passthrough\n",
     "outside the model's 2 layers"),
    ("slices:\n  - sources: [{model: A, layer_range: [0, 2]}, {model: B, layer_range: [0, 1]}]\n"
     "method: linear\n", "different numbers of layers"),
    ("slices:\n  - sources: [{model: A, layer_range: [0, 2]}, {model: B, layer_range: [0, 2]}]\n"
     "method: ties\nbase_model: C\n", "lists it exactly once"),
    ("slices:\n  - sources: [{model: A, layer_range: [0, 2]}, {model: B, layer_range: [0, 2]}]\n"
     "method: pacer\n", "slices with method pacer"),
    ("slices:\n  - sources: [{model: A, layer_range: [0, 2]}, {model: B, layer_range: [0, 2]}]\n"
     "method: linear\nalign: true\n", "slices with align"),
    ("slices:\n  - sources: [{model: A, layer_range: [2, 1]}]\nmethod: passthrough\n",
     "start < end"),
    ("models: [A, B]\nslices:\n  - sources: [{model: A, layer_range: [0, 2]}]\n"
     "method: passthrough\n", "not both"),
])
def test_bad_slices_are_refused_before_anything_is_written(body, needle, fixtures_dir, tmp_path):
    family = fixtures_dir / "llama"
    for letter, model in zip("ABC", ("ft1", "ft2", "ft3")):
        body = body.replace(f"model: {letter},", f"model: {family / model},").replace(
            f"base_model: {letter}\n", f"base_model: {family / model}\n").replace(
            f"[{letter}, ", f"[{family / model}, ").replace(f", {letter}]", f", {family / model}]")
    plan = write(tmp_path, body + f"output: {{path: {tmp_path / 'out'}}}\n")
    fails_with(CliRunner().invoke(main, ["run", str(plan), "--quiet"]), needle)
    assert not (tmp_path / "out").exists()
