"""``pacer-stream run``: the run's context built from the plan, everything knowable
checked before the output folder is created or touched, then the executor."""

from __future__ import annotations

import torch

from .backends import open_backend
from .config import PlanConfig
from .errors import PacerError
from .executor import execute
from .job import MergeContext, RunOptions
from .lock import OutputLock
from .memory import steady_allocator
from .output_folder import check_output
from .preflight import check_run
from .router_samples import load_router_samples
from .summary import RunSummary


def run_merge(config: PlanConfig, options: RunOptions) -> RunSummary:
    """Run the merge described by ``config``."""
    if options.device == "cuda" and not torch.cuda.is_available():
        raise PacerError("--device cuda: no CUDA device is available; use --device cpu")
    options = options.for_plan(config)
    ctx = MergeContext.from_plan(config, options)
    steady_allocator()  # slices are sized to the budget: no slack for heap growth
    check_run(config, ctx.models, options.state_dir, options.budget, options.device)
    load_router_samples(ctx)
    check_output(ctx)
    backend = open_backend(ctx)
    with OutputLock(config.output.path):
        return execute(ctx, backend)
