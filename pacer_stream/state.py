"""RunState: what a run has finished, kept in a zarr store beside the output.

Everything that must survive the process lives here: the plan fingerprint, the
units that are done (with their statistics), and later the cross-unit
accumulators of alignment. A unit is marked done only after its shard bytes are
fsynced, and zarr writes each metadata document atomically (temporary file and
rename), so after a crash the store says exactly which units are safe to skip.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import zarr

from .errors import PacerError

STATE_DIR = ".pacer-state"
FORMAT = 1


def fingerprint(payload: dict) -> str:
    """sha256 of a canonical JSON document (plan + input headers + tool version)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class RunState:
    """The manifest of one run: fingerprint, finished units, completion."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        self.units: dict[str, dict] = dict(group.attrs.get("units", {}))

    @classmethod
    def open(cls, path: Path, fingerprint_: str, restart: bool = False) -> "RunState":
        """Open (resume) or create the state at ``path``.

        A state written for another plan or other inputs is refused unless
        ``restart`` is set, in which case it is wiped. A folder that holds anything
        but a pacer-stream state is never wiped, ``restart`` or not.
        """
        if is_foreign(path):
            raise PacerError(f"{path} exists and is not a pacer-stream run state; nothing was "
                             "changed: choose a new or empty folder for the state")
        if path.exists() and restart:
            shutil.rmtree(path)
        if path.exists():
            try:
                group = zarr.open_group(str(path), mode="r+")
                found, finished = group.attrs.get("fingerprint"), group.attrs.get("complete")
            except Exception:  # a store damaged beyond reading
                found, group, finished = None, None, False
            if found != fingerprint_:
                what = "a finished merge" if finished else "an unfinished run"
                raise PacerError(
                    f"{path.parent}: holds {what} of a different plan, different inputs or "
                    "another pacer-stream version; choose another output path, or re-run "
                    "with --restart to discard it and start over"
                )
            return cls(path, group)
        group = zarr.open_group(str(path), mode="w")
        group.attrs.update({"format": FORMAT, "fingerprint": fingerprint_, "units": {},
                            "complete": False})
        return cls(path, group)

    def check_inputs(self, identities: dict[str, dict]) -> None:
        """Record the input files' identities, or refuse a resume over changed inputs.

        Identities come from :func:`pacer_stream.inputs.file_identities`: size, mtime_ns
        and inode, and a sha256 when the first run was asked for one. A file whose
        stat changed but whose recorded sha256 still matches is accepted (copied or
        touched, same bytes) and its new stat recorded.
        """
        recorded = self.group.attrs.get("inputs")
        if recorded is None:
            self.group.attrs["inputs"] = identities
            return
        for name, now in identities.items():
            then = recorded.get(name)
            if then is None:
                raise PacerError(f"{name}: this input file is new since the run in "
                                 f"{self.path.parent} started; re-run with --restart to start "
                                 "over with the current inputs")
            if _same_file(then, now):
                continue
            if "sha256" in then and then["sha256"] == (now.get("sha256")
                                                        or _sha256(Path(now["path"]))):
                continue
            what = "finished merge" if self.complete else "interrupted run"
            raise PacerError(f"{name}: input file changed since the {what} in "
                             f"{self.path.parent} ({_change(then, now)}); restore it, or "
                             "re-run with --restart to merge the current inputs")
        gone = sorted(set(recorded) - set(identities))
        if gone:
            raise PacerError(f"{gone[0]}: input file is gone since the run in {self.path.parent} "
                             "started; restore it, or re-run with --restart")
        self.group.attrs["inputs"] = identities

    def is_done(self, unit: str) -> bool:
        return unit in self.units

    def mark_done(self, unit: str, record: dict[str, Any]) -> None:
        self.units[unit] = record
        self.group.attrs["units"] = self.units

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def mark_complete(self) -> None:
        self.group.attrs["complete"] = True


def run_state_attributes(path: Path) -> dict | None:
    """The attributes of the pacer-stream run state at ``path``, or None if it holds none."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(attrs, dict) and "fingerprint" in attrs and "format" in attrs:
        return attrs
    # killed between creating the group and writing its attributes: still ours
    return {} if attrs == {} and [p.name for p in path.iterdir()] == ["zarr.json"] else None


def is_run_state(path: Path) -> bool:
    """Whether ``path`` holds a pacer-stream run state (a zarr group with our attributes)."""
    return run_state_attributes(path) is not None


def is_foreign(path: Path) -> bool:
    """Whether ``path`` exists and holds something other than a run state (or nothing)."""
    if not path.exists():
        return False
    if not path.is_dir() or path.is_symlink():
        return True
    return any(path.iterdir()) and not is_run_state(path)


def file_identity(path: Path, with_hash: bool = False) -> dict:
    """What identifies a file's content cheaply: size, mtime_ns, inode (and a sha256)."""
    st = path.stat()
    identity = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "inode": st.st_ino}
    if with_hash:
        identity["sha256"] = _sha256(path)
    return identity


def _same_file(then: dict, now: dict) -> bool:
    return all(then.get(k) == now.get(k) for k in ("size", "mtime_ns", "inode"))


def _change(then: dict, now: dict) -> str:
    if then.get("size") != now.get("size"):
        return f"size {then.get('size')} -> {now.get('size')} bytes"
    if then.get("mtime_ns") != now.get("mtime_ns"):
        return "modified"
    return "replaced by another file"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class PassCheckpoint:
    """Cross-unit accumulators of a streaming pass, saved atomically with its position.

    Arrays go into the idle one of two slots; then a single attributes write makes
    that slot current together with the small ``record`` (position, scalars). A
    kill at any moment leaves either the old or the new checkpoint, never a mix.

        ckpt = PassCheckpoint(state.group.require_group("split"))
        ckpt.save({"high": hist}, {"pass": "variance-high", "next_unit": 3})
        arrays, record = ckpt.load()
    """

    def __init__(self, group: zarr.Group) -> None:
        self.group = group

    def save(self, arrays: dict[str, Any], record: dict[str, Any]) -> None:
        import numpy as np

        current = int(self.group.attrs.get("current", 1))
        slot = f"slot{1 - current}"
        for name, values in arrays.items():
            values = np.asarray(values)
            array = self.group.create_array(f"{slot}/{name}", shape=values.shape,
                                            dtype=values.dtype, chunks=values.shape or None,
                                            overwrite=True)
            array[...] = values
        self.group.attrs.update({"current": 1 - current, slot: {"record": record,
                                                                "arrays": sorted(arrays)}})

    def load(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        import numpy as np

        current = self.group.attrs.get("current")
        if current is None:
            return None
        slot = f"slot{current}"
        saved = self.group.attrs[slot]
        arrays = {name: np.array(self.group[f"{slot}/{name}"][...]) for name in saved["arrays"]}
        return arrays, dict(saved["record"])
