"""Writing the merged checkpoint: shards laid out up front, filled unit by unit.

The layout (which tensor goes to which shard, at which offset) is a pure function
of the output tensors' names, dtypes and shapes and the shard size, so every run
of the same plan writes the same bytes. Each shard is written to a hidden
``.<name>.partial`` file whose header is final from the start; tensors are
written at their offsets as units finish; the executor fsyncs a unit's shards
before it marks the unit done; a shard is renamed to its real name only when all
its tensors are written. A crash therefore leaves no file that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PacerError
from .header import DTYPES, DTYPE_NAMES

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    file: str
    tensors: list[OutTensor] = field(default_factory=list)
    metadata: dict = field(default_factory=lambda: {"format": "pt"})
    header: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # absolute offset of each tensor

    @property
    def partial(self) -> str:
        return f".{self.file}.partial"

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutTensor], shard_size: int, stem: str = "model",
                metadata: dict | None = None) -> list[Shard]:
    """Pack tensors, in order, into shards of at most ``shard_size`` bytes of data.

    A tensor larger than the shard size gets a shard of its own.
    """
    return _named(_packed(tensors, shard_size), stem, metadata)


def plan_unit_shards(units: list[list[OutTensor]], shard_size: int, stem: str = "model",
                     metadata: dict | None = None) -> list[Shard]:
    """Pack each unit's tensors into shards of their own (``--shard-layout unit``): no shard
    holds two units' tensors, so units written at once (the Ray backend's tasks) never
    write one file. A unit over ``shard_size`` gets several shards, as in :func:`plan_shards`.
    """
    groups = [group for tensors in units if tensors
              for group in _packed(tensors, shard_size)]
    return _named(groups or [[]], stem, metadata)


def _packed(tensors: list[OutTensor], shard_size: int) -> list[list[OutTensor]]:
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def _named(groups: list[list[OutTensor]], stem: str, metadata: dict | None) -> list[Shard]:
    count = len(groups)
    shards = []
    for i, group in enumerate(groups, start=1):
        name = f"{stem}.safetensors" if count == 1 else f"{stem}-{i:05d}-of-{count:05d}.safetensors"
        shards.append(_with_header(Shard(name, group, metadata or {"format": "pt"})))
    return shards


def _with_header(shard: Shard) -> Shard:
    entries: dict[str, object] = {"__metadata__": shard.metadata}
    offset = 0
    relative = {}
    for t in shard.tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        relative[t.name] = offset
        offset += t.nbytes
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)  # data starts 8-byte aligned
    shard.header = struct.pack("<Q", len(blob)) + blob
    shard.offsets = {name: len(shard.header) + off for name, off in relative.items()}
    return shard


class ShardWriter:
    """Writes tensors (or row ranges of them) into their shards' partial files."""

    def __init__(self, out_dir: Path, shards: list[Shard]) -> None:
        self.out_dir = out_dir
        self.shards = shards
        self.where = {t.name: (s, t) for s in shards for t in s.tensors}
        self._fds: dict[str, int] = {}
        self.dirty: set[str] = set()

    def _fd(self, shard: Shard) -> int:
        if shard.file not in self._fds:
            path = self.out_dir / shard.partial
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise PacerError(f"{path}: cannot create ({exc.strerror})") from None
            self._pwrite(fd, shard.header, 0, shard)
            # full size from the start: bytes never written read as zeros (a sparse
            # tensor's unselected entries), and the file is never shorter than its header says
            try:
                os.ftruncate(fd, shard.size)
            except OSError as exc:
                os.close(fd)
                raise PacerError(f"{path}: write failed (sizing it to {shard.size} bytes: "
                                 f"{exc.strerror}); free space or fix the disk, then re-run the "
                                 "same command to resume") from None
            self._fds[shard.file] = fd
        return self._fds[shard.file]

    def write(self, name: str, data: torch.Tensor, first_row: int = 0) -> None:
        """Write ``data`` (already in the output dtype) as rows from ``first_row`` on."""
        self.write_at(name, data, first_row * math.prod(self.where[name][1].shape[1:]))

    def write_at(self, name: str, data: torch.Tensor, first: int) -> None:
        """Write ``data`` at element ``first`` of tensor ``name`` in its flat (row-major)
        order: a part of a fused tensor (export/llamacpp.py), or rows of a whole one."""
        shard, info = self.where[name]
        if DTYPE_NAMES[data.dtype] != info.dtype:
            raise AssertionError(f"{name}: writing {data.dtype} into a {info.dtype} slot")
        raw = data.contiguous().reshape(-1).view(torch.uint8).numpy()
        start = first * DTYPES[info.dtype][1]
        if start + len(raw) > info.nbytes:  # would overwrite the next tensor
            raise AssertionError(f"{name}: {len(raw)} bytes from element {first} run past its "
                                 f"{info.nbytes}-byte slot")
        self._pwrite(self._fd(shard), memoryview(raw), shard.offsets[name] + start, shard)
        self.dirty.add(shard.file)

    def read(self, name: str) -> torch.Tensor:
        """A tensor written earlier (this run or an interrupted one), read back from its
        shard: how a later pass (the router calibration) runs the blocks already merged."""
        info = self.where[name][1]
        return self.read_at(name, 0, info.nbytes // DTYPES[info.dtype][1]).reshape(info.shape)

    def read_at(self, name: str, first: int, count: int) -> torch.Tensor:
        """``count`` elements of tensor ``name`` from element ``first`` on, flat."""
        shard, info = self.where[name]
        size = DTYPES[info.dtype][1]
        fd = self._fd(shard)
        data = bytearray(count * size)
        view, offset = memoryview(data), shard.offsets[name] + first * size
        while view:
            got = os.preadv(fd, [view], offset)
            if got == 0:
                raise PacerError(f"{self.out_dir / shard.partial}: ends inside tensor {name!r}")
            view, offset = view[got:], offset + got
        return torch.frombuffer(data, dtype=DTYPES[info.dtype][0]) if data else \
            torch.empty(0, dtype=DTYPES[info.dtype][0])

    def _pwrite(self, fd: int, data, offset: int, shard: Shard) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise PacerError(f"{self.out_dir / shard.partial}: write failed ({exc.strerror}); "
                             "free space or fix the disk, then re-run the same command to "
                             "resume") from None

    def sync(self) -> None:
        """fsync every shard written since the last sync."""
        for file in sorted(self.dirty):
            try:
                os.fsync(self._fds[file])
            except OSError as exc:
                raise PacerError(f"{self.out_dir / file}: fsync failed ({exc.strerror})") from None
        self.dirty.clear()

    def finish(self, shard: Shard) -> None:
        """Rename a fully written shard to its real name (atomic)."""
        fd = self._fds.pop(shard.file, None)
        if fd is None:  # all its tensors were written by an earlier, interrupted run
            fd = os.open(self.out_dir / shard.partial, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size != shard.size:  # never rename a short (or long) file into place
                raise PacerError(f"{self.out_dir / shard.partial}: {size} bytes, but its header "
                                 f"describes {shard.size}; the shard is incomplete: start it "
                                 "over (a merge: re-run with --restart)")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.out_dir / shard.partial, self.out_dir / shard.file)
        fsync_dir(self.out_dir)

    def finish_all(self) -> None:
        """Rename every shard still under its partial name (a resumed run may have renamed
        some already), then check them all against their headers (:func:`verify_shards`)."""
        for shard in self.shards:
            if (self.out_dir / shard.partial).exists():
                self.finish(shard)
        verify_shards(self.out_dir, self.shards)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def write_index(self) -> None:
        if len(self.shards) == 1:
            return
        index = {
            "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s.tensors)},
            "weight_map": {t.name: s.file for s in self.shards for t in s.tensors},
        }
        write_atomic(self.out_dir / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")


def verify_shards(folder: Path, shards: list[Shard]) -> None:
    """Check every finished shard on disk: its header is the planned one, its size whole.

    Run before a run is marked complete, so a short or foreign file is never reported
    as a finished output. Raises :class:`PacerError` naming the first bad file.
    """
    for shard in shards:
        path = Path(folder) / shard.file
        try:
            with open(path, "rb") as f:
                head = f.read(len(shard.header))
                size = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise PacerError(f"{path}: cannot read the finished shard ({exc.strerror}); "
                             "start it over (a merge: re-run with --restart)") from None
        if head != shard.header:
            raise PacerError(f"{path}: header differs from the planned one; the file was "
                             "changed or is not this run's: start it over (a merge: re-run "
                             "with --restart)")
        if size != shard.size:
            raise PacerError(f"{path}: {size} bytes, but its header describes {shard.size}; "
                             "the shard is incomplete: start it over (a merge: re-run with "
                             "--restart)")


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a small file via a temporary name and rename, so it is whole or absent.

    The folder is fsynced too: the rename is on disk before the next file is written,
    so files written in order (config.json last) reach the disk in that order.
    """
    tmp = path.with_name(f".{path.name}.partial")
    data = text.encode() if isinstance(text, str) else text
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
