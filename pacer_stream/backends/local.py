"""The local backend: every unit in this process, in order."""

from __future__ import annotations

from ..job import MergeContext


class LocalBackend:
    name = "local"

    def map_stage(self, stage, ctx: MergeContext, units: list[str]):
        """(unit, result) in unit order; a stage with ``run_units`` pipelines its reads
        across units (the merge reads the next tensor while this one merges)."""
        if hasattr(stage, "run_units"):
            return stage.run_units(ctx, units)
        return ((unit, stage.run_unit(ctx, unit)) for unit in units)

    def align_map(self, ctx: MergeContext):
        return None  # the sweeps' own loop, in this process

    def close(self) -> None:
        pass
