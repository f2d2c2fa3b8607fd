"""CheckpointIndex: headers parsed by hand agree with the safetensors library; lazy reads."""

from __future__ import annotations

import torch
from safetensors import safe_open

from pacer_stream.io.reader import CheckpointIndex
from pacer_stream.io.sources import LocalFolder


def test_index_matches_safetensors_and_reads_rows(fixtures_dir):
    for family in ("llama", "mistral"):  # sharded fp32, single-file bf16
        folder = fixtures_dir / family / "ft1"
        index = CheckpointIndex.open(LocalFolder(folder))
        seen = set()
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    seen.add(name)
                    expected = f.get_tensor(name)
                    assert index.tensors[name].file == file.name
                    got = index.read(name)
                    assert got.dtype == expected.dtype and torch.equal(got, expected)
                    if expected.dim() >= 1 and expected.shape[0] > 3:
                        assert torch.equal(index.read(name, rows=(1, 3)), expected[1:3])
        assert seen == set(index.tensors)


def test_reads_are_positioned_not_whole_file(fixtures_dir, monkeypatch):
    from pacer_stream.io import sources

    sizes = []
    original = sources.LocalFile.read_into  # tensor data is read straight into its buffer
    monkeypatch.setattr(sources.LocalFile, "read_into",
                        lambda self, off, buf: sizes.append(len(buf)) or original(self, off, buf))
    index = CheckpointIndex.open(LocalFolder(fixtures_dir / "qwen2" / "ft1"))
    sizes.clear()
    info = index.tensors["model.layers.0.mlp.up_proj.weight"]
    index.read(info.name, rows=(0, 2))
    assert sizes == [2 * info.shape[1] * 4]
