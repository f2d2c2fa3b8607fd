"""Every user-facing failure: one line naming the problem, exit status 2, inputs untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pacer_stream.cli import main


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def models(tmp_path, fixtures_dir) -> Path:
    """Private copies of three tiny qwen2 models (single-file) and two llama (sharded)."""
    for family, names in (("qwen2", ["ft1", "ft2", "perm"]), ("llama", ["ft1", "ft2"])):
        for name in names:
            shutil.copytree(fixtures_dir / family / name, tmp_path / family / name)
    return tmp_path


def _plan(tmp: Path, models: list[str], extra: str = "") -> Path:
    plan = tmp / "plan.yaml"
    plan.write_text("models:\n" + "".join(f"  - {m}\n" for m in models) + extra)
    return plan


def _fails(plan: Path, *needles: str, root: Path | None = None) -> str:
    before = _digest(root) if root else None
    result = CliRunner().invoke(main, ["plan", str(plan), "--json"])
    message = result.stderr if hasattr(result, "stderr") else result.output
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pacer-stream: error: "), message
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output
    if root:
        assert _digest(root) == before  # nothing was modified or left behind
    return lines[0]


def _rewrite_header(file: Path, edit) -> None:
    """Apply ``edit(header_dict)`` to a safetensors header, keeping the data bytes."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def test_missing_shard_file(models):
    shard = sorted((models / "llama/ft2").glob("model-0000*.safetensors"))[1]
    shard.unlink()
    _fails(_plan(models, ["llama/ft1", "llama/ft2"]), "missing file", shard.name, root=models)


def test_truncated_shard(models):
    file = models / "qwen2/ft2/model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"]), "outside the file", "ft2", root=models)


def test_header_length_larger_than_file(models):
    file = models / "qwen2/ft2/model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"]), "header length", "larger than the file")


def test_tiny_file_without_header(models):
    (models / "qwen2/ft2/model.safetensors").write_bytes(b"\x01\x02")
    _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"]), "truncated")


def test_byte_range_outside_file(models):
    def edit(h):
        h[_first_tensor(h)]["data_offsets"][1] += 10**9
    _rewrite_header(models / "qwen2/ft2/model.safetensors", edit)
    _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"]), "outside the file")


def test_overlapping_byte_ranges(models):
    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        # make b start inside a while keeping its length (and so its dtype/shape) consistent
        length = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + length]
    _rewrite_header(models / "qwen2/ft2/model.safetensors", edit)
    _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"]), "overlapping")


def test_index_entry_escaping_the_model_folder(models):
    index_file = models / "llama/ft2/model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../ft1/" + index["weight_map"][name]
    index_file.write_text(json.dumps(index))
    _fails(_plan(models, ["llama/ft1", "llama/ft2"]), "outside the model folder", root=models)


def test_unknown_dtype(models):
    def edit(h):
        h[_first_tensor(h)]["dtype"] = "F12"
    _rewrite_header(models / "qwen2/ft2/model.safetensors", edit)
    _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"]), "unknown dtype", "F12")


def test_tensor_shapes_differ_across_models(models):
    from safetensors.torch import load_file, save_file

    file = models / "qwen2/ft2/model.safetensors"
    tensors = load_file(str(file))
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, str(file))
    _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"]), "model.norm.weight", "shape")


def test_different_architectures(models):
    _fails(_plan(models, ["qwen2/ft1", "llama/ft1"]), "different architectures", "qwen2", "llama")


def test_unknown_architecture_lists_supported(models):
    config = models / "qwen2/ft1/config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "gpt_neox"}))
    line = _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"]), "gpt_neox", "supported")
    for family in ("llama", "mistral", "qwen2", "qwen3", "bert", "vit"):
        assert family in line


def test_tensor_not_covered_by_spec(models):
    from safetensors.torch import load_file, save_file

    for name in ("ft1", "ft2"):
        file = models / f"qwen2/{name}/model.safetensors"
        tensors = load_file(str(file))
        tensors["model.layers.0.adapter.lora_A.weight"] = tensors["model.norm.weight"].clone()
        save_file(tensors, str(file))
    _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"]), "model.layers.0.adapter.lora_A.weight",
           "not covered")


def test_only_bin_files(models):
    folder = models / "binonly"
    folder.mkdir()
    shutil.copy(models / "qwen2/ft1/config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    _fails(_plan(models, ["qwen2/ft1", "binonly"]), "pickle", "safetensors")


def test_missing_model_folder(models):
    _fails(_plan(models, ["qwen2/ft1", "./nope"]), "no such folder")


def test_malformed_plan(models):
    plan = models / "plan.yaml"
    plan.write_text("models: [qwen2/ft1, qwen2/ft2\noutput: {path: x\n")
    _fails(plan, "malformed plan", "line")


def test_plan_that_is_not_a_mapping(models):
    plan = models / "plan.yaml"
    plan.write_text("- a\n- b\n")
    _fails(plan, "mapping")


@pytest.mark.parametrize("extra, needles", [
    ("methd: ties\n", ["'methd'", "did you mean 'method'"]),
    ("pacer:\n  interference_treshold: 0.3\n", ["interference_treshold",
                                                "did you mean 'interference_threshold'"]),
    ("output:\n  shard_sise: 1GB\n", ["shard_sise", "did you mean 'shard_size'"]),
    ("method: tiez\n", ["unknown method", "did you mean 'ties'"]),
])
def test_unknown_plan_key_suggests(models, extra, needles):
    _fails(_plan(models, ["qwen2/ft1", "qwen2/ft2"], extra), *needles)


def test_plan_needs_two_models(models):
    _fails(_plan(models, ["qwen2/ft1"]), "at least two")


def test_bad_memory_budget(models):
    result = CliRunner().invoke(main, ["plan", str(_plan(models, ["qwen2/ft1", "qwen2/ft2"])),
                                       "--max-memory", "lots"])
    assert result.exit_code == 2 and "--max-memory" in result.output


def test_console_script_one_line_and_exit_2(models):
    """The installed entry point (a real process) behaves like the in-process CLI."""
    plan = _plan(models, ["qwen2/ft1", "llama/ft1"])
    proc = subprocess.run([sys.executable, "-m", "pacer_stream", "plan", str(plan)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "different architectures" in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "pacer_stream", "--debug", "plan", str(plan)],
                           capture_output=True, text=True)
    assert "Traceback" in debug.stderr


def test_classifiers_with_different_label_sets(tmp_path, fixtures_dir):
    """Classifier heads over different labels are outputs, not mergeable weights."""
    for name in ("ft1", "ft2"):
        shutil.copytree(fixtures_dir / "vit" / name, tmp_path / "vit" / name)
    config_file = tmp_path / "vit/ft2/config.json"
    config = json.loads(config_file.read_text())
    config["id2label"] = {str(i): f"class-{i}" for i in range(5)}
    config["label2id"] = {f"class-{i}": i for i in range(5)}
    config_file.write_text(json.dumps(config))
    _fails(_plan(tmp_path, ["vit/ft1", "vit/ft2"]), "vit/ft2", "id2label", "label set",
           root=tmp_path / "vit")
