"""The local backend: every unit in this process, in order."""

from __future__ import annotations

from ..job import MergeContext
from ..pipeline import run_steps


class LocalBackend:
    name = "local"

    def map_stage(self, stage, ctx: MergeContext, units: list[str]):
        """(unit, result) in unit order; a stepped stage's reads run ahead of its steps,
        across unit boundaries too (pipeline.py)."""
        if hasattr(stage, "steps"):
            return run_steps(stage, ctx, units)
        return ((unit, stage.run_unit(ctx, unit)) for unit in units)

    def map_calls(self, fn, ctx: MergeContext, units: list[str], shared, memory: int,
                  label: str):
        """``fn(ctx, shared, unit)`` for each unit, in order, as they are asked for."""
        return (fn(ctx, shared, unit) for unit in units)
