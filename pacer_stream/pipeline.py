"""The read-ahead pipeline of a stepped unit stage: its units' steps in order, the next
step's input read on a second thread while this step computes.

A stepped stage (the merge) splits each unit into steps (its output tensors) and says,
for the step after the current one, whether its input may be read now (``read_ahead``:
a function to call, or None where the budget leaves no room beside the current step's
working set); ``begin`` opens what the steps write through (``step``, ``unit_done``,
``close``). Both backends run stepped stages through here: the local one over all its
units, so reads overlap across unit boundaries too; a Ray task over its one unit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .job import MergeContext


def run_steps(stage, ctx: MergeContext, units: list[str]) -> Iterator[tuple[str, object]]:
    """(unit, what it did), in unit order, each once the unit's steps are done."""
    steps = [(unit, step) for unit in units for step in stage.steps(ctx, unit)]
    session = stage.begin(ctx)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            def read_ahead(i: int, current):
                read = stage.read_ahead(ctx, steps[i][1], current) if i < len(steps) else None
                return pool.submit(read) if read is not None else None

            pending, i = read_ahead(0, None), 0
            for unit in units:
                while i < len(steps) and steps[i][0] == unit:
                    raw = pending.result() if pending is not None else None
                    pending = read_ahead(i + 1, steps[i][1])
                    session.step(steps[i][1], raw)
                    raw, i = None, i + 1  # freed before the next step is taken
                yield unit, session.unit_done(unit)
    finally:
        session.close()
