"""One unit's costs, from headers alone: the bytes its merge and alignment read and its
output writes, each pass's working set over each tensor (accounting.py), the row slices
the budget calls for, the alignment's cost-GEMM FLOPs and LAP solves, and the smallest
working set the unit can run in.

The passes are the executor's (:func:`_tensor_works` mirrors it); methods and the Split-Merge passes
are imported where a plan uses them, so a dense plan stays torch-free.
"""

from __future__ import annotations

from . import accounting as acct
from .config_schema import PlanConfig
from .graph import GLOBAL, MergeGraph, Unit
from .inputs import ModelSet
from .io.header import ITEMSIZE, TensorInfo
from .plan_report import UnitPlan

EXPERT_ROLES = ("mlp.gate", "mlp.up", "mlp.down", "mlp.gate.bias", "mlp.up.bias",
                "mlp.down.bias")  # an expert is a whole MLP block, biases included


def out_bytes(info: TensorInfo, out_dtype: str | None) -> int:
    dtype = out_dtype if (out_dtype and info.is_float) else info.dtype
    return info.numel * ITEMSIZE[dtype]


def unit_plan(unit: Unit, graph: MergeGraph, models: ModelSet, config: PlanConfig,
              out_dtype: str | None, budget: int, aligning: bool) -> UnitPlan:
    inputs, n_models = models.all, len(models.models)
    n_peers = len(inputs) - 1
    names = unit.tensors + unit.passthrough
    merge_read = sum(m.tensors[t].nbytes for m in inputs for t in names)
    permuted = [t for t in unit.tensors if graph.nodes[t].groups]
    align_read = sum(m.tensors[t].nbytes for m in inputs[:n_models] for t in permuted)
    write = sum(out_bytes(inputs[0].tensors[t], out_dtype) for t in names)
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
