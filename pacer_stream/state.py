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
