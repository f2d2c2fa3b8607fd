"""The executor: a method's recipe (recipes.py), run stage by stage over the units.

A stage is one of two shapes:

- a **unit stage** declares its units (``units``), the run-state key each one is done
  under (``key``), what one unit computes (``run_unit``: it reads inputs and writes its
  own shard slots, and returns a small result), how a result folds into the run
  (``reduce``: on the driver, in unit order; its return value is the unit's record in
  the RunState) and, for other processes, what of the earlier stages a unit needs
  (``shared``/``adopt``), how much memory (``memory``) and which files it writes
  (``writes``: units that run at once must not share one). The runner owns the order,
  the skipping of finished units, the RunState bookkeeping, the memory guard, the
  failpoints and the progress bar; the backend decides where units run (here, in
  order, the next tensor read while this one merges; or one Ray task a unit).
- a **driver stage** (``run(ctx, runner)``) is a pass whose steps depend on each
  other: the alignment sweeps, RegMean's and the calibration's block-by-block forward
  passes, Split-Merge's passes, the finish. It runs in this process and asks the runner
  for progress bars, the state and the backend; the independent part of its work (a
  sweep's per-unit shares, a variance pass's per-unit histograms) it maps through
  ``runner.backend.map_calls``, folding the results in unit order itself.

When every stage is done the report is written and the state marked complete. A re-run
skips what the state says is done and writes the same bytes.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from . import failpoints
from .job import MergeContext, RunOptions
from .memory import RssMonitor, return_freed_memory
from .methods.upcycle import Decision
from .output_folder import open_state
from .recipes import finished_files, recipe
from .report import REPORT, write_report
from .sizes import format_size
from .state import RunState
from .summary import RunSummary

__all__ = ["REPORT", "RunOptions", "Runner", "execute"]


def execute(ctx: MergeContext, backend) -> RunSummary:
    """Run the plan's recipe to a finished output (or find it finished)."""
    start = time.perf_counter()
    state = open_state(ctx)
    if "decision" in state.group.attrs:  # the layout an earlier attempt decided on
        ctx.set_decision(Decision.from_json(state.group.attrs["decision"]))
    if state.complete and all((ctx.out_dir / f).exists() for f in finished_files(ctx)):
        ctx.summary.already_complete = True
        return ctx.summary
    state.group.attrs["attempts"] = ctx.attempt = int(state.group.attrs.get("attempts", 0)) + 1
    runner = Runner(ctx, state, backend, ctx.options.quiet or not sys.stderr.isatty())
    with RssMonitor() as rss:
        for stage in recipe(ctx):
            runner.run(stage)
        write_report(ctx, state)
    ctx.summary.peak_rss = rss.peak
    ctx.summary.seconds = time.perf_counter() - start
    state.mark_complete()
    return ctx.summary


class Runner:
    """Runs stages for one attempt of a run: the context, the state, the backend."""

    def __init__(self, ctx: MergeContext, state: RunState, backend, quiet: bool) -> None:
        self.ctx, self.state, self.backend, self.quiet = ctx, state, backend, quiet

    def progress(self, total: int | None, desc: str, unit: str = "unit",
                 initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=self.quiet,
                    file=sys.stderr)

    def run(self, stage) -> None:
        if hasattr(stage, "run_unit"):
            self._map(stage)
        else:
            stage.run(self.ctx, self)

    def _map(self, stage) -> None:
        """A unit stage: its unfinished units through the backend, folded in unit order."""
        ctx, state = self.ctx, self.state
        units = stage.units(ctx)
        todo = [u for u in units if not state.is_done(stage.key(u))]
        if hasattr(stage, "skipped"):
            stage.skipped(ctx, [u for u in units if u not in todo])
        with self.progress(len(units), stage.label(ctx), getattr(stage, "unit_label", "unit"),
                           initial=len(units) - len(todo)) as bar:
            for unit, result in self.backend.map_stage(stage, ctx, todo):
                state.mark_done(stage.key(unit), stage.reduce(ctx, unit, result))
                return_freed_memory()
                failpoints.hit(stage.failpoint)
                bar.update(1)
                bar.set_postfix_str(f"{format_size(ctx.summary.read_bytes)} read")
        if hasattr(stage, "finish"):
            stage.finish(ctx, state)
