"""``method: split_merge``, streamed: four passes over the units, each resumable.

1. ``variance-high``  histogram of the high 16 bits of every position's variance;
2. ``variance-low``   histogram of the low bits inside the k-th value's bin, and μ's
                      tensors written into its shards' hidden partial files;
3. ``gram``           the n × n Gram matrix of the selected deviations (fp64) and how
                      many positions each tensor contributes; then the eigenpair;
4. ``eta``            η written to ``eta.safetensors`` (per tensor sparse or dense).

Then the finish, in an order that never shows a finished-looking folder early:
η and ``split_merge.json``, μ's shards renamed and checked, the index, side files,
the plan as run and the model card, and ``config.json`` last (a folder with one loads as
a model).

Each pass keeps its accumulators in a :class:`~pacer_stream.state.PassCheckpoint`
saved after every unit, so a killed run resumes at the unit it was in and writes
the same bytes. The math is in :mod:`pacer_stream.methods.split_merge`; nothing in
it depends on where slices are cut, so neither does the output (see ``_gram_ranges``).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from . import failpoints
from . import accounting as acct
from .errors import PacerError
from .executor import MergeJob
from .memory import RssMonitor, return_freed_memory
from .summary import RunSummary
from .export.dense import write_config
from .io.header import DTYPES
from .io.writer import OutTensor, ShardWriter, plan_shards, verify_shards, write_atomic
from .methods.sparsify import HIST_BINS, MagnitudeSelect, keep_count, threshold_mask
from .methods.split_merge import (ETA_FILE, ETA_FORMAT, INFO_FILE, Components, deviations,
                                  gram_group_rows, gram_slice_rows, group_counts, group_grams,
                                  sparse_is_smaller, twin_merge_params, variance_bits)
from .planner import SPLIT_PASSES as PASSES
from .state import PassCheckpoint, RunState



class SplitMergeJob(MergeJob):
    """Split-Merge of the plan's models (base-free: μ is their mean)."""

    def run(self) -> RunSummary:
        start = time.perf_counter()
        # the plan's checks (config.py) refuse a base model and a density outside (0, 1]
        self.density = float(self.config.parameters.get("density", 1.0))
        state = self._open_state()
        finished = [INFO_FILE, ETA_FILE, "config.json", *(s.file for s in self.shards)]
        if state.complete and all((self.out_dir / name).exists() for name in finished):
            self.summary.already_complete = True
            return self.summary
        self.float_names = [t for t in self.order if t in self.models.graph.nodes
                            and self.models.graph.nodes[t].info.is_float]
        self.numel = sum(self.anchor.tensors[t].numel for t in self.float_names)
        if self.numel == 0:
            raise PacerError("method split_merge: the models have no float weights to merge")
        self.k = keep_count(self.density, self.numel)
        self.ckpt = PassCheckpoint(state.group.require_group("split"))
        quiet = self.options.quiet or not sys.stderr.isatty()
        units = self.models.graph.units
        # units whose every pass an earlier run finished: nothing left to do for them
        self.summary.units_skipped = [u.name for u in units
                                      if state.is_done(f"{PASSES[-1]}/{u.name}")]
        with RssMonitor() as rss:
            self.mu_writer = ShardWriter(self.out_dir, self.shards)
            self._passes(state, quiet)
            self._finish_output(state, self.mu_writer)
            self.mu_writer.close()
        self.summary.peak_rss = rss.peak
        self.summary.seconds = time.perf_counter() - start
        state.mark_complete()
        return self.summary

    def _method_report(self) -> dict:
        info = json.loads((self.out_dir / INFO_FILE).read_text())  # written by the last pass
        return {"split_merge": {key: info[key] for key in ("k", "coefficients", "memory")}}

    # -- the passes ---------------------------------------------------------------------

    def _passes(self, state: RunState, quiet: bool) -> None:
        saved = self.ckpt.load()
        arrays, record = saved if saved else ({}, {"pass": PASSES[0], "next_unit": 0})
        units = self.models.graph.units
        while record["pass"] != "done":
            name = record["pass"]
            acc = self._start(name, arrays, record)
            with tqdm(total=len(units), initial=record["next_unit"], unit="unit",
                      desc=f"split_merge {name}", disable=quiet, file=sys.stderr) as bar:
                for i in range(record["next_unit"], len(units)):
                    self._unit(name, units[i], acc)
                    return_freed_memory()
                    record = {**record, "next_unit": i + 1, **acc.record()}
                    self.ckpt.save(acc.arrays(), record)
                    state.mark_done(f"{name}/{units[i].name}", {"pass": name})
                    if units[i].name not in self.summary.units_done:  # the summary's count
                        self.summary.units_done.append(units[i].name)
                    failpoints.hit("unit-done")
                    bar.update(1)
            arrays, record = self._end(name, acc, state, record)
            self.ckpt.save(arrays, record)

    def _start(self, name: str, arrays: dict, record: dict) -> "Accumulators":
        acc = Accumulators(len(self.models.models), self.numel, self.density)
        acc.restore(arrays, record)
        if name in ("gram", "eta"):  # every pass that selects starts with the same ties
            acc.ties_left = record.get("ties_left_at_unit", record["ties"])
        return acc

    def _end(self, name: str, acc: "Accumulators", state: RunState,
             record: dict) -> tuple[dict, dict]:
        nxt = PASSES[PASSES.index(name) + 1] if name != PASSES[-1] else "done"
        if name == "variance-low":
            self.mu_writer.sync()  # μ's shards stay hidden partial files until the finish
            threshold, ties = acc.select.cut() if not acc.select.keep_all else (-1, 0)
            record.update(threshold=threshold, ties=ties)
        if name == "gram":
            parts = self._components(acc.gram)
            record.update(eigenvalue=parts.eigenvalue, combination=parts.combination,
                          coefficients=parts.coefficients)
        if name == "eta":
            self._finish_eta(record)
        record = {**record, "pass": nxt, "next_unit": 0}
        record.pop("ties_left_at_unit", None)
        return acc.arrays(), record

    def _components(self, gram: np.ndarray) -> Components:
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

    def _gram_ranges(self, name: str) -> list[tuple[int, int]]:
        """Row slices for the Gram pass: whole fixed row groups, so G sums the same way
        under any budget (a slice never splits a group; at least one group a slice)."""
        plan = self.reads.slices(name, split_copies(len(self.inputs)))
        info = self.anchor.tensors[name]
        rows = gram_slice_rows(plan.rows, plan.total_rows, acct.row_numel(info.shape))
        return [(r, min(r + rows, plan.total_rows)) for r in range(0, plan.total_rows, rows)]

    def _unit(self, name: str, unit, acc: "Accumulators") -> None:
        """One unit of one pass; the μ pass also writes its non-float and passthrough tensors."""
        graph = self.models.graph
        for tensor in (*unit.tensors, *unit.passthrough):
            if tensor not in self.float_names:
                if name == "variance-low":
                    copies = [self.reads.read_model(k, tensor, None) for k in range(len(self.inputs))]
                    self.reads.check_equal(tensor, copies)
                    self.summary.read_bytes += sum(c.numel() * c.element_size() for c in copies)
                    self.mu_writer.write(tensor, copies[0])
                continue
            offset = 0
            info = graph.nodes[tensor].info
            row_numel = acct.row_numel(info.shape)
            ranges = self._gram_ranges(tensor) if name == "gram" else \
                self.reads.ranges(tensor, split_copies(len(self.inputs)))
            for rows in ranges:
                x, _ = self.reads.load(tensor, rows, check=name == PASSES[0])
                self.summary.read_bytes += self.reads.nbytes(tensor, rows)
                mu, delta = deviations(x)
                bits = variance_bits(delta)
                if name == "variance-high":
                    acc.select.observe_high(bits)
                elif name == "variance-low":
                    acc.select.observe_low(bits)
                    out = DTYPES[self.out[tensor].dtype][0]
                    self.mu_writer.write(tensor, mu.to(out).cpu().reshape(
                        rows[1] - rows[0], *info.shape[1:]) if info.shape else
                        mu.to(out).cpu().reshape(()), first_row=rows[0])
                else:
                    mask = acc.mask(bits)
                    selected = delta.reshape(delta.shape[0], -1)[:, mask]
                    if name == "gram":
                        group = gram_group_rows(row_numel) * row_numel
                        acc.add_gram(selected, group_counts(mask, group), tensor)
                    else:
                        where = torch.nonzero(mask).reshape(-1) + rows[0] * row_numel
                        offset = self._write_eta(tensor, selected, where, offset)
            if name == "eta":
                self._check_eta_count(tensor, offset)
        if name == "eta":
            self.eta_writer.sync()
        else:
            self.mu_writer.sync()

    # -- outputs -------------------------------------------------------------------------

    def _finish_output(self, state: RunState, writer: ShardWriter) -> None:
        """After every pass (η and split_merge.json are in place): μ's shards renamed and
        checked, index, side files, the plan as run, model card, config.json last; then
        the report.

        Each step can be repeated, so a run killed in the middle resumes here.
        """
        writer.finish_all()
        eta_shards = self.eta_writer.shards  # laid out from the saved record
        verify_shards(self.out_dir, eta_shards)
        failpoints.hit("split-finish")
        writer.write_index()
        self.describe_output(self.anchor.config)
        write_config(self.out_dir, self.anchor.config, self.out_dtype)
        self.summary.write_bytes = sum(s.size for s in (*self.shards, *eta_shards))
        self._write_report(state)

    def _eta_layout(self, record: dict) -> list[OutTensor]:
        out = []
        for name, nnz in sorted(record["nnz"].items(), key=lambda kv: self.order.index(kv[0])):
            info = self.anchor.tensors[name]
            if nnz == 0:
                continue
            if sparse_is_smaller(nnz, info.numel):
                out += [OutTensor(f"{name}::indices", "I64", (nnz,)),
                        OutTensor(f"{name}::values", "F32", (nnz,))]
            else:
                out.append(OutTensor(name, "F32", tuple(info.shape)))
        return out

    @property
    def eta_writer(self) -> ShardWriter:
        if getattr(self, "_eta_writer", None) is None:
            record = self.ckpt.load()[1]
            self.parts = Components(record["eigenvalue"], record["combination"],
                                    record["coefficients"])
            layout = self._eta_layout(record)
            self.eta_shard = plan_shards(layout, 1 << 62, stem="eta",
                                         metadata={"format": ETA_FORMAT})
            self._eta_writer = ShardWriter(self.out_dir, self.eta_shard)
            self.eta_dense = {t.name for t in layout if "::" not in t.name}
            self._eta_nnz = dict(record["nnz"])
        return self._eta_writer

    def _write_eta(self, name: str, selected: torch.Tensor, where: torch.Tensor,
                   offset: int) -> int:
        """η's values at flat positions ``where`` of ``name``; returns the next sparse offset."""
        if selected.shape[1] == 0:
            return offset
        writer = self.eta_writer
        values = self.parts.eta(selected).cpu()
        if name in self.eta_dense:  # whole tensor dense: scatter this slice's values
            info = self.anchor.tensors[name]
            row_numel = acct.row_numel(info.shape)
            first = int(where[0]) // row_numel
            last = int(where[-1]) // row_numel + 1
            block = torch.zeros((last - first) * row_numel, dtype=torch.float32)
            block[where.cpu() - first * row_numel] = values
            writer.write(name, block.reshape(last - first, *info.shape[1:]) if info.shape
                         else block.reshape(()), first_row=first)
            return offset
        writer.write(f"{name}::indices", where.cpu().to(torch.int64), first_row=offset)
        writer.write(f"{name}::values", values, first_row=offset)
        return offset + len(values)

    def _check_eta_count(self, name: str, written: int) -> None:
        """A sparse η tensor must get exactly the entries the Gram pass counted."""
        if f"{name}::values" in self.eta_writer.where and written != self._eta_nnz[name]:
            raise AssertionError(f"{name}: wrote {written} η entries, the Gram pass counted "
                                 f"{self._eta_nnz[name]}")

    def _finish_eta(self, record: dict) -> None:
        """η renamed into place and checked, then split_merge.json (both can be repeated)."""
        writer = self.eta_writer
        writer.sync()
        writer.finish_all()
        writer.close()
        shapes = [tuple(self.anchor.tensors[t].shape) for t in self.float_names]
        n = len(self.models.models)
        split_params = self.numel + self.k + n
        info = {
            "method": "split_merge", "density": self.density, "k": self.k, "numel": self.numel,
            "models": [m.label for m in self.models.models],
            "coefficients": record["coefficients"], "eigenvalue": record["eigenvalue"],
            "sign_convention": "the largest |c_t| is positive (ties: lowest t)",
            "eta": ETA_FILE,
            "eta_bytes": sum(s.size for s in self.eta_shard),
            "mu_bytes": sum(s.size for s in self.shards),
            "memory": {
                "split_merge_params": split_params,
                "extra_over_one_model": (split_params - self.numel) / self.numel,
                "extra_bytes_on_disk": sum(s.size for s in self.eta_shard),
                "twin_merge_params": {str(r): twin_merge_params(shapes, n, r) for r in (2, 16)},
                "efficiency_ratio": {str(r): split_params / twin_merge_params(shapes, n, r)
                                     for r in (2, 16)},
            },
        }
        write_atomic(self.out_dir / INFO_FILE, json.dumps(info, indent=1) + "\n")
        failpoints.hit("split-finish")


def split_copies(n: int) -> int:
    """fp32 copies of a slice a Split-Merge pass holds: the n deviations, their squares
    (variance), and the selected deviations with their fp64 chunks (gram, eta)."""
    return 2 * n + 2


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

