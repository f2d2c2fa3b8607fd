"""The plan: stages, per-unit costs, peak RAM, disk traffic and time, from headers alone.

``make_plan`` walks the merge graph once and, for every unit, counts the bytes
each stage reads and writes, the working set (see :mod:`accounting`), the FLOPs
of the alignment cost GEMMs and the LAP solves. Nothing here reads tensor data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import psutil

from . import accounting as acct
from .config import PlanConfig
from .errors import PacerError
from .export.moe import moe_model_type
from .graph import GLOBAL, MergeGraph, Unit
from .inputs import ModelSet
from .io.header import ITEMSIZE, TensorInfo
# (the methods, the sample stages and the llama.cpp layout are imported where a plan uses
# them: reading headers and planning a dense merge never imports torch)
from .sizes import at_least, format_size

EXPERT_ROLES = ("mlp.gate", "mlp.up", "mlp.down", "mlp.gate.bias", "mlp.up.bias",
                "mlp.down.bias")  # an expert is a whole MLP block, biases included
SPLIT_PASSES = ("variance-high", "variance-low", "gram", "eta")  # see split_job
# Alignment sweeps a plan estimates: fine-tunes of one base converge after 1, a permuted
# copy after 2 (find, confirm); up to 7 measured only for near-random tiny models.
ALIGN_SWEEPS_EXPECTED = 2

OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


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


def default_budget() -> int:
    """Without --max-memory: 80% of physical RAM."""
    return int(psutil.virtual_memory().total * 0.8)


def make_plan(config: PlanConfig, models: ModelSet, budget: int | None = None,
              device: str = "cpu") -> Plan:
    """The plan of ``config`` under ``budget``: costs, and whether (and from which budget)
    every stage's working set fits; the run's pre-flight (:func:`require_fit`) and the
    ``plan`` command decide "fits" from this alone."""
    budget = budget or default_budget()
    models.spec.check_plan(config.method, config.align, config.pacer)  # refused before any work
    graph = models.graph
    inputs = models.all
    aligning = bool(config.align)
    n_peers = len(inputs) - 1  # every input but the anchor is aligned, a base model too
    out_dtype = OUT_DTYPES.get(config.output.dtype)

    upcycling = config.method == "pacer" and config.pacer["enable_moe_upcycle"]
    units = [_unit_plan(unit, graph, models, config, out_dtype, budget, aligning)
             for unit in graph.units]
    input_bytes = sum(u.merge_read_bytes for u in units)
    dense_out = sum(u.write_bytes for u in units)
    consensus_read = 0
    if upcycling:
        from .methods.consensus import part_of

        consensus_read = sum(m.tensors[t].nbytes for m in inputs for u in graph.units
                             if u.kind == "block" for t in u.tensors
                             if part_of(graph.nodes[t].role))
    generates = False
    if config.method == "pacer":
        from .self_samples import writes_samples

        generates = writes_samples(models.models[0].config)
    stages = _stages(config, units, n_peers, graph, aligning, consensus_read, generates)
    peak = max(units, key=lambda u: u.ram_bytes)
    neediest = max(units, key=lambda u: u.min_need_bytes)
    write_max = sum(s.write_bytes for s in stages)
    # the MLP weights of each block, which upcycling copies into experts
    mlp_out = [sum(_bytes(graph.nodes[t].info, out_dtype) for t in u.tensors
                   if graph.nodes[t].role.startswith("mlp.") and graph.nodes[t].role != "mlp.norm")
               for u in graph.units if u.kind == "block"]
    if config.method == "pacer" and config.pacer["enable_moe_upcycle"]:
        # every MLP block upcycled to N experts: the upper bound on output size
        write_max = dense_out + (len(models.models) - 1) * sum(mlp_out)
    target_cost = None
    exports_moe = models.spec.family == "vit" or moe_model_type(models.spec.family) is not None
    if upcycling and config.output.target == "llama.cpp" and exports_moe:
        from .export.llamacpp import check_source

        check_source(models.spec.family, models.models[0].config)  # refused before any work
        target_cost = _target_cost(config, len(models.models), models.spec.family,
                                   dense_out + (len(models.models) - 1) * min(mlp_out, default=0),
                                   write_max)
    for u in units:  # every unit that does not fit says why
        least = acct.budget_for(u.min_need_bytes)
        u.problem = _too_small(u, budget, least) if budget < least else None
    min_budget = acct.budget_for(neediest.min_need_bytes)
    fits = budget >= min_budget
    return Plan(
        project_name=config.project_name, method=config.method, architecture=models.spec.family,
        models=[m.label for m in models.models], device=device, budget_bytes=budget,
        input_bytes=input_bytes, units=units, stages=stages, groups=_group_summary(graph),
        peak_unit=peak.name, peak_ram_bytes=peak.ram_bytes, fits=fits,
        reason=None if fits else _too_small(neediest, budget, min_budget),
        write_bytes_max=write_max, min_budget_bytes=min_budget,
        min_budget_reason=f"{neediest.name}: {neediest.min_need_what}",
        router=_router(config, models.spec.family),
        target=config.output.target, target_cost=target_cost,
    )


def _target_cost(config: PlanConfig, n: int, family: str, one_block: int,
                 write_max: int) -> str:
    """What the llama.cpp target costs against the default once any block is upcycled:
    every block then holds N experts (dense ones as copies), and runs k of them."""
    from .export.llamacpp import describe

    k = min(config.pacer["top_k_experts"], n)
    return (f"{describe(family)}; once any block is upcycled the output is "
            f"{format_size(write_max)} (the default target's: {format_size(one_block)} for one "
            f"block) and every block's MLP runs {k} experts per token ({k}x its compute; the "
            f"default target runs dense blocks once)")


def _router(config: PlanConfig, family: str) -> str | None:
    """One phrase on the routers an upcycling run would write (calibration.py)."""
    pacer = config.pacer
    if config.method != "pacer" or not pacer["enable_moe_upcycle"]:
        return None
    if pacer["router_mode"] != "linear":
        return f"{pacer['router_mode']} (per-input, ViT-MoE code)"
    if pacer["router"] is None:
        return None
    from .self_samples import LENGTH as GENERATED_LENGTH, SEQUENCES as GENERATED_SEQUENCES

    samples = pacer["router_samples"] or {}
    measured = (f"; routing measured on {pacer['router_holdout']:.0%} of the sample lines, "
                "held out" if samples and pacer["router"] == "few_shot" else
                "; routing measured on the sample lines" if samples else "")
    source = f"fitted to the sample lines of {len(samples)} models" \
        if pacer["router"] == "few_shot" else (
            f"fitted to samples each model generates ({GENERATED_SEQUENCES} x "
            f"{GENERATED_LENGTH} tokens)")
    if pacer["router"] == "data_free" and family == "vit":
        source = ("from the weights alone (prototypes of |E_m - consensus|: a ViT writes no "
                  "samples), routes poorly: give pacer.router_samples (.npy images)")
    return f"{pacer['router']}: gate rows {source}{measured}"


def require_fit(plan: Plan) -> None:
    """The run's pre-flight: raise unless ``plan`` fits its budget (the ``plan`` command's
    "fits", from the same figures)."""
    if not plan.fits:
        raise PacerError(plan.reason or f"--max-memory {format_size(plan.budget_bytes)} is too "
                         f"small; needs at least {format_size(plan.min_budget_bytes)}")


def _too_small(unit: UnitPlan, budget: int, min_budget: int) -> str:
    """One line: what needs how much, the budget given, and the smallest that works."""
    room = acct.usable(budget)
    given = (f"the budget of {format_size(budget)} leaves {format_size(room)} for it"
             if room > 0 else f"the budget of {format_size(budget)} does not cover the process "
             f"itself (~{format_size(acct.PROCESS_BASE_BYTES)}, "
             f"{format_size(acct.budget_for(0))} with the {100 - acct.HEADROOM_PERCENT}% headroom)")
    return (f"{unit.name}: {unit.min_need_what} needs {format_size(unit.min_need_bytes)} and "
            f"{given}; {at_least(min_budget)}")


def _bytes(info: TensorInfo, out_dtype: str | None) -> int:
    dtype = out_dtype if (out_dtype and info.is_float) else info.dtype
    return info.numel * ITEMSIZE[dtype]


def _unit_plan(unit: Unit, graph: MergeGraph, models: ModelSet, config: PlanConfig,
               out_dtype: str | None, budget: int, aligning: bool) -> UnitPlan:
    inputs, n_models = models.all, len(models.models)
    n_peers = len(inputs) - 1
    names = unit.tensors + unit.passthrough
    merge_read = sum(m.tensors[t].nbytes for m in inputs for t in names)
    permuted = [t for t in unit.tensors if graph.nodes[t].groups]
    align_read = sum(m.tensors[t].nbytes for m in inputs[:n_models] for t in permuted)
    write = sum(_bytes(inputs[0].tensors[t], out_dtype) for t in names)
    plan = UnitPlan(unit.name, len(names), merge_read, align_read if aligning else 0, write,
                    0, 0, 0.0, 0, 0.0)

    # Every pass over every tensor: the largest working set, sliced by rows if it must be.
    merge_peak = 0
    observing = 0 if config.method in ("pacer", "split_merge") else acct.observation_passes(
        config.method, config.parameters.get("rescale"))
    for t in names:
        info = inputs[0].tensors[t]
        for what, work in _tensor_works(config, graph, unit, t, info, models, out_dtype):
            if _can_slice(config, graph, t, info):
                need = acct.one_row_bytes(info.shape, work)
                if config.method == "split_merge":  # its Gram pass never splits a row group
                    need = _gram_group_bytes(info, work)
                slices = acct.plan_tensor(info.shape, work, budget)
            else:  # read whole
                need = work.bytes(info.numel, info.numel)
                slices = acct.SlicePlan(1, 1, need, need <= acct.usable(budget))
            if need > plan.min_need_bytes:
                plan.min_need_bytes, plan.min_need_what = need, f"{what} {t}"
            if slices.sliced:
                plan.sliced[t] = min(slices.rows, plan.sliced.get(t, slices.rows))
                if what == "merging":
                    plan.reread_bytes += observing * sum(m.tensors[t].nbytes for m in inputs)
            merge_peak = max(merge_peak, slices.bytes)
    plan.merge_ram_bytes = acct.PROCESS_BASE_BYTES + merge_peak
    if not aligning:
        return plan

    # Alignment: the accounting the align stage obeys, with one peer (its minimum).
    residual = graph.groups.get(GLOBAL)
    d = residual.size if residual is not None else 0
    need = acct.align_bytes(acct.align_unit_need(graph, unit), d, 1)
    plan.align_ram_bytes = acct.PROCESS_BASE_BYTES + need
    local = [g for g in graph.groups.values() if g.unit == unit.name]
    if need > plan.min_need_bytes:
        big = max(local, key=lambda g: g.size, default=residual)
        plan.min_need_bytes = need
        plan.min_need_what = f"aligning its {big.kind} group ({big.size}x{big.size})"
    for g in graph.groups.values():
        for t, _axis in g.members:
            if t in unit.tensors:
                plan.align_flops += n_peers * 2.0 * g.size * graph.nodes[t].info.numel
    plan.lap_problems = n_peers * sum(g.problems for g in local)
    plan.lap_seconds = n_peers * sum(g.problems * acct.CPU.lap_coeff * g.size ** 2.5 for g in local)
    return plan


def _gram_group_bytes(info: TensorInfo, work: acct.Work) -> int:
    """Split-Merge's smallest slice: one fixed Gram row group (methods.split_merge)."""
    from .methods.split_merge import gram_group_rows

    shape = info.shape or (1,)
    row = acct.row_numel(shape)
    rows = min(shape[0], gram_group_rows(row))
    return work.bytes(rows * row, info.numel)


def _can_slice(config: PlanConfig, graph: MergeGraph, name: str, info: TensorInfo) -> bool:
    """Copied tensors (non-float, passthrough) and ``align: only`` outputs are read whole."""
    return config.align != "only" and info.is_float and name not in graph.passthrough


def _tensor_works(config: PlanConfig, graph: MergeGraph, unit: Unit, name: str,
                  info: TensorInfo, models: ModelSet, out_dtype: str | None
                  ) -> list[tuple[str, acct.Work]]:
    """Each pass the run makes over one tensor, and what it holds (see the executor)."""
    n_inputs, n_models = len(models.all), len(models.models)
    aligned = bool(config.align)
    b = models.widest_itemsize(name)
    if config.align == "only":  # each peer's tensor is read whole, re-based and written
        return [("writing the aligned copies of", acct.Work(acct.ALIGNED_READ_COPIES * b))]
    if not _can_slice(config, graph, name, info):  # read whole from every input, compared
        return [("copying", acct.Work(acct.raw_bytes(1, n_inputs, b, aligned)))]
    out_size = ITEMSIZE[out_dtype or info.dtype]
    if config.method == "split_merge":
        work = acct.copies_work(acct.split_copies(n_inputs), n_inputs, out_size, b, aligned)
        return [("a Split-Merge pass over", work)]
    dense = config.method
    if config.method == "pacer":
        from .methods.consensus import part_of
        from .methods.dense import pacer_dense

        dense = pacer_dense(config)[0]
    works = [("merging", acct.merge_work(dense, n_inputs, out_size, b, aligned,
                                         acct.row_numel(info.shape or (1,))))]
    if config.method == "pacer" and config.pacer["enable_moe_upcycle"] and unit.kind == "block":
        role = graph.nodes[name].role
        if part_of(role) is not None:
            works.append(("the statistics pass over",
                          acct.stats_work(n_models, models.base is not None, b, aligned)))
        if role in EXPERT_ROLES:
            works.append(("writing the experts of",
                          acct.expert_work(n_models, n_inputs, out_size, b, aligned)))
    return works


def _sample_stages(config: PlanConfig, merge_read: int, generates: bool) -> list[StagePlan]:
    """PACER's sample passes before the merge: data-free generation (self_samples.py) and
    RegMean (regmean_pass.py). Each reads every model's blocks once; generation re-reads a
    model once per token when it does not fit the tensor cache (half the usable budget),
    which the budget cannot be known for here: the estimate assumes it fits."""
    if config.method != "pacer":
        return []
    from .self_samples import LENGTH as GENERATED_LENGTH, SEQUENCES as GENERATED_SEQUENCES

    pacer, stages = config.pacer, []
    params = merge_read / 2 / max(len(config.models), 1)  # ~parameters of one model
    cpu_gpu = (("cpu", acct.CPU), ("gpu", acct.GPU))
    if pacer["router"] == "data_free" and generates:
        flops = 2 * params * GENERATED_SEQUENCES * GENERATED_LENGTH * len(config.models)
        stages.append(StagePlan("generate", 1, merge_read, 0, {
            dev: merge_read / rate.disk_read + flops / rate.gemm_flops for dev, rate in cpu_gpu}))
    if pacer["dense"] == "regmean" and (pacer["router_samples"] or generates):
        tokens = GENERATED_SEQUENCES * (1 + GENERATED_LENGTH)  # per model, about
        flops = 4 * params * tokens * len(config.models)  # forward + Gram and solve terms
        stages.append(StagePlan("regmean", 1, merge_read, 0, {
            dev: merge_read / rate.disk_read + flops / rate.gemm_flops for dev, rate in cpu_gpu}))
    return stages


def _stages(config: PlanConfig, units: list[UnitPlan], n_peers: int, graph: MergeGraph,
            aligning: bool, consensus_read: int, generates: bool) -> list[StagePlan]:
    merge_read = sum(u.merge_read_bytes for u in units)
    reread = sum(u.reread_bytes for u in units)  # sliced tensors' observation passes
    write = sum(u.write_bytes for u in units)
    elems = sum(u.merge_read_bytes for u in units) / 2  # ~element-model pairs (2-byte average)
    stages = []
    sample = {st.name: st for st in _sample_stages(config, merge_read, generates)}
    if aligning:
        # Sweeps stop when the residual permutation stops changing, which headers cannot
        # predict: estimate the usual count, and show the cap beside it.
        cap = config.pacer["max_sweeps"]
        sweeps = min(cap, ALIGN_SWEEPS_EXPECTED)
        read = sum(u.align_read_bytes for u in units)
        flops = sum(u.align_flops for u in units)
        residual = graph.groups.get("residual")
        lap_residual = n_peers * acct.CPU.lap_coeff * residual.size ** 2.5 if residual else 0
        lap = sum(u.lap_seconds for u in units) + lap_residual
        seconds = {name: sweeps * (read / rate.disk_read + flops / rate.gemm_flops
                                   + lap * rate.lap_coeff / acct.CPU.lap_coeff)
                   for name, rate in (("cpu", acct.CPU), ("gpu", acct.GPU))}
        stages.append(StagePlan("align", sweeps, sweeps * read, 0, seconds, max_passes=cap))
    stages += [sample[n] for n in ("generate",) if n in sample]  # the run's order
    if consensus_read:  # PACER's statistics pass over every block's MLP and attention
        seconds = {dev: consensus_read / rate.disk_read + consensus_read / 2 / rate.merge_elems
                   for dev, rate in (("cpu", acct.CPU), ("gpu", acct.GPU))}
        stages.append(StagePlan("consensus", 1, consensus_read, 0, seconds))
    stages += [sample[n] for n in ("regmean",) if n in sample]
    passes = {"split_merge": list(SPLIT_PASSES)}.get(config.method, ["merge"])
    # Split-Merge's density (one number: it refuses per-tensor values) sizes η
    density = float(config.parameters.get("density", 1.0)) if config.method == "split_merge" \
        else 1.0
    cost = acct.merge_cost("linear" if config.method == "pacer" else config.method)
    for name in passes:
        # Split-Merge writes μ in its second pass and η (≤ 12 bytes per selected entry) last
        out = {"variance-low": write, "eta": int(min(3 * density, 1) * write * 2)}.get(
            name, 0 if name in SPLIT_PASSES else write)
        read = merge_read + (reread if name == "merge" else 0)
        seconds = {dev: read / rate.disk_read + out / rate.disk_write
                   + elems * cost / rate.merge_elems
                   for dev, rate in (("cpu", acct.CPU), ("gpu", acct.GPU))}
        stages.append(StagePlan(name, 1, read, out, seconds))
    if config.method == "pacer" and config.pacer["enable_moe_upcycle"] \
            and config.pacer["router_mode"] == "linear" and config.pacer["router"] is not None:
        # the router calibration reads back at most the blocks up to the last upcycled one
        seconds = {dev: write / rate.disk_read for dev, rate in (("cpu", acct.CPU),
                                                                 ("gpu", acct.GPU))}
        stages.append(StagePlan("calibrate", 1, write, 0, seconds))
    for s in stages:
        s.seconds = {k: round(v, 3) for k, v in s.seconds.items()}
    return stages


def _group_summary(graph: MergeGraph) -> list[dict]:
    summary: dict[tuple[str, int], dict] = {}
    for g in graph.groups.values():
        entry = summary.setdefault((g.kind, g.size), {"kind": g.kind, "size": g.size, "count": 0,
                                                      "problems": 0, "batch": list(g.batch)})
        entry["count"] += 1
        entry["problems"] += g.problems
    return list(summary.values())


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
                     f"{format_size(s.write_bytes):>12}{_duration(s.seconds['cpu']):>12}"
                     f"{_duration(s.seconds['gpu']):>12}")
    est = plan.est_seconds
    startup = _duration(acct.STARTUP_SECONDS)
    lines += [
        f"  {'start-up':<14}{'':>7}{'':>12}{'':>12}{startup:>12}{startup:>12}",
        f"  {'total':<14}{'':>7}{format_size(plan.read_bytes):>12}"
        f"{format_size(plan.write_bytes):>12}{_duration(est['cpu']):>12}{_duration(est['gpu']):>12}",
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
            f"{_duration(stage.seconds['cpu'] / stage.passes)} cpu")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise PacerError(f"--device must be cpu or cuda, got {device!r}")
    return device
