"""The safetensors header, parsed and validated by hand.

A safetensors file is ``[u64 little-endian header length N][N bytes of JSON][data]``.
The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
with offsets relative to the start of the data region. We never trust it: every
entry is checked against the file's real size before a single byte of data is
read, so a corrupt or hostile file fails with a message instead of a crash or an
out-of-bounds read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Protocol

from ..errors import PacerError

# safetensors dtype string -> bytes per element, and the torch dtype's name. The torch
# dtypes themselves (DTYPES, DTYPE_NAMES) are built on first use, so that reading headers
# (`pacer-stream plan`) never imports torch.
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def __getattr__(name: str):
    """``DTYPES`` (name -> (torch dtype, bytes per element)) and ``DTYPE_NAMES`` (torch
    dtype -> name), made when first asked for."""
    if name not in ("DTYPES", "DTYPE_NAMES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    dtypes = {key: (getattr(torch, TORCH_NAMES[key]), size) for key, size in ITEMSIZE.items()}
    globals().update(DTYPES=dtypes, DTYPE_NAMES={d: key for key, (d, _) in dtypes.items()})
    return globals()[name]


# A real header is kilobytes to a few MB; refuse absurd lengths before allocating.
MAX_HEADER_BYTES = 100 * 2**20


class ByteSource(Protocol):
    """Random access to the bytes of one file, local or remote."""

    name: str

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    name: str
    file: str  # path relative to the model folder, e.g. "model-00001-of-00002.safetensors"
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class FileHeader:
    """A validated header: tensors by name, the metadata, the file's size."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int
    data_start: int


def read_header(source: ByteSource, file: str) -> FileHeader:
    """Read and validate the header of one safetensors file.

    ``file`` is the name recorded in each :class:`TensorInfo` (relative to the
    model folder). Raises :class:`PacerError` naming the file and the fault.
    """
    size = source.size()
    where = source.name
    if size < 8:
        raise PacerError(f"{where}: truncated safetensors file ({size} bytes, no header)")
    (header_len,) = struct.unpack("<Q", source.read(0, 8))
    if header_len > size - 8:
        raise PacerError(
            f"{where}: header length {header_len} is larger than the file ({size} bytes); "
            "the file is truncated or not safetensors"
        )
    if header_len > MAX_HEADER_BYTES:
        raise PacerError(f"{where}: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
    try:
        raw = json.loads(source.read(8, header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PacerError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise PacerError(f"{where}: header is not a JSON object")

    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise PacerError(f"{where}: __metadata__ must be a JSON object")
    data_start = 8 + header_len
    tensors = {
        name: _tensor_info(where, file, name, entry, data_start, size)
        for name, entry in raw.items()
    }
    _check_no_overlap(where, tensors)
    return FileHeader(tensors, {str(k): str(v) for k, v in metadata.items()}, size, data_start)


def _tensor_info(where: str, file: str, name: str, entry: object, data_start: int,
                 file_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise PacerError(f"{where}: tensor {name!r}: header entry is not an object")
    dtype = entry.get("dtype")
    if dtype not in ITEMSIZE:
        raise PacerError(
            f"{where}: tensor {name!r} has unknown dtype {dtype!r} "
            f"(known: {', '.join(ITEMSIZE)})"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise PacerError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise PacerError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if end > file_size:
        raise PacerError(
            f"{where}: tensor {name!r} byte range [{begin}, {end}) lies outside the file "
            f"({file_size} bytes); the file is truncated or corrupt"
        )
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise PacerError(
            f"{where}: tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {expected}"
        )
    return TensorInfo(name, file, dtype, tuple(shape), begin, end)


def _check_no_overlap(where: str, tensors: dict[str, TensorInfo]) -> None:
    ordered = sorted(tensors.values(), key=lambda t: (t.begin, t.end))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.begin < prev.end:
            raise PacerError(
                f"{where}: tensors {prev.name!r} and {cur.name!r} have overlapping byte ranges"
            )
