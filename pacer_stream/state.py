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
        ``restart`` is set, in which case it is wiped.
        """
        if path.exists() and restart:
            shutil.rmtree(path)
        if path.exists():
            try:
                group = zarr.open_group(str(path), mode="r+")
                found = group.attrs.get("fingerprint")
            except Exception:  # a store damaged beyond reading
                found, group = None, None
            if found != fingerprint_:
                raise PacerError(
                    f"{path.parent}: holds an unfinished run of a different plan or different "
                    "inputs; re-run with --restart to discard it and start over"
                )
            return cls(path, group)
        group = zarr.open_group(str(path), mode="w")
        group.attrs.update({"format": FORMAT, "fingerprint": fingerprint_, "units": {},
                            "complete": False})
        return cls(path, group)

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
