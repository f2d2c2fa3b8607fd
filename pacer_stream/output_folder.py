"""Whose the output folder is, and the run state opened in it.

Only two things are ever deleted: a folder the user named with ``--force`` (never an
input: see preflight) and, with ``--restart``, this plan's own earlier run (a state
that records this output folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import PacerError
from .job import MergeContext
from .lock import LOCK_FILE
from .preflight import check_clear_allowed
from .state import RunState, is_foreign, run_state_attributes


def check_output(ctx: MergeContext) -> tuple[Path, bool, list[Path]]:
    """(state path, ours, what else the folder holds).

    Refuses, touching nothing, a foreign state folder, a state of another output
    folder, and a non-empty folder that is not this run's without ``--force``.
    Called before the output lock is taken (so a refused folder gets no lock
    file) and again under it.
    """
    out_dir, options, state_path = ctx.out_dir, ctx.options, ctx.state_path
    if out_dir.exists() and not out_dir.is_dir():
        raise PacerError(f"output path {out_dir} exists and is not a folder")
    if is_foreign(state_path):
        where = "--state-dir" if options.state_dir else "output folder's state"
        raise PacerError(f"{where} {state_path} exists and is not a pacer-stream run state; "
                         "nothing was changed: choose a new or empty folder")
    attrs = run_state_attributes(state_path)
    recorded = attrs.get("output") if attrs is not None else None
    ours = recorded == str(out_dir) or (attrs is not None and recorded is None
                                        and options.state_dir is None)
    if recorded is not None and not ours and not options.restart:
        raise PacerError(f"--state-dir {state_path} holds the run state of another output "
                         f"folder ({recorded}); choose another --state-dir, or pass --restart "
                         "to discard that state")
    others = [c for c in out_dir.iterdir() if c.name != LOCK_FILE
              and c.resolve() != state_path.resolve()] if out_dir.exists() else []
    if others and not ours:
        if not options.force:
            raise PacerError(f"output folder {out_dir} is not empty and holds no "
                             "pacer-stream run; choose another output path or pass --force "
                             "to overwrite it")
        check_clear_allowed(out_dir)
    return state_path, ours, others


def open_state(ctx: MergeContext) -> RunState:
    """The run state, after emptying what of the output folder may be replaced."""
    state_path, ours, others = check_output(ctx)
    if others and (not ours or ctx.options.restart):
        _clear(ctx.out_dir, keep=(state_path, ctx.out_dir / LOCK_FILE))
    state = RunState.open(state_path, ctx.fingerprint(), restart=ctx.options.restart)
    state.group.attrs["output"] = str(ctx.out_dir)
    state.check_inputs(ctx.models.file_identities(ctx.options.hash_inputs))
    return state


def _clear(folder: Path, keep: tuple[Path, ...] = ()) -> None:
    kept = {k.resolve() for k in keep}
    for child in folder.iterdir():
        if child.resolve() in kept:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
