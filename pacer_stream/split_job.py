"""``method: split_merge``, streamed: four passes over the units, each resumable.

1. ``variance-high``  histogram of the high 16 bits of every position's variance;
2. ``variance-low``   histogram of the low bits inside the k-th value's bin, and μ is
                      written (a normal checkpoint: shards, index, config);
3. ``gram``           the n × n Gram matrix of the selected deviations (fp64) and how
                      many positions each tensor contributes; then the eigenpair;
4. ``eta``            η written to ``eta.safetensors`` (per tensor sparse or dense).

Each pass keeps its accumulators in a :class:`~pacer_stream.state.PassCheckpoint`
saved after every unit, so a killed run resumes at the unit it was in and writes
the same bytes. The math is in :mod:`pacer_stream.methods.split_merge`.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from . import failpoints
from .errors import PacerError
from .executor import MergeJob, RssMonitor, RunSummary, return_freed_memory
from .export.dense import copy_side_files, model_card, write_card, write_config
from .io.header import DTYPES
from .io.writer import OutTensor, ShardWriter, plan_shards, write_atomic
from .methods.sparsify import HIST_BINS, MagnitudeSelect, keep_count, threshold_mask
from .methods.split_merge import (ETA_FILE, ETA_FORMAT, INFO_FILE, Components, deviations,
                                  sparse_is_smaller, twin_merge_params, variance_bits)
from .planner import SPLIT_PASSES as PASSES
from .state import PassCheckpoint, RunState



class SplitMergeJob(MergeJob):
    """Split-Merge of the plan's models (base-free: μ is their mean)."""

    def run(self) -> RunSummary:
        start = time.perf_counter()
        if self.models.base is not None:
            raise PacerError("method split_merge is base-free (μ is the models' mean); remove "
                             "base_model from the plan")
        state = self._open_state()
        if state.complete and (self.out_dir / INFO_FILE).exists():
            self.summary.already_complete = True
            return self.summary
        self.density = float(self.config.parameters.get("density", 1.0))
        if not 0 < self.density <= 1:
            raise PacerError(f"parameters.density must be in (0, 1], got {self.density}")
        self.float_names = [t for t in self.order if t in self.models.graph.nodes
                            and self.models.graph.nodes[t].info.is_float]
        self.numel = sum(self.anchor.tensors[t].numel for t in self.float_names)
        self.k = keep_count(self.density, self.numel)
        self.ckpt = PassCheckpoint(state.group.require_group("split"))
        quiet = self.options.quiet or not sys.stderr.isatty()
        with RssMonitor() as rss:
            self.mu_writer = ShardWriter(self.out_dir, self.shards)
            self._passes(state, quiet)
            self.mu_writer.close()
        self.summary.peak_rss = rss.peak
        self.summary.seconds = time.perf_counter() - start
        self._write_report(state)
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
                    if name == "variance-low":
                        self._finish_mu_shards(state)
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
            self.mu_writer.sync()
            self._finish_mu_shards(state)
            self._finish_mu()
            threshold, ties = acc.select.cut() if not acc.select.keep_all else (-1, 0)
            record.update(threshold=threshold, ties=ties)
        if name == "gram":
            parts = Components.from_gram(torch.tensor(acc.gram))
            record.update(eigenvalue=parts.eigenvalue, combination=parts.combination,
                          coefficients=parts.coefficients)
        if name == "eta":
            self._finish_eta(record)
        record = {**record, "pass": nxt, "next_unit": 0}
        record.pop("ties_left_at_unit", None)
        return acc.arrays(), record

    def _unit(self, name: str, unit, acc: "Accumulators") -> None:
        """One unit of one pass; the μ pass also writes its non-float and passthrough tensors."""
        graph = self.models.graph
        for tensor in (*unit.tensors, *unit.passthrough):
            if tensor not in self.float_names:
                if name == "variance-low":
                    copies = [self._read_model(k, tensor, None) for k in range(len(self.inputs))]
                    self._check_equal(tensor, copies)
                    self.mu_writer.write(tensor, copies[0])
                continue
            offset = 0
            info = graph.nodes[tensor].info
            row_numel = info.numel // info.shape[0] if info.shape else 1
            for rows in self._ranges(tensor, split_copies(len(self.inputs))):
                x, _ = self._load(tensor, rows, check=name == PASSES[0])
                self.summary.read_bytes += self._nbytes(tensor, rows)
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
                        acc.add_gram(selected, tensor)
                    else:
                        where = torch.nonzero(mask).reshape(-1) + rows[0] * row_numel
                        offset = self._write_eta(tensor, selected, where, offset)
        if name == "eta":
            self.eta_writer.sync()
        else:
            self.mu_writer.sync()

    # -- outputs -------------------------------------------------------------------------

    def _finish_mu_shards(self, state: RunState) -> None:
        """Rename μ's shards whose units the μ pass has finished."""
        for shard in self.shards:
            ready = all(state.is_done(f"variance-low/{self.recipe_unit[t.name]}")
                        for t in shard.tensors)
            if ready and (self.out_dir / shard.partial).exists():
                self.mu_writer.finish(shard)

    def _finish_mu(self) -> None:
        self.mu_writer.write_index()
        write_config(self.out_dir, self.anchor.config, self.out_dtype)
        copy_side_files(self.out_dir, self.anchor)
        write_card(self.out_dir, model_card(self.config, self.models.models,
                                            self.models.spec.family, self._param_record()))

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
            row_numel = info.numel // info.shape[0] if info.shape else 1
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

    def _finish_eta(self, record: dict) -> None:
        writer = self.eta_writer
        writer.sync()
        for shard in self.eta_shard:
            writer.finish(shard)
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
        self.summary.write_bytes = info["eta_bytes"] + info["mu_bytes"]


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

    def add_gram(self, selected: torch.Tensor, tensor: str) -> None:
        part = selected.double()
        self.gram += (part @ part.T).cpu().numpy()
        self.nnz[tensor] = self.nnz.get(tensor, 0) + selected.shape[1]

