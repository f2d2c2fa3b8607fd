"""Where a model's files come from: a local folder or a Hugging Face hub repository.

A model reference is what the user writes in a plan: a path (``./ckpt``,
``/data/llama``) or a hub id (``org/name``, optionally ``org/name@revision``).
Both become a :class:`ModelFiles`, which can list the model's files, read small
text files, and open any file as a :class:`ByteSource` for ranged reads.

Hub models are read lazily: ``plan`` needs only ``config.json``, the shard index
and each shard's header, so a shard that is not in the local cache is read with
HTTP range requests instead of being downloaded. ``HF_HUB_OFFLINE=1`` restricts
everything to the local cache. Only safetensors, their index, config and tokenizer
files are ever fetched; nothing is unpickled and no remote code is run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import PacerError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[\w.\-/]+))?$")
# Files a merge may need from a hub repository (huggingface_hub allow_patterns syntax).
HUB_ALLOW_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model",
    "preprocessor_config.json", "chat_template*",
]


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: exactly one of ``path`` and ``repo_id`` is set.

    Two references are equal when they name the same model (``./ft1`` and its absolute
    path are one folder): ``text``, what the user wrote, is kept for messages only."""

    text: str = field(compare=False)
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.text


def parse_ref(text: str, base_dir: Path | None = None) -> ModelRef:
    """Turn what the user wrote into a :class:`ModelRef`.

    Relative paths are resolved against ``base_dir`` (the plan file's folder). A
    string that names no existing folder but looks like ``org/name[@rev]`` is a hub id.

    >>> parse_ref("Qwen/Qwen3-4B@main").repo_id
    'Qwen/Qwen3-4B'
    """
    if not isinstance(text, str) or not text.strip():
        raise PacerError(f"model reference must be a non-empty string, got {text!r}")
    text = text.strip()
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    explicit_path = text.startswith(("/", "./", "../", "~")) or os.sep in text.replace("/", "")
    if path.exists() or explicit_path:
        if not path.is_dir():
            raise PacerError(f"model {text!r}: no such folder {path}")
        return ModelRef(text, path=path.resolve())
    match = HUB_ID.match(text)
    if not match:
        raise PacerError(f"model {text!r}: not a local folder and not a hub id like org/name[@revision]")
    return ModelRef(text, repo_id=match["repo"], revision=match["rev"])


class LocalFile:
    """A :class:`ByteSource` over a local file (positioned reads, no mapping kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, offset: int, length: int) -> bytes:
        chunks, done = [], 0
        with open(self.path, "rb") as f:
            while done < length:  # one pread moves at most ~2 GiB on Linux
                chunk = os.pread(f.fileno(), length - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) != length:
            raise PacerError(f"{self.name}: short read at byte {offset}; the file is truncated")
        return data

    def read_into(self, offset: int, buffer: bytearray) -> None:
        """Fill ``buffer`` with the bytes at ``offset``, read straight into it (no copy)."""
        view, done = memoryview(buffer), 0
        with open(self.path, "rb") as f:
            while done < len(view):  # one preadv moves at most ~2 GiB on Linux
                got = os.preadv(f.fileno(), [view[done:]], offset + done)
                if not got:
                    raise PacerError(f"{self.name}: short read at byte {offset}; the file is "
                                     "truncated")
                done += got


class RemoteFile:
    """A :class:`ByteSource` over a file on the hub, read with HTTP range requests."""

    def __init__(self, repo_id: str, filename: str, revision: str | None) -> None:
        from huggingface_hub import hf_hub_url

        self.url = hf_hub_url(repo_id, filename, revision=revision)
        self.name = f"{repo_id}/{filename}"
        self._size: int | None = None

    def size(self) -> int:
        if self._size is None:
            self.read(0, 8)  # the Content-Range of any ranged reply carries the size
        assert self._size is not None
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        status, headers, body = http_range_get(self.url, offset, offset + length - 1)
        if status == 404:
            raise PacerError(f"{self.name}: not found on the hub")
        if status not in (200, 206):
            raise PacerError(f"{self.name}: hub request failed with HTTP {status}")
        total = headers.get("content-range", "").rpartition("/")[2]
        if total.isdigit():
            self._size = int(total)
        elif status == 200:  # server ignored the range and sent the whole file
            self._size = len(body)
            body = body[offset:offset + length]
        if len(body) != length:
            raise PacerError(f"{self.name}: short read at byte {offset}; the file is truncated")
        return body


def http_range_get(url: str, first: int, last: int) -> tuple[int, dict[str, str], bytes]:
    """One ranged GET through huggingface_hub's HTTP session (so tests can stub it)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    headers = {**build_hf_headers(), "Range": f"bytes={first}-{last}"}
    try:
        reply = get_session().get(url, headers=headers, follow_redirects=True)
    except Exception as exc:  # network errors come in many library-specific types
        raise PacerError(f"{url}: cannot reach the hub ({exc}); set HF_HUB_OFFLINE=1 to use the cache") from None
    return reply.status_code, {k.lower(): v for k, v in reply.headers.items()}, reply.content


class ModelFiles:
    """The files of one model. Subclasses: :class:`LocalFolder`, :class:`HubRepo`."""

    label: str

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def list(self) -> list[str]:
        raise NotImplementedError

    def open(self, name: str) -> "LocalFile | RemoteFile":
        raise NotImplementedError

    def read_text(self, name: str) -> str:
        source = self.open(name)
        return source.read(0, source.size()).decode("utf-8")

    def local_path(self, name: str) -> Path | None:
        """The file on local disk, if it is there (always for folders)."""
        return None


def check_relative(label: str, name: str) -> str:
    """Refuse names that could escape the model folder (``../x``, ``/etc/x``)."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if not name or posix.is_absolute() or ".." in posix.parts or re.match(r"^[A-Za-z]:", name):
        raise PacerError(f"{label}: refusing file {name!r}: it points outside the model folder")
    return str(posix)


class LocalFolder(ModelFiles):
    def __init__(self, root: Path, label: str | None = None) -> None:
        self.root = root
        self.label = label or str(root)

    def _path(self, name: str) -> Path:
        path = self.root / check_relative(self.label, name)
        if not path.resolve().is_relative_to(self.root.resolve()):  # symlinks out of the folder
            raise PacerError(f"{self.label}: refusing file {name!r}: it points outside the model folder")
        return path

    def has(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def open(self, name: str) -> LocalFile:
        path = self._path(name)
        if not path.is_file():
            raise PacerError(f"{self.label}: missing file {name}")
        return LocalFile(path)

    def local_path(self, name: str) -> Path | None:
        return self._path(name)


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


class HubRepo(ModelFiles):
    """A hub repository: cached files are read locally, the rest with range requests."""

    def __init__(self, repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
        self.label = repo_id + (f"@{revision}" if revision else "")
        self._listing: list[str] | None = None

    def local_path(self, name: str) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(
            self.repo_id, check_relative(self.label, name), cache_dir=self.cache_dir,
            revision=self.revision,
        )
        return Path(cached) if isinstance(cached, str) else None

    def list(self) -> list[str]:
        if self._listing is None:
            if hub_offline():
                self._listing = self._cached_listing()
            else:
                from huggingface_hub import HfApi

                try:
                    self._listing = sorted(HfApi().list_repo_files(self.repo_id, revision=self.revision))
                except Exception as exc:
                    raise PacerError(
                        f"{self.label}: cannot list the hub repository ({exc}); "
                        "check the id, or set HF_HUB_OFFLINE=1 to use the local cache"
                    ) from None
        return self._listing

    def _cached_listing(self) -> list[str]:
        from huggingface_hub import constants

        cache = Path(self.cache_dir or constants.HF_HUB_CACHE)
        repo_dir = cache / ("models--" + self.repo_id.replace("/", "--"))
        revision = self.revision or "main"
        ref = repo_dir / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        snapshot = repo_dir / "snapshots" / commit
        if not snapshot.is_dir():
            raise PacerError(
                f"{self.label}: not in the local hub cache ({cache}) and HF_HUB_OFFLINE is set; "
                "download it first or unset HF_HUB_OFFLINE"
            )
        return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())

    def has(self, name: str) -> bool:
        name = check_relative(self.label, name)
        if self.local_path(name) is not None:
            return True
        if hub_offline():
            return name in self.list()
        # One byte tells whether the file exists, without listing the repository. Only a 404
        # means it does not: a network error or a refusal must not pass for a missing file.
        status, _, _ = http_range_get(RemoteFile(self.repo_id, name, self.revision).url, 0, 0)
        if status in (200, 206, 416):  # 416: the file exists but is empty
            return True
        if status == 404:
            return False
        raise PacerError(
            f"{self.label}/{name}: hub request failed with HTTP {status}"
            + ("; the repository is private or gated, or does not exist: check the id and your "
               "token (HF_TOKEN)" if status in (401, 403) else "")
        )

    def open(self, name: str) -> "LocalFile | RemoteFile":
        name = check_relative(self.label, name)
        cached = self.local_path(name)
        if cached is not None:
            return LocalFile(cached)
        if hub_offline():
            raise PacerError(
                f"{self.label}: missing file {name}"
                + (" in the local hub cache (HF_HUB_OFFLINE is set)" if hub_offline() else "")
            )
        return RemoteFile(self.repo_id, name, self.revision)


def open_model(ref: ModelRef) -> ModelFiles:
    """The files behind a reference."""
    if ref.path is not None:
        return LocalFolder(ref.path, label=ref.text)
    assert ref.repo_id is not None
    return HubRepo(ref.repo_id, ref.revision)
