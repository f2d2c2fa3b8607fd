"""Pre-flight: everything a run checks before it touches the disk.

A run deletes files in two cases only, ``--force`` over a folder the user named
and ``--restart`` over its own earlier run, and only after every check here has
passed: the plan and inputs are valid (config.py, inputs.py), the output and
state folders are neither an input nor inside one nor around one, the budget is
one the plan fits in, and the disk has room for the output. A finished merge is
therefore never deleted by a run that would then fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config_schema import PlanConfig
from .errors import PacerError
from .inputs import ModelSet
from .io.reader import CheckpointIndex
from .sizes import format_size


def check_run(config: PlanConfig, models: ModelSet, state_dir: Path | None,
              budget: int | None, device: str) -> None:
    """Refuse a run that would lose data or fail for a reason knowable now."""
    from .planner import make_plan, require_fit

    out_dir = config.output.path
    check_output_paths(out_dir, state_dir, models, config.source)
    plan = make_plan(config, models, budget, device)
    require_fit(plan)
    check_disk_space(out_dir, plan.write_bytes)


def overlap(place: Path, folder: Path) -> str | None:
    """How resolved path ``place`` meets ``folder``: "is", "lies inside", "contains" or None."""
    if place == folder:
        return "is"
    if place.is_relative_to(folder):
        return "lies inside"
    if folder.is_relative_to(place):
        return "contains"
    return None


def protected_folders(models: ModelSet) -> list[tuple[str, Path]]:
    """(label, folder) of every input: local folders, and hub models' cache folders."""
    folders = []
    for index in models.all:
        folder = model_folder(index)
        if folder is not None:
            folders.append((index.label, folder))
    return folders


def model_folder(index: CheckpointIndex) -> Path | None:
    """The folder on disk that holds a model's files, if any (resolved)."""
    root = getattr(index.files, "root", None)
    if root is not None:
        return Path(root).resolve()
    cached = index.files.local_path("config.json")
    if cached is None:
        return None
    # hub cache: <cache>/models--org--name/snapshots/<commit>/config.json -> the repo folder,
    # whose blobs/ hold the data the snapshot links to
    snapshot = Path(cached).parent
    return snapshot.parent.parent.resolve() if snapshot.parent.name == "snapshots" else \
        snapshot.resolve()


def check_output_paths(out_dir: Path, state_dir: Path | None, models: ModelSet,
                       plan_file: Path | None = None) -> None:
    """The output and state folders must not be, contain or lie inside an input."""
    places = [("output folder", Path(out_dir).resolve())]
    if state_dir is not None:
        places.append(("--state-dir", Path(state_dir).resolve()))
        if places[1][1] == places[0][1]:
            raise PacerError(f"--state-dir {state_dir} is the output folder itself; give the "
                             "state a folder of its own (or leave --state-dir out)")
    for what, place in places:
        for label, folder in protected_folders(models):
            relation = overlap(place, folder)
            if relation is None:
                continue
            raise PacerError(f"{what} {place} {relation} the input model {label} ({folder}); "
                             "inputs are never written to: choose another output path")
    if plan_file is not None and Path(plan_file).resolve().is_relative_to(places[0][1]):
        raise PacerError(f"output folder {places[0][1]} holds the plan file {plan_file}; choose "
                         "an output folder of its own")


def check_outside_inputs(what: str, path: Path, models: ModelSet) -> None:
    """A file or folder to be written must not be an input's folder or lie inside one."""
    path = Path(path).resolve()
    for label, folder in protected_folders(models):
        if overlap(path, folder) in ("is", "lies inside"):
            raise PacerError(f"{what} {path} lies inside the input model {label} ({folder}); "
                             "inputs are never written to: choose another path")


def check_clear_allowed(folder: Path) -> None:
    """A folder ``--force`` may empty: not /, not the home folder, not around the cwd."""
    folder = Path(folder).resolve()
    for what, place in (("the home folder", Path.home().resolve()),
                        ("the current folder", Path.cwd().resolve())):
        if place.is_relative_to(folder):
            raise PacerError(f"output folder {folder} contains {what}; refusing to empty it, "
                             "even with --force: choose an output folder of its own")


def check_disk_space(out_dir: Path, need: int) -> None:
    """Refuse when the file system cannot hold the output (what it already holds counts)."""
    existing = Path(out_dir)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    reusable = _allocated(Path(out_dir)) if Path(out_dir).is_dir() else 0
    if free + reusable < need:
        raise PacerError(f"{existing}: {format_size(free)} free, but the output needs "
                         f"{format_size(need)}; free some space or choose another output path")


def _allocated(folder: Path) -> int:
    """Bytes the files under ``folder`` occupy on disk (sparse files count what they use)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_blocks * 512
        except OSError:
            continue
    return total
