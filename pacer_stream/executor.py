"""The executor: stream a merge unit by unit, inside the memory budget, resumably.

For each unit of the merge graph, in file order, and each of its tensors:
read the N copies (row slices when the accounting says so, the next read
overlapping the current compute), check them, merge them in fp32 on the chosen
device, cast, and write them into their precomputed shard slots. When a unit's
tensors are all written, its shards are fsynced and the unit is marked done in
the RunState; a shard whose units are all done is renamed into place. A re-run
skips finished units and writes the same bytes.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from . import __version__
from . import accounting as acct
from . import failpoints
from .config import PlanConfig
from .errors import PacerError
from .export.dense import copy_side_files, model_card, write_card, write_config
from .align.stage import AlignStage
from .graph import Unit, source_index
from .inputs import ModelSet
from .io.header import DTYPES
from .io.reader import CheckpointIndex
from .io.sources import parse_ref
from .io.writer import OutTensor, ShardWriter, plan_shards, write_atomic
from .methods.dense import METHODS, MethodParams, TensorMerge
from .planner import OUT_DTYPES, default_budget
from .sizes import format_size
from .state import STATE_DIR, RunState, fingerprint

REPORT = "pacer_report.json"


@dataclass
class RunOptions:
    budget: int | None = None
    device: str = "cpu"
    shard_size: int | None = None
    state_dir: Path | None = None
    restart: bool = False
    force: bool = False
    quiet: bool = False
    allow_nonfinite: bool = False


@dataclass
class RunSummary:
    out_dir: Path
    seconds: float = 0.0
    read_bytes: int = 0
    write_bytes: int = 0
    peak_rss: int = 0
    budget: int = 0
    units_done: list[str] = field(default_factory=list)
    units_skipped: list[str] = field(default_factory=list)
    already_complete: bool = False
    align: dict | None = None  # the report's "align" section, when the run aligned

    def align_lines(self) -> list[str]:
        """One line per aligned peer: sweeps, what moved per group kind, certificate hits."""
        lines = []
        for label, peer in (self.align or {}).get("peers", {}).items():
            kinds = ", ".join(f"{kind} {k['moved'] / k['slots']:.0%}" if k["slots"] else kind
                              for kind, k in sorted(peer["kinds"].items()))
            problems = sum(k["problems"] for k in peer["kinds"].values())
            certified = sum(k["certified"] for k in peer["kinds"].values())
            lines.append(f"aligned {label}: {peer['sweeps']} sweep(s), moved {kinds}; "
                         f"{certified}/{problems} assignments certified identity; objective "
                         f"{peer['objective_before']:.4g} -> {peer['objective_after']:.4g}")
        return lines

    def line(self) -> str:
        if self.already_complete:
            return f"{self.out_dir}: already complete, nothing to do"
        rate = self.read_bytes / self.seconds if self.seconds > 0 else 0.0
        skipped = f", {len(self.units_skipped)} resumed" if self.units_skipped else ""
        return (f"merged {len(self.units_done)} units{skipped} in {self.seconds:.1f} s: read "
                f"{format_size(self.read_bytes)} ({format_size(rate)}/s), wrote "
                f"{format_size(self.write_bytes)}, peak RSS {format_size(self.peak_rss)} "
                f"(budget {format_size(self.budget)}) -> {self.out_dir}")


class RssMonitor:
    """Samples this process's RSS in the background; ``peak`` is the highest seen."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(interval)

    def __enter__(self) -> "RssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, peak_rss())


def peak_rss() -> int:
    """The kernel's high-water mark of this process's RSS (catches spikes between samples).

    VmHWM belongs to the current address space, so unlike ``ru_maxrss`` it does not
    inherit the RSS of the parent that forked this process.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_merge(config: PlanConfig, options: RunOptions) -> RunSummary:
    """Run a dense merge described by ``config``."""
    method, parameters = config.method, config.parameters
    if method == "pacer":
        if config.pacer["enable_moe_upcycle"]:
            raise PacerError("method pacer: MoE upcycling is not available in `run` yet; set "
                             "pacer.enable_moe_upcycle: false for PACER's aligned dense merge")
        # PACER's dense path: consensus pseudo-base (or the base), DARE drop, TIES election
        method = "dare_ties"
        parameters = {"density": 1.0 - config.pacer["dropout_rate"], **parameters}
    if method not in METHODS:
        raise PacerError(f"method {method!r} is not available in `run` yet "
                         f"(available: pacer, {', '.join(METHODS)})")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise PacerError("--device cuda: no CUDA device is available; use --device cpu")
    models = ModelSet.from_plan(config)
    params = MethodParams.resolve(method, config.models, parameters, config.seed)
    job = MergeJob(config, models, params, options)
    return job.run()


class MergeJob:
    def __init__(self, config: PlanConfig, models: ModelSet, params: MethodParams,
                 options: RunOptions) -> None:
        self.config, self.models, self.params, self.options = config, models, params, options
        self.budget = options.budget or default_budget()
        self.out_dir = config.output.path
        self.device = torch.device(options.device)
        self.anchor = models.models[0]
        self.inputs: list[CheckpointIndex] = models.models + (
            [models.base] if models.base is not None else [])
        out_dtype = OUT_DTYPES.get(config.output.dtype)
        self.out = {name: OutTensor(name, _out_dtype(info.dtype, out_dtype), info.shape)
                    for name, info in self.anchor.tensors.items()}
        self.out_dtype = out_dtype
        self.order = [t for u in models.graph.units for t in (*u.tensors, *u.passthrough)]
        shard_size = options.shard_size or config.output.shard_size
        self.shards = plan_shards([self.out[t] for t in self.order], shard_size)
        self.unit_of = {t: u.name for u in models.graph.units for t in (*u.tensors, *u.passthrough)}
        self.summary = RunSummary(self.out_dir, budget=self.budget)
        self.perms: dict[int, dict[str, torch.Tensor]] = {}  # by input index, once aligned
        self.align_report: dict | None = None

    # -- set-up -----------------------------------------------------------------

    def _fingerprint(self) -> str:
        return fingerprint({
            "tool": __version__, "method": self.config.method, "params": self._param_record(),
            "seed": self.config.seed, "output_dtype": self.config.output.dtype,
            "align": [self.config.align, str(self.config.pacer["anchor_strategy"]),
                      self.config.pacer["max_sweeps"]],
            "shards": [[s.file, [t.name for t in s.tensors]] for s in self.shards],
            "inputs": [{"ref": m.label, "config": m.config,
                        "tensors": {n: [i.file, i.dtype, list(i.shape), i.begin, i.end]
                                    for n, i in sorted(m.tensors.items())}}
                       for m in self.inputs],
        })

    def _param_record(self) -> dict:
        p = self.params
        return {"weights": list(p.weights), "densities": list(p.densities), "lambda": p.lam,
                "normalize": p.normalize, "rescale": p.rescale, "base_free": self.models.base is None}

    def _open_state(self) -> RunState:
        state_path = self.options.state_dir or (self.out_dir / STATE_DIR)
        ours = state_path.exists()
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise PacerError(f"output path {self.out_dir} exists and is not a folder")
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not ours:
            if not self.options.force:
                raise PacerError(f"output folder {self.out_dir} is not empty and holds no "
                                 "pacer-stream run; choose another output path or pass --force "
                                 "to overwrite it")
            _clear(self.out_dir, keep=state_path)
        if self.options.restart:
            _clear(self.out_dir, keep=None) if self.out_dir.exists() else None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return RunState.open(state_path, self._fingerprint(), restart=self.options.restart)

    # -- the run ----------------------------------------------------------------

    def run(self) -> RunSummary:
        start = time.perf_counter()
        state = self._open_state()
        if state.complete and all((self.out_dir / s.file).exists() for s in self.shards):
            self.summary.already_complete = True
            return self.summary
        state.group.attrs["attempts"] = attempt = int(state.group.attrs.get("attempts", 0)) + 1
        writer = ShardWriter(self.out_dir, self.shards)
        units = self.models.graph.units
        todo = [u for u in units if not state.is_done(u.name)]
        self.summary.units_skipped = [u.name for u in units if state.is_done(u.name)]
        self._finish_ready_shards(state, writer)
        quiet = self.options.quiet or not sys.stderr.isatty()
        if self.config.align:
            self._align(state, quiet)
        if self.config.align == "only":
            return self._write_aligned(state, start, quiet)
        with RssMonitor() as rss, ThreadPoolExecutor(max_workers=1) as pool, \
                tqdm(total=len(units), initial=len(units) - len(todo), unit="unit",
                     desc=f"{self.config.method} merge", disable=quiet, file=sys.stderr) as bar:
            jobs = [(u, t) for u in todo for t in (*u.tensors, *u.passthrough)]
            pending = pool.submit(self._read_whole, jobs[0][1]) if jobs else None
            current_unit, unit_start, unit_bytes = None, time.perf_counter(), 0
            for i, (unit, name) in enumerate(jobs):
                raw = pending.result() if pending is not None else None
                nxt = jobs[i + 1][1] if i + 1 < len(jobs) else None
                pending = pool.submit(self._read_whole, nxt) if nxt else None
                unit_bytes += self._merge_tensor(name, raw, writer)
                failpoints.hit("tensor-written")
                if nxt is None or jobs[i + 1][0] is not unit:
                    writer.sync()
                    state.mark_done(unit.name, {
                        "attempt": attempt, "seconds": round(time.perf_counter() - unit_start, 4),
                        "read_bytes": unit_bytes, "tensors": len(unit.tensors) + len(unit.passthrough),
                        "rss_bytes": rss.peak})
                    self.summary.units_done.append(unit.name)
                    failpoints.hit("unit-done")
                    self._finish_ready_shards(state, writer)
                    bar.update(1)
                    bar.set_postfix_str(f"{format_size(self.summary.read_bytes)} read")
                    unit_start, unit_bytes = time.perf_counter(), 0
        writer.close()
        self._finish_output(state, writer)
        self.summary.peak_rss = rss.peak
        self.summary.seconds = time.perf_counter() - start
        state.mark_complete()
        return self.summary

    # -- alignment ----------------------------------------------------------------------

    def _align(self, state: RunState, quiet: bool) -> None:
        """Find every input's permutations onto the anchor (resumable), for the merge pass."""
        started = time.perf_counter()
        anchor = self._anchor_index(state)
        graph = self.models.graph
        labels = [m.label for m in self.inputs]
        with tqdm(total=None, unit="unit", desc="align", disable=quiet, file=sys.stderr) as bar:
            stage = AlignStage(graph, labels, anchor, self._read_device,
                               state.group.require_group("align"), self.budget, self.config.seed,
                               self.config.pacer["max_sweeps"], on_unit=lambda: bar.update(1))
            self.perms = stage.run()
        self.align_report = {"anchor": labels[anchor], "peers_per_pass": stage.chunk_size,
                             "seconds_this_run": round(time.perf_counter() - started, 3),
                             "peers": stage.report()}
        self.summary.align = self.align_report

    def _write_aligned(self, state: RunState, start: float, quiet: bool) -> RunSummary:
        """``align: only``: every peer re-based onto the anchor, as its own checkpoint."""
        graph = self.models.graph
        peers = sorted(self.perms)
        with tqdm(total=len(peers) * len(graph.units), unit="unit", desc="write aligned",
                  disable=quiet, file=sys.stderr) as bar:
            for k in peers:
                index = self.inputs[k]
                folder = self.out_dir / aligned_folder(k, index.label)
                folder.mkdir(parents=True, exist_ok=True)
                shards = plan_shards([OutTensor(t, index.tensors[t].dtype, index.tensors[t].shape)
                                      for t in self.order],
                                     self.options.shard_size or self.config.output.shard_size)
                writer = ShardWriter(folder, shards)
                for unit in graph.units:
                    key = f"aligned/{k}/{unit.name}"
                    if not state.is_done(key):
                        for name in (*unit.tensors, *unit.passthrough):
                            writer.write(name, self._read_model(k, name, None))
                        writer.sync()
                        state.mark_done(key, {"peer": index.label})
                        self.summary.units_done.append(key)
                    bar.update(1)
                    for shard in shards:
                        done = all(state.is_done(f"aligned/{k}/{self.unit_of[t.name]}")
                                   for t in shard.tensors)
                        if done and (folder / shard.partial).exists():
                            writer.finish(shard)
                writer.close()
                writer.write_index()
                write_config(folder, index, None)
                copy_side_files(folder, index)
        self.summary.write_bytes = 0
        self.summary.peak_rss = peak_rss()
        self._write_report(state)
        self.summary.seconds = time.perf_counter() - start
        state.mark_complete()
        return self.summary

    def _anchor_index(self, state: RunState) -> int:
        """``anchor_strategy``: first, lowest_magnitude (mean |w|, kept in the state) or a model."""
        strategy = self.config.pacer["anchor_strategy"]
        refs = [e.ref for e in self.config.models] + (
            [self.config.base_model] if self.config.base_model is not None else [])
        if strategy == "first":
            return 0
        if strategy != "lowest_magnitude":
            return next(k for k, ref in enumerate(refs) if ref is strategy)
        if "anchor" not in state.group.attrs:
            means = [self._mean_magnitude(k) for k in range(len(self.inputs))]
            state.group.attrs["anchor"] = min(range(len(means)), key=means.__getitem__)
        return int(state.group.attrs["anchor"])

    def _mean_magnitude(self, k: int) -> float:
        total, count = 0.0, 0
        for name, node in self.models.graph.nodes.items():
            if node.info.is_float:
                total += float(self._read_device(k, name).abs().sum(dtype=torch.float64))
                count += node.info.numel
        return total / max(count, 1)

    def _read_device(self, k: int, name: str) -> torch.Tensor:
        return self.inputs[k].read(name).to(self.device)

    def _finish_ready_shards(self, state: RunState, writer: ShardWriter) -> None:
        for shard in self.shards:
            ready = all(state.is_done(self.unit_of[t.name]) for t in shard.tensors)
            if ready and (self.out_dir / shard.partial).exists():
                writer.finish(shard)

    def _finish_output(self, state: RunState, writer: ShardWriter) -> None:
        writer.write_index()
        write_config(self.out_dir, self.anchor, self.out_dtype)
        tokenizer = self.anchor
        if self.models.base is not None:
            tokenizer = self.models.base
        copy_side_files(self.out_dir, tokenizer)
        write_card(self.out_dir, model_card(self.config, self.models.models,
                                            self.models.spec.family, self._param_record()))
        self.summary.write_bytes = sum(s.size for s in self.shards)
        self._write_report(state)

    def _write_report(self, state: RunState) -> None:
        report = {
            "tool": f"pacer-stream {__version__}", "method": self.config.method,
            "params": self._param_record(), "seed": self.config.seed,
            "models": [m.label for m in self.models.models],
            "base_model": self.models.base.label if self.models.base else None,
            "budget_bytes": self.budget, "device": self.options.device,
            "units": state.units, "attempts": state.group.attrs.get("attempts"),
            "this_run": {"units_done": self.summary.units_done,
                         "units_skipped": self.summary.units_skipped,
                         "read_bytes": self.summary.read_bytes,
                         "peak_rss_bytes": max(self.summary.peak_rss, peak_rss())},
            "shards": [{"file": s.file, "bytes": s.size, "tensors": len(s.tensors)} for s in self.shards],
            "align": self.align_report,
        }
        write_atomic(self.out_dir / REPORT, json.dumps(report, indent=1, sort_keys=True) + "\n")

    # -- one tensor ---------------------------------------------------------------

    def _slices(self, name: str) -> acct.SlicePlan:
        info = self.anchor.tensors[name]
        return acct.plan_tensor(info.shape, len(self.inputs), DTYPES[self.out[name].dtype][1],
                                info.itemsize, self.budget)

    def _read_whole(self, name: str) -> list[torch.Tensor] | None:
        """Raw copies of a tensor from every input, if it is merged unsliced (read-ahead)."""
        if self._slices(name).sliced:
            return None
        return [self._read_model(k, name, None) for k in range(len(self.inputs))]

    def _read(self, name: str, rows: tuple[int, int]) -> list[torch.Tensor]:
        return [self._read_model(k, name, rows) for k in range(len(self.inputs))]

    def _read_model(self, k: int, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Rows of one input's tensor, re-based onto the anchor when the run aligns."""
        index = self.inputs[k]
        node = self.models.graph.nodes.get(name)
        perms = self.perms.get(k)
        if perms is None or node is None:
            return index.read(name, rows)
        first = source_index(node.axes[0], perms) if node.axes else None
        if first is None:
            tensor = index.read(name, rows)
        else:  # output rows come from scattered input rows: read them in contiguous runs
            wanted = first if rows is None else first[rows[0]:rows[1]]
            tensor = _read_rows(index, name, wanted)
        for axis in range(1, len(node.axes)):
            moved = source_index(node.axes[axis], perms)
            if moved is not None:
                tensor = tensor.index_select(axis, moved)
        return tensor

    def _merge_tensor(self, name: str, raw: list[torch.Tensor] | None, writer: ShardWriter) -> int:
        """Merge one tensor into the writer; returns the bytes read."""
        info = self.anchor.tensors[name]
        out = self.out[name]
        if name in self.models.graph.passthrough or not info.is_float:
            copies = raw if raw is not None else self._read(name, (0, info.shape[0]))
            self._check_equal(name, copies)
            writer.write(name, copies[0])
            return sum(c.numel() * c.element_size() for c in copies)
        merge = TensorMerge(name, info.shape, self.params)
        plan = self._slices(name)
        total = plan.total_rows
        ranges = [(r, min(r + plan.rows, total)) for r in range(0, total, plan.rows)]
        read = 0
        split = None
        if raw is not None:  # whole tensor already read ahead: split once, keep for all passes
            split = merge.split(*self._to_compute(name, raw, check=True))
            read += sum(c.numel() * c.element_size() for c in raw)
        if split is not None:
            merge.observe_whole(split[1])
        else:
            for pass_name in merge.passes:
                for rows in ranges:
                    read += self._nbytes(name, rows)
                    merge.observe(pass_name, rows, merge.split(*self._load(name, rows, check=False))[1])
        for rows in ranges:
            if raw is None:
                split = merge.split(*self._load(name, rows, check=True))
                read += self._nbytes(name, rows)
            merged = merge.merge(rows, *split)
            split = None
            result = merged.to(DTYPES[out.dtype][0]).cpu()
            writer.write(name, result.reshape(rows[1] - rows[0], *info.shape[1:])
                         if info.shape else result.reshape(()), first_row=rows[0])
        self.summary.read_bytes += read
        return read

    def _nbytes(self, name: str, rows: tuple[int, int]) -> int:
        info = self.anchor.tensors[name]
        per_row = info.nbytes // info.shape[0] if info.shape else info.nbytes
        return per_row * (rows[1] - rows[0]) * len(self.inputs)

    def _load(self, name: str, rows: tuple[int, int], check: bool):
        info = self.anchor.tensors[name]
        raw = self._read(name, rows) if info.shape else [
            self._read_model(k, name, None) for k in range(len(self.inputs))]
        return self._to_compute(name, raw, check)

    def _to_compute(self, name: str, raw: list[torch.Tensor], check: bool):
        """The models' copies as one fp32 [N, ...] tensor on the device; the base apart."""
        n = len(self.models.models)
        flat = [t.reshape(1, -1) if t.dim() == 0 else t for t in raw]
        x = torch.empty((n, *flat[0].shape), dtype=torch.float32, device=self.device)
        for k in range(n):
            x[k].copy_(flat[k])  # converts to fp32 in the copy, no intermediate
        base = flat[n].to(self.device, torch.float32) if len(flat) > n else None
        if check and not self.options.allow_nonfinite:
            for k, index in enumerate(self.inputs):
                values = x[k] if k < n else base
                if values.numel() == 0:
                    continue
                low, high = torch.aminmax(values)  # NaN propagates; Inf shows at an end
                if not (torch.isfinite(low) and torch.isfinite(high)):
                    raise PacerError(f"{index.label}: tensor {name!r} contains NaN or Inf; fix "
                                     "the checkpoint or pass --allow-nonfinite to merge it anyway")
        return x, base

    def _check_equal(self, name: str, copies: list[torch.Tensor]) -> None:
        for index, tensor in zip(self.inputs[1:], copies[1:]):
            if not torch.equal(tensor, copies[0]):
                raise PacerError(f"{index.label}: tensor {name!r} differs from "
                                 f"{self.anchor.label}; non-float and passthrough tensors are "
                                 "copied and must be equal across models")
        self.summary.read_bytes += sum(c.numel() * c.element_size() for c in copies)


def aligned_folder(k: int, label: str) -> str:
    """Sub-folder of ``align: only`` output for input ``k``: its position and a safe name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label.rstrip("/").split("/")[-1])
    return f"{k}-{safe}"


def _read_rows(index: CheckpointIndex, name: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (any order) of a tensor, read as few contiguous runs as possible."""
    if len(rows) == 0:
        return index.read(name, (0, 0))
    order = torch.argsort(rows)
    ranked = rows[order]
    breaks = (torch.nonzero(ranked[1:] != ranked[:-1] + 1).reshape(-1) + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, len(ranked)]
    parts = [index.read(name, (int(ranked[a]), int(ranked[b - 1]) + 1)) for a, b in zip(starts, ends)]
    sorted_rows = torch.cat(parts) if len(parts) > 1 else parts[0]
    return sorted_rows[torch.argsort(order)]


def _out_dtype(in_dtype: str, out_dtype: str | None) -> str:
    from .io.header import FLOAT_DTYPES

    return out_dtype if (out_dtype and in_dtype in FLOAT_DTYPES) else in_dtype


def _clear(folder: Path, keep: Path | None) -> None:
    for child in folder.iterdir():
        if keep is not None and child.resolve() == keep.resolve():
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
