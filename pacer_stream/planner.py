"""The plan: stages, per-unit costs, peak RAM, disk traffic and time, from headers alone.

``make_plan`` walks the merge graph once. For every unit, plan_units.py counts the bytes
each stage reads and writes, the working set (see :mod:`accounting`), the FLOPs of the
alignment cost GEMMs and the LAP solves; here the units' figures become the stages, in the
run's order (passes, traffic, seconds on the CPU and the GPU), and the verdict whether the
budget fits. The figures and the text report are plan_report.py. Nothing here reads
tensor data.
"""

from __future__ import annotations

import psutil

from . import accounting as acct
from .config_schema import PlanConfig
from .errors import PacerError
from .export.moe import moe_model_type
from .graph import MergeGraph
from .inputs import ModelSet
from .plan_report import Plan, StagePlan, UnitPlan
from .plan_units import out_bytes, unit_plan
# (the methods, the sample stages and the llama.cpp layout are imported where a plan uses
# them: reading headers and planning a dense merge never imports torch)
from .sizes import at_least, format_size

SPLIT_PASSES = ("variance-high", "variance-low", "gram", "eta")  # see stages/split_passes.py
# Alignment sweeps a plan estimates: fine-tunes of one base converge after 1, a permuted
# copy after 2 (find, confirm); up to 7 measured only for near-random tiny models.
ALIGN_SWEEPS_EXPECTED = 2

OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


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
    units = [unit_plan(unit, graph, models, config, out_dtype, budget, aligning)
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
    stages = stage_plans(config, units, n_peers, graph, aligning, consensus_read, generates)
    peak = max(units, key=lambda u: u.ram_bytes)
    neediest = max(units, key=lambda u: u.min_need_bytes)
    write_max = sum(s.write_bytes for s in stages)
    # the MLP weights of each block, which upcycling copies into experts
    mlp_out = [sum(out_bytes(graph.nodes[t].info, out_dtype) for t in u.tensors
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


def stage_plans(config: PlanConfig, units: list[UnitPlan], n_peers: int, graph: MergeGraph,
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


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise PacerError(f"--device must be cpu or cuda, got {device!r}")
    return device
