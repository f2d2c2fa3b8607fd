"""The plan's figures and their two reports: UnitPlan (one unit's bytes, working set and
row slices), StagePlan (one stage's passes, traffic and seconds) and Plan (the whole merge,
with the fit verdict); ``Plan.to_json`` for ``plan --json``, :func:`render` for the text
report.

planner.py fills these in (a unit's with plan_units.py); nothing here computes
an estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import accounting as acct
from .sizes import format_size


@dataclass
class UnitPlan:
    name: str
    tensors: int
    merge_read_bytes: int  # one merge pass over all inputs
    align_read_bytes: int  # one alignment sweep (anchor + peers, permuted tensors only)
    write_bytes: int
    merge_ram_bytes: int
    align_ram_bytes: int
    align_flops: float  # cost GEMMs of one sweep, all peers
    lap_problems: int
    lap_seconds: float  # one sweep, all peers, CPU
    sliced: dict[str, int] = field(default_factory=dict)  # tensor -> rows per slice
    reread_bytes: int = 0  # read again by the observation passes of sliced tensors
    problem: str | None = None
    min_need_bytes: int = 0  # its smallest working set (one row per slice, one peer)
    min_need_what: str = ""  # which stage of which tensor needs it

    @property
    def ram_bytes(self) -> int:
        return max(self.merge_ram_bytes, self.align_ram_bytes)


@dataclass
class StagePlan:
    name: str
    passes: int
    read_bytes: int
    write_bytes: int
    seconds: dict[str, float]
    max_passes: int | None = None  # align: the safety cap (pacer.max_sweeps); passes is typical


@dataclass
class Plan:
    project_name: str
    method: str
    architecture: str
    models: list[str]
    device: str
    budget_bytes: int
    input_bytes: int
    units: list[UnitPlan]
    stages: list[StagePlan]
    groups: list[dict]
    peak_unit: str
    peak_ram_bytes: int
    fits: bool
    reason: str | None
    write_bytes_max: int
    min_budget_bytes: int = 0  # the smallest --max-memory this plan fits in
    min_budget_reason: str = ""  # what needs it: "<unit>: <stage and tensor or group>"
    router: str | None = None  # pacer: where the upcycled blocks' gate rows come from
    target: str = "transformers"  # output.target
    target_cost: str | None = None  # llama.cpp target of an upcycling plan: what it costs

    @property
    def read_bytes(self) -> int:
        return sum(s.read_bytes for s in self.stages)

    @property
    def write_bytes(self) -> int:
        return sum(s.write_bytes for s in self.stages)

    @property
    def est_seconds(self) -> dict[str, float]:
        """The stages' seconds and the start-up every run pays (accounting.STARTUP_SECONDS)."""
        return {dev: round(acct.STARTUP_SECONDS + sum(s.seconds[dev] for s in self.stages), 3)
                for dev in ("cpu", "gpu")}

    def to_json(self) -> dict:
        return {
            "project_name": self.project_name, "method": self.method,
            "architecture": self.architecture, "models": self.models, "device": self.device,
            "budget_bytes": self.budget_bytes, "peak_ram_bytes": self.peak_ram_bytes,
            "peak_unit": self.peak_unit, "fits": self.fits, "reason": self.reason,
            "min_budget_bytes": self.min_budget_bytes, "min_budget_reason": self.min_budget_reason,
            "input_bytes": self.input_bytes, "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes, "write_bytes_max": self.write_bytes_max,
            "est_seconds": self.est_seconds, "groups": self.groups, "router": self.router,
            "target": self.target, "target_cost": self.target_cost,
            "stages": [asdict(s) for s in self.stages],
            "units": [{**asdict(u), "ram_bytes": u.ram_bytes} for u in self.units],
        }


def render(plan: Plan) -> str:
    """The human-readable plan report."""
    lines = [
        f"plan {plan.project_name}: {plan.method} merge of {len(plan.models)} "
        f"{plan.architecture} models",
        *(f"  model {i}: {m}" for i, m in enumerate(plan.models)),
        "",
        "symmetry groups:",
        f"  {'kind':<10}{'size':>8}{'count':>8}{'problems':>10}",
        *(f"  {g['kind']:<10}{g['size']:>8}{g['count']:>8}{g['problems']:>10}" for g in plan.groups),
        "",
        f"stages ({len(plan.units)} units each):",
        f"  {'stage':<14}{'passes':>7}{'read':>12}{'write':>12}{'cpu':>12}{'gpu':>12}",
    ]
    for s in plan.stages:
        lines.append(f"  {s.name:<14}{s.passes:>7}{format_size(s.read_bytes):>12}"
                     f"{format_size(s.write_bytes):>12}{duration(s.seconds['cpu']):>12}"
                     f"{duration(s.seconds['gpu']):>12}")
    est = plan.est_seconds
    startup = duration(acct.STARTUP_SECONDS)
    lines += [
        f"  {'start-up':<14}{'':>7}{'':>12}{'':>12}{startup:>12}{startup:>12}",
        f"  {'total':<14}{'':>7}{format_size(plan.read_bytes):>12}"
        f"{format_size(plan.write_bytes):>12}{duration(est['cpu']):>12}{duration(est['gpu']):>12}",
        *(_align_line(s) for s in plan.stages if s.max_passes is not None),
        *([f"  calibrate (if a block is upcycled): router {plan.router}"] if plan.router else
          ["  no MLP block will be upcycled: experts need pacer.router_samples (or router: "
           "data_free)"] if plan.method == "pacer" and plan.write_bytes_max > plan.write_bytes
          else []),
        "",
        f"output target: {plan.target}" + (f" - {plan.target_cost}" if plan.target_cost else ""),
        f"inputs {format_size(plan.input_bytes)}; output {format_size(plan.write_bytes)}"
        + (f" (up to {format_size(plan.write_bytes_max)} if every MLP is upcycled)"
           if plan.write_bytes_max > plan.write_bytes else ""),
        f"peak RAM {format_size(plan.peak_ram_bytes)} at {plan.peak_unit} "
        f"(budget {format_size(plan.budget_bytes)})",
    ]
    sliced = sum(len(u.sliced) for u in plan.units)
    if sliced and plan.fits:
        lines.append(f"{sliced} tensors are processed in row slices to stay inside the budget")
    lines.append(f"smallest budget that fits: {format_size(plan.min_budget_bytes)} "
                 f"({plan.min_budget_reason})")
    lines.append("fits: yes" if plan.fits else f"fits: NO - {plan.reason}")
    return "\n".join(lines)


def _align_line(stage: StagePlan) -> str:
    """What the align row's passes mean: the usual count, not a promise, and the cap."""
    return (f"  align sweeps until converged: {stage.passes} estimated, at most "
            f"{stage.max_passes} (pacer.max_sweeps); per sweep "
            f"{format_size(stage.read_bytes // stage.passes)}, "
            f"{duration(stage.seconds['cpu'] / stage.passes)} cpu")


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
