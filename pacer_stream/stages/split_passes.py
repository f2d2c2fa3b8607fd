"""``method: split_merge``, streamed: four passes over the units, each resumable.

1. ``variance-high``  histogram of the high 16 bits of every position's variance;
2. ``variance-low``   histogram of the low bits inside the k-th value's bin, and μ's
                      tensors written into its shards' hidden partial files;
3. ``gram``           the n × n Gram matrix of the selected deviations (fp64) and how
                      many positions each tensor contributes; then the eigenpair;
4. ``eta``            η written to ``eta.safetensors`` (per tensor sparse or dense).

Each pass keeps its accumulators in a :class:`~pacer_stream.state.PassCheckpoint`
saved after every unit, so a killed run resumes at the unit it was in and writes the
same bytes. A pass carries its accumulators (and the ties still to keep at the
threshold) from unit to unit in order, so its units run one after another in the
driver whatever the backend. The math is in :mod:`pacer_stream.methods.split_merge`;
nothing in it depends on where slices are cut, so neither does the output (see
``gram_ranges``). The finish is split_finish.py.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import accounting as acct
from .. import failpoints
from ..errors import PacerError
from ..io.header import DTYPES
from ..io.writer import ShardWriter
from ..job import MergeContext
from ..memory import return_freed_memory
from ..methods.sparsify import HIST_BINS, MagnitudeSelect, keep_count, threshold_mask
from ..methods.split_merge import (Components, deviations, gram_group_rows, gram_slice_rows,
                                   group_counts, group_grams, variance_bits)
from ..planner import SPLIT_PASSES as PASSES
from ..state import PassCheckpoint
from .split_eta import EtaWriter, finish_eta


class SplitRun:
    """What the passes of one Split-Merge share: the float tensors, k, the checkpoint, and
    the writers of μ's shards and η."""

    def __init__(self, ctx: MergeContext, state) -> None:
        # the plan's checks (config.py) refuse a base model and a density outside (0, 1]
        self.density = float(ctx.config.parameters.get("density", 1.0))
        self.float_names = float_names(ctx)
        self.numel = sum(ctx.anchor.tensors[t].numel for t in self.float_names)
        if self.numel == 0:
            raise PacerError("method split_merge: the models have no float weights to merge")
        self.k = keep_count(self.density, self.numel)
        self.ckpt = PassCheckpoint(state.group.require_group("split"))
        self.mu_writer = ShardWriter(ctx.out_dir, ctx.shards)
        self.eta = EtaWriter(ctx, self.ckpt)
        # units whose every pass an earlier run finished: nothing left to do for them
        ctx.summary.units_skipped = [u.name for u in ctx.models.graph.units
                                     if state.is_done(f"{PASSES[-1]}/{u.name}")]


def float_names(ctx: MergeContext) -> list[str]:
    """The tensors Split-Merge splits (μ and η); the rest are copied."""
    nodes = ctx.models.graph.nodes
    return [t for t in ctx.order if t in nodes and nodes[t].info.is_float]


def split_run(ctx: MergeContext, state) -> SplitRun:
    if getattr(ctx, "split", None) is None:
        ctx.split = SplitRun(ctx, state)
    return ctx.split


class SplitPass:
    """One of the four passes (``PASSES``), over every unit in order."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, ctx: MergeContext, runner) -> None:
        run = split_run(ctx, runner.state)
        saved = run.ckpt.load()
        arrays, record = saved if saved else ({}, {"pass": PASSES[0], "next_unit": 0})
        if record["pass"] == "done" or PASSES.index(record["pass"]) > PASSES.index(self.name):
            return  # an earlier attempt finished this pass
        units = ctx.models.graph.units
        acc = self._start(ctx, run, arrays, record)
        first = record["next_unit"]
        with runner.progress(len(units), f"split_merge {self.name}", initial=first) as bar:
            for i, _ in enumerate(self._units(ctx, runner, run, acc, units[first:]), first):
                return_freed_memory()
                record = {**record, "next_unit": i + 1, **acc.record()}
                run.ckpt.save(acc.arrays(), record)
                runner.state.mark_done(f"{self.name}/{units[i].name}", {"pass": self.name})
                if units[i].name not in ctx.summary.units_done:  # the summary's count
                    ctx.summary.units_done.append(units[i].name)
                failpoints.hit("unit-done")
                bar.update(1)
        arrays, record = self._end(ctx, run, acc, record)
        run.ckpt.save(arrays, record)

    def _units(self, ctx: MergeContext, runner, run: SplitRun, acc: "Accumulators", todo):
        """Each unit of the pass, done in order into ``acc`` (one yield a unit). The variance
        passes carry nothing from unit to unit but sums: their units run wherever the
        backend runs them."""
        if self.name not in MAPPED:
            for unit in todo:
                self._unit(ctx, run, unit, acc)
                yield
            return
        if self.name == "variance-low":
            acc.select.find_bin()  # from the whole high histogram
        shared = {"pass": self.name, "numel": run.numel, "density": run.density,
                  "bin": acc.select.bin, "k_in_bin": acc.select.k_in_bin}
        memory = max((variance_memory(ctx, u) for u in todo), default=0)
        for hist in runner.backend.map_calls(variance_share, ctx, [u.name for u in todo],
                                             shared, memory, self.name):
            acc.add_histogram(self.name, hist)
            yield

    def _start(self, ctx: MergeContext, run: SplitRun, arrays: dict,
               record: dict) -> "Accumulators":
        acc = Accumulators(len(ctx.models.models), run.numel, run.density)
        acc.restore(arrays, record)
        if self.name in ("gram", "eta"):  # every pass that selects starts with the same ties
            acc.ties_left = record.get("ties_left_at_unit", record["ties"])
        return acc

    def _end(self, ctx: MergeContext, run: SplitRun, acc: "Accumulators",
             record: dict) -> tuple[dict, dict]:
        nxt = PASSES[PASSES.index(self.name) + 1] if self.name != PASSES[-1] else "done"
        if self.name == "variance-low":
            run.mu_writer.sync()  # μ's shards stay hidden partial files until the finish
            threshold, ties = acc.select.cut() if not acc.select.keep_all else (-1, 0)
            record.update(threshold=threshold, ties=ties)
        if self.name == "gram":
            parts = components(acc.gram)
            record.update(eigenvalue=parts.eigenvalue, combination=parts.combination,
                          coefficients=parts.coefficients)
        if self.name == "eta":
            finish_eta(ctx, run, record)
        record = {**record, "pass": nxt, "next_unit": 0}
        record.pop("ties_left_at_unit", None)
        return acc.arrays(), record

    def _unit(self, ctx: MergeContext, run: SplitRun, unit, acc: "Accumulators") -> None:
        """One unit of the gram or eta pass, which keep the ties left at the threshold from
        unit to unit."""
        name, reads = self.name, ctx.reads
        copies = split_copies(len(ctx.inputs))
        for tensor in (*unit.tensors, *unit.passthrough):
            if tensor not in run.float_names:
                continue  # written by the variance-low pass
            offset = 0
            info = ctx.models.graph.nodes[tensor].info
            row_numel = acct.row_numel(info.shape)
            ranges = gram_ranges(ctx, tensor) if name == "gram" else reads.ranges(tensor, copies)
            for rows in ranges:
                x, _ = reads.load(tensor, rows, check=False)
                ctx.summary.read_bytes += reads.nbytes(tensor, rows)
                _, delta = deviations(x)
                mask = acc.mask(variance_bits(delta))
                selected = delta.reshape(delta.shape[0], -1)[:, mask]
                if name == "gram":
                    group = gram_group_rows(row_numel) * row_numel
                    acc.add_gram(selected, group_counts(mask, group), tensor)
                else:
                    where = torch.nonzero(mask).reshape(-1) + rows[0] * row_numel
                    offset = run.eta.write(tensor, selected, where, offset)
            if name == "eta":
                run.eta.check_count(tensor, offset)
        if name == "eta":
            run.eta.writer.sync()


MAPPED = ("variance-high", "variance-low")  # passes whose units share nothing but sums


def variance_share(ctx: MergeContext, shared: dict, unit_name: str) -> np.ndarray | None:
    """One unit of a variance pass, in any process: its histogram (None when every
    position is kept). The low pass also writes the unit's μ and its non-float and
    passthrough tensors (the copies of every input, checked equal)."""
    name, reads, floats = shared["pass"], ctx.reads, set(float_names(ctx))
    select = MagnitudeSelect(shared["numel"], shared["density"])
    select.bin, select.k_in_bin = shared["bin"], shared["k_in_bin"]
    unit = next(u for u in ctx.models.graph.units if u.name == unit_name)
    writer = ShardWriter(ctx.out_dir, ctx.shards) if name == "variance-low" else None
    for tensor in (*unit.tensors, *unit.passthrough):
        if tensor not in floats:
            if writer is not None:
                raw = [reads.read_model(k, tensor, None) for k in range(len(ctx.inputs))]
                reads.check_equal(tensor, raw)
                ctx.summary.read_bytes += sum(c.numel() * c.element_size() for c in raw)
                writer.write(tensor, raw[0])
            continue
        info = ctx.models.graph.nodes[tensor].info
        for rows in reads.ranges(tensor, split_copies(len(ctx.inputs))):
            x, _ = reads.load(tensor, rows, check=name == PASSES[0])
            ctx.summary.read_bytes += reads.nbytes(tensor, rows)
            mu, delta = deviations(x)
            bits = variance_bits(delta)
            if writer is None:
                select.observe_high(bits)
                continue
            select.observe_low(bits)
            out = DTYPES[ctx.output.out[tensor].dtype][0]
            writer.write(tensor, mu.to(out).cpu().reshape(rows[1] - rows[0], *info.shape[1:])
                         if info.shape else mu.to(out).cpu().reshape(()), first_row=rows[0])
    if writer is not None:
        writer.sync()  # μ's shards stay hidden partial files until the finish
        writer.close()
    hist = select.high if writer is None else select.low
    return hist.numpy() if isinstance(hist, torch.Tensor) else None


def variance_memory(ctx: MergeContext, unit) -> int:
    """What a variance pass's unit needs: the process and its largest slice's copies."""
    copies = split_copies(len(ctx.inputs))
    return acct.PROCESS_BASE_BYTES + max(
        (ctx.reads.slices(t, copies).bytes for t in unit.tensors
         if ctx.models.graph.nodes[t].info.is_float), default=0)


def components(gram: np.ndarray) -> Components:
    """The eigenpair of G, refused when it is not finite (NaN or Inf merged in)."""
    if not np.isfinite(gram).all():
        raise PacerError("split_merge: the Gram matrix of the selected deviations holds NaN "
                         "or Inf (from inputs merged with --allow-nonfinite); the "
                         "coefficients need finite weights: fix the checkpoints")
    parts = Components.from_gram(torch.tensor(gram))
    if not parts.is_finite():
        raise PacerError(f"split_merge: the top eigenpair of the Gram matrix is not finite "
                         f"(eigenvalue {parts.eigenvalue}); check the inputs' weights")
    return parts


def gram_ranges(ctx: MergeContext, name: str) -> list[tuple[int, int]]:
    """Row slices for the Gram pass: whole fixed row groups, so G sums the same way
    under any budget (a slice never splits a group; at least one group a slice)."""
    plan = ctx.reads.slices(name, split_copies(len(ctx.inputs)))
    info = ctx.anchor.tensors[name]
    rows = gram_slice_rows(plan.rows, plan.total_rows, acct.row_numel(info.shape))
    return [(r, min(r + rows, plan.total_rows)) for r in range(0, plan.total_rows, rows)]


split_copies = acct.split_copies


class Accumulators:
    """What a pass carries from unit to unit (and into the checkpoint)."""

    def __init__(self, n: int, numel: int, density: float) -> None:
        self.select = MagnitudeSelect(numel, density)
        self.gram = np.zeros((n, n))
        self.nnz: dict[str, int] = {}
        self.threshold = -1
        self.ties_left = 0

    def restore(self, arrays: dict, record: dict) -> None:
        if "high" in arrays:
            self.select.high = torch.from_numpy(arrays["high"])
        if "low" in arrays:
            self.select.low = torch.from_numpy(arrays["low"])
        if "gram" in arrays:
            self.gram = np.array(arrays["gram"])
        self.nnz = dict(record.get("nnz", {}))
        if record.get("bin") is not None:
            self.select.bin, self.select.k_in_bin = record["bin"], record["k_in_bin"]
        self.threshold = record.get("threshold", -1)

    def arrays(self) -> dict:
        out = {"gram": self.gram}
        for key in ("high", "low"):
            hist = getattr(self.select, key)
            out[key] = hist.numpy() if isinstance(hist, torch.Tensor) else np.zeros(
                HIST_BINS, dtype=np.int64)
        return out

    def record(self) -> dict:
        return {"nnz": self.nnz, "bin": self.select.bin, "k_in_bin": self.select.k_in_bin,
                "ties_left_at_unit": self.ties_left}

    def add_histogram(self, name: str, hist: np.ndarray | None) -> None:
        """A unit's histogram from :func:`variance_share` into the pass's (integer sums:
        the same whatever the order or the process)."""
        if hist is None:
            return
        key = "high" if name == "variance-high" else "low"
        setattr(self.select, key, getattr(self.select, key) + torch.tensor(hist))

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        if self.select.keep_all:
            return torch.ones(bits.shape, dtype=torch.bool, device=bits.device)
        keep, self.ties_left = threshold_mask(bits, self.threshold, self.ties_left)
        return keep

    def add_gram(self, selected: torch.Tensor, counts: list[int], tensor: str) -> None:
        """Add the Gram matrices of a slice's row groups (``counts``: selected columns per
        group) to G one group at a time, in row order: the same sums under any slicing."""
        for partial in group_grams(selected, counts).numpy():
            self.gram += partial
        self.nnz[tensor] = self.nnz.get(tensor, 0) + selected.shape[1]
