"""A model's tensors, indexed from safetensors headers and read lazily.

:class:`CheckpointIndex` knows, for every tensor of one model, which file holds
it and at which byte range, without reading any tensor data. Data is read on
request: a whole tensor, or a range of rows (for tensors too large for the
memory budget). Reads are positioned reads of exactly the requested bytes, so
nothing proportional to a shard is ever resident.

>>> index = CheckpointIndex.open(parse_ref("./my-model"))          # doctest: +SKIP
>>> index.tensors["model.norm.weight"].shape                       # doctest: +SKIP
(4096,)
>>> index.read("model.layers.0.mlp.up_proj.weight", rows=(0, 128))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..errors import PacerError
from . import header
from .header import TensorInfo, read_header
from .sources import ModelFiles, ModelRef, check_relative, open_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

if TYPE_CHECKING:
    import torch


class CheckpointIndex:
    """Every tensor of one model: name -> :class:`TensorInfo`, plus its config."""

    def __init__(self, files: ModelFiles, tensors: dict[str, TensorInfo], config: dict) -> None:
        self.files = files
        self.tensors = tensors
        self.config = config
        self._sources: dict[str, object] = {}

    @property
    def label(self) -> str:
        return self.files.label

    @classmethod
    def open(cls, ref: ModelRef | ModelFiles) -> "CheckpointIndex":
        """Index a model from its folder or hub repository (headers only)."""
        files = ref if isinstance(ref, ModelFiles) else open_model(ref)
        shard_names = _shard_names(files)
        tensors: dict[str, TensorInfo] = {}
        expected = _index_map(files) if files.has(INDEX_FILE) else None
        for shard in shard_names:
            header = read_header(files.open(shard), shard)
            for name, info in header.tensors.items():
                if name in tensors:
                    raise PacerError(f"{files.label}: tensor {name!r} appears in two shards "
                                     f"({tensors[name].file} and {shard})")
                if expected is not None and expected.get(name) != shard:
                    raise PacerError(f"{files.label}/{shard}: tensor {name!r} is not listed for "
                                     f"this shard in {INDEX_FILE}")
                tensors[name] = info
        if expected is not None:
            missing = sorted(set(expected) - set(tensors))
            if missing:
                raise PacerError(f"{files.label}: {INDEX_FILE} lists {missing[0]!r} in "
                                 f"{expected[missing[0]]} but that shard does not contain it")
        return cls(files, tensors, _read_config(files))

    def source(self, file: str):
        if file not in self._sources:
            self._sources[file] = self.files.open(file)
        return self._sources[file]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read a tensor (or rows ``[start, stop)`` of its first axis) into memory."""
        info = self.tensors.get(name)
        if info is None:
            raise PacerError(f"{self.label}: no tensor named {name!r}")
        begin, shape = info.begin, info.shape
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise ValueError(f"row range {rows} outside {name} with shape {shape}")
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            begin, shape = info.begin + start * row_bytes, (stop - start, *shape[1:])
        import torch  # here, not at the top: indexing headers (`plan`) needs no torch

        torch_dtype, itemsize = header.DTYPES[info.dtype]
        length = itemsize
        for dim in shape:
            length *= dim
        source = self.source(info.file)
        if hasattr(source, "read_into"):  # a local file: read into the tensor's own memory
            data = bytearray(length)
            source.read_into(begin, data)
        else:
            data = bytearray(source.read(begin, length))
        if not data:
            return torch.empty(shape, dtype=torch_dtype)
        return torch.frombuffer(data, dtype=torch_dtype).reshape(shape)


def _shard_names(files: ModelFiles) -> list[str]:
    if files.has(INDEX_FILE):
        return sorted(set(_index_map(files).values()))
    if files.has(SINGLE_FILE):
        return [SINGLE_FILE]
    names = files.list()
    safetensors = [n for n in names if n.endswith(".safetensors")]
    if len(safetensors) == 1:
        return safetensors
    if safetensors:
        raise PacerError(f"{files.label}: several .safetensors files but no {INDEX_FILE} to say "
                         "which tensors they hold")
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise PacerError(
            f"{files.label}: only pickle checkpoints (.bin/.pt) found; pacer-stream never unpickles. "
            "Convert them to safetensors first, e.g. with transformers: "
            "AutoModel.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise PacerError(f"{files.label}: no safetensors checkpoint found ({SINGLE_FILE} or {INDEX_FILE})")


def _index_map(files: ModelFiles) -> dict[str, str]:
    try:
        index = json.loads(files.read_text(INDEX_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PacerError(f"{files.label}/{INDEX_FILE}: not valid JSON ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise PacerError(f"{files.label}/{INDEX_FILE}: missing or empty 'weight_map'")
    result = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise PacerError(f"{files.label}/{INDEX_FILE}: entry {name!r} is not a file name")
        result[name] = check_relative(f"{files.label}/{INDEX_FILE}", shard)
    return result


def _read_config(files: ModelFiles) -> dict:
    if not files.has("config.json"):
        raise PacerError(f"{files.label}: missing config.json (needed to know the architecture)")
    try:
        config = json.loads(files.read_text("config.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PacerError(f"{files.label}/config.json: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PacerError(f"{files.label}/config.json: not a JSON object")
    return config
