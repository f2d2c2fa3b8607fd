"""``plan --backend ray --workers W``: the wall time of a plan on W machines, from headers.

The plan's per-unit costs (planner.UnitPlan: bytes read and written, alignment GEMMs
and LAPs; accounting's measured rates) become tasks, scheduled the way the Ray backend
runs them: the units of a unit stage as tasks, each machine one task at a time, taken
in unit order as machines come free; a stage waits for the one before it (the driver
folds results in order, and alignment's residual LAP closes every sweep). The passes
that carry state from unit to unit (Split-Merge's gram and eta, RegMean's and the
calibration's forward passes, data-free generation) run on the driver alone.

What it assumes is returned beside the figures, and comes from measurements where one
exists: the Ray costs per task and per worker process (benchmarks/bench_scale.py on this
machine's local cluster), the per-machine rates (accounting.CPU: bench_dense.py,
bench_align.py), and two properties of the cluster that headers cannot know: the shared
storage's aggregate read rate and the network rate, both options.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass

from . import accounting as acct
from .plan_report import Plan, UnitPlan, duration
from .planner import ALIGN_SWEEPS_EXPECTED

# measured on this machine's local Ray cluster (benchmarks/results/scale-vm.md)
RAY_TASK_SECONDS = 0.001  # scheduling a task and returning its result (1.0 ms measured)
RAY_WORKER_SECONDS = 2.3  # a worker process: Python, torch, pacer-stream, the run's headers
STORAGE_READ = 10e9  # bytes/s all machines together read from the shared storage
NETWORK = 1.25e9  # bytes/s into the driver (10 GbE): the alignment shares come back
# passes over every input whose units are tasks (Split-Merge's gram and eta stay on the driver)
PASSES_AS_TASKS = ("merge", "variance-high", "variance-low")


@dataclass
class ClusterEstimate:
    workers: int
    seconds: float  # estimated wall time on ``workers`` machines
    one_process_seconds: float  # the plan's own estimate (the local backend)
    stages: dict[str, float]  # each stage's wall time on the cluster
    assumptions: dict[str, float | str]

    @property
    def speedup(self) -> float:
        return self.one_process_seconds / self.seconds if self.seconds else 1.0

    def to_json(self) -> dict:
        return {**asdict(self), "speedup": round(self.speedup, 2)}


def estimate(plan: Plan, workers: int, storage_read: float = STORAGE_READ,
             network: float = NETWORK) -> ClusterEstimate:
    """Wall time of ``plan`` (CPU rates) with its unit stages spread over ``workers``."""
    rate = acct.CPU
    read = min(rate.disk_read, storage_read / workers)  # each machine's share of the storage
    cost = acct.merge_cost("linear" if plan.method == "pacer" else plan.method)
    units = [u for u in plan.units if u.merge_read_bytes or u.align_read_bytes]
    stages: dict[str, float] = {}
    carried = 0.0  # what runs on the driver alone
    for stage in plan.stages:
        if stage.name == "align":
            peers = len(plan.models) - 1
            share = residual_share_bytes(plan) * peers  # per unit, back to the driver
            sweep = schedule([u.align_read_bytes / read + u.align_flops / rate.gemm_flops
                              + u.lap_seconds for u in units], workers) \
                + len(units) * share / network + residual_lap_seconds(plan)
            stages["align"] = stage.passes * sweep
        elif stage.name == "consensus":
            total = sum(u.merge_read_bytes for u in units) or 1
            per_byte = stage.read_bytes / total / read + stage.read_bytes / total / 2 \
                / rate.merge_elems
            stages["consensus"] = schedule([u.merge_read_bytes * per_byte for u in units],
                                           workers)
        elif stage.name in PASSES_AS_TASKS:
            stages[stage.name] = schedule(
                [pass_seconds(u, read, rate, cost, stage.name == "merge", stage.write_bytes > 0)
                 for u in units], workers)
        else:  # passes that carry state from unit to unit: the driver's, at its own rate
            stages[stage.name] = stage.seconds["cpu"]
            carried += stage.seconds["cpu"]
    tasks = len(units) * sum(stage.passes for stage in plan.stages
                             if stage.name in ("align", "consensus", *PASSES_AS_TASKS))
    overhead = acct.STARTUP_SECONDS + RAY_WORKER_SECONDS + tasks * RAY_TASK_SECONDS / workers
    seconds = sum(stages.values()) + overhead
    return ClusterEstimate(
        workers=workers, seconds=round(seconds, 1),
        one_process_seconds=plan.est_seconds["cpu"],
        stages={k: round(v, 1) for k, v in stages.items()},
        assumptions={
            "machines": f"{workers} machine{'s' * (workers != 1)}, each running one task at a "
                        "time within the plan's budget",
            "machine_read_bytes_per_s": rate.disk_read, "machine_write_bytes_per_s": rate.disk_write,
            "storage_read_bytes_per_s": storage_read, "network_bytes_per_s": network,
            "ray_task_seconds": RAY_TASK_SECONDS, "ray_worker_seconds": RAY_WORKER_SECONDS,
            "align_sweeps": ALIGN_SWEEPS_EXPECTED, "driver_only_seconds": round(carried, 1),
        })


def pass_seconds(unit: UnitPlan, read: float, rate: acct.Throughput, cost: float,
                 rereads: bool, writes: bool) -> float:
    """One unit of a pass over every input (the merge, a variance pass), as the planner
    costs the whole pass: its reads (the merge's sliced tensors read again by their
    observation passes), its writes, and the elementwise work."""
    elems = unit.merge_read_bytes / 2  # ~element-model pairs (2-byte average), as planner
    return (unit.merge_read_bytes + unit.reread_bytes * rereads) / read \
        + unit.write_bytes * writes / rate.disk_write + elems * cost / rate.merge_elems


def residual_share_bytes(plan: Plan) -> int:
    """One unit's share of one peer's residual cost: a d × d fp64 matrix."""
    d = next((g["size"] for g in plan.groups if g.get("kind") == "residual"), 0)
    return 8 * d * d


def residual_lap_seconds(plan: Plan) -> float:
    d = next((g["size"] for g in plan.groups if g.get("kind") == "residual"), 0)
    return (len(plan.models) - 1) * acct.CPU.lap_coeff * d ** 2.5


def schedule(seconds: list[float], workers: int) -> float:
    """The makespan of tasks taken in order by ``workers`` machines as each comes free."""
    free = [0.0] * max(1, min(workers, len(seconds) or 1))
    for s in seconds:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


def render(est: ClusterEstimate) -> str:
    a = est.assumptions
    lines = [f"Ray, {est.workers} machine{'s' * (est.workers != 1)}: "
             f"{duration(est.seconds)} (one process: {duration(est.one_process_seconds)}, "
             f"{est.speedup:.1f}x)"]
    lines += [f"  {name:<14}{duration(s):>10}" for name, s in est.stages.items()]
    lines.append(f"  assuming: {a['machines']}; each reads {a['machine_read_bytes_per_s'] / 1e9:g} "
                 f"GB/s, the shared storage {a['storage_read_bytes_per_s'] / 1e9:g} GB/s in all, "
                 f"the network into the driver {a['network_bytes_per_s'] / 1e9:g} GB/s; Ray "
                 f"{a['ray_task_seconds'] * 1e3:g} ms a task, {a['ray_worker_seconds']:g} s a "
                 f"worker; {a['align_sweeps']} alignment sweeps; "
                 f"{duration(a['driver_only_seconds'])} on the driver alone")
    return "\n".join(lines)
