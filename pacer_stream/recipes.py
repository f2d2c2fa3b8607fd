"""Recipes: the stages each method runs, in order.

A stage reads what earlier stages left in the MergeContext and adds its own; the
executor runs them. A new pass is a new stage module and a line here.
"""

from __future__ import annotations

from .job import CALIBRATED_ROUTERS, MergeContext
from .methods.split_merge import ETA_FILE, INFO_FILE
from .planner import SPLIT_PASSES
from .stages.align import AlignStage
from .stages.aligned_output import AlignedOutputStage
from .stages.calibrate import CalibrateStage
from .stages.consensus import ConsensusStage
from .stages.finish import FinishStage
from .stages.generate import GenerateStage
from .stages.merge import MergeStage
from .stages.regmean import RegMeanStage
from .stages.split_finish import SplitFinishStage
from .stages.split_passes import SplitPass
from .stages.upcycle import UpcycleStage


def recipe(ctx: MergeContext) -> list:
    """The stages of the plan's method (split_merge, pacer's phases, a dense method)."""
    if ctx.config.method == "split_merge":
        return [*(SplitPass(name) for name in SPLIT_PASSES), SplitFinishStage()]
    stages: list = [AlignStage()] if ctx.config.align else []
    if ctx.config.align == "only":
        return [*stages, AlignedOutputStage()]
    if ctx.generates():
        stages.append(GenerateStage())
    if ctx.upcycling:
        stages += [ConsensusStage(), UpcycleStage()]
    if ctx.uses_regmean():
        stages.append(RegMeanStage())
    stages.append(MergeStage())
    # gate rows fitted on the merged blocks (a router kind the decision fixes)
    stages.append(when(lambda: ctx.router_kind in CALIBRATED_ROUTERS, CalibrateStage()))
    return [*stages, FinishStage()]


def finished_files(ctx: MergeContext) -> list[str]:
    """The files a complete output has (beside the shards' index and side files)."""
    shards = [s.file for s in ctx.shards]
    if ctx.config.method == "split_merge":
        return [INFO_FILE, ETA_FILE, "config.json", *shards]
    return shards


class when:
    """A stage run only if ``condition()`` holds when its turn comes."""

    def __init__(self, condition, stage) -> None:
        self.condition, self.stage = condition, stage
        self.name = stage.name

    def run(self, ctx: MergeContext, runner) -> None:
        if self.condition():
            runner.run(self.stage)
