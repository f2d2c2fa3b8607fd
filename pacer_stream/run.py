"""``pacer-stream run``: the plan's method picks the job that runs it, and everything
knowable is checked before the output folder is created or touched.

The jobs import nothing from here: executor.MergeJob runs the dense methods and PACER,
split_job.SplitMergeJob (a MergeJob) the Split-Merge passes.
"""

from __future__ import annotations

import torch

from .config import PlanConfig
from .errors import PacerError
from .executor import MergeJob, RunOptions
from .inputs import ModelSet
from .lock import OutputLock
from .memory import steady_allocator
from .methods import schedule
from .methods.dense import METHODS, MethodParams, pacer_dense
from .preflight import check_run
from .split_job import SplitMergeJob
from .summary import RunSummary


def run_merge(config: PlanConfig, options: RunOptions) -> RunSummary:
    """Run a dense merge described by ``config``."""
    method, parameters = config.method, config.parameters
    if method == "pacer":
        method, parameters = pacer_dense(config)
    if method not in METHODS and method != "split_merge":
        raise PacerError(f"method {method!r} is not available in `run` yet "
                         f"(available: pacer, split_merge, {', '.join(METHODS)})")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise PacerError("--device cuda: no CUDA device is available; use --device cpu")
    models = ModelSet.from_plan(config)
    steady_allocator()  # slices are sized to the budget: no slack for heap growth
    if method == "split_merge":
        params = MethodParams.resolve("linear", config.models, parameters, config.seed)
        job: MergeJob = SplitMergeJob(config, models, params, options)
    else:
        # the values outside any filter and at t = 0 (each tensor gets its own:
        # DenseStage.params_for)
        params = MethodParams.resolve(
            method, [schedule.resolve(e.parameters, "", 0.0) for e in config.models],
            schedule.resolve(parameters, "", 0.0), config.seed)
        job = MergeJob(config, models, params, options)
    # everything knowable is checked before the output folder is created or touched
    check_run(config, models, options.state_dir, options.budget, options.device)
    job.load_router_samples()
    job.check_output()
    with OutputLock(config.output.path):
        return job.run()
