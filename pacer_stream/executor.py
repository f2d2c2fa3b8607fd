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

import hashlib
import json
import math
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from . import accounting as acct
from . import failpoints
from .config import PlanConfig
from .errors import PacerError
from .export.card import model_card, plan_as_run, write_card, write_plan
from .export.dense import copy_side_files, write_config
from .export.vit_moe import (VitMoeLayout, vit_moe_config, vit_moe_recipes,
                              write_modeling)
from .export.llamacpp import (LLAMACPP, Place, TargetLayout, TargetWriter, check_source,
                              llamacpp_target)
from .export.moe import (MoeLayout, OutRecipe, moe_config, moe_model_type, moe_parameter_count,
                         moe_recipes)
from .inputs import ModelSet
from .io.header import DTYPES
from .io.reader import CheckpointIndex
from .io.writer import OutTensor, ShardWriter, plan_shards, write_atomic
from .calibration import (RouterCalibration, SampleSet, TensorCache, activation_bytes,
                          image_samples, text_samples, text_tokenizer)
from .lock import LOCK_FILE
from .regmean_pass import INPUT_OF_ROLE, RegMeanPass, block_bytes
from .methods.consensus import PartStats, model_similarity, part_of
from .methods.dense import MethodParams
from .methods.upcycle import Decision, UpcyclePolicy, decide, expert_means, router_rows
from .methods.vocabulary import VOCABULARY_ROLES, row_weights, token_usage, usage_summary
from .plan_units import EXPERT_ROLES
from .planner import OUT_DTYPES, default_budget
from .preflight import check_clear_allowed
from .self_samples import (end_tokens, generate, measured_on, sample_set, start_token,
                           writes_samples)
from .self_samples import LENGTH as GENERATED_LENGTH, SEQUENCES as GENERATED_SEQUENCES
from .sizes import format_size
from .memory import RssMonitor, peak_rss, return_freed_memory
from .summary import RunSummary
from .tensor_reads import TensorReads, out_dtype_of
from .dense_stage import DenseStage
from .state import (STATE_DIR, PassCheckpoint, RunState, fingerprint, is_foreign,
                    run_state_attributes)

REPORT = "pacer_report.json"
VIT_MOE = "vit_moe"  # ViT has no stock MoE class: custom modeling code in the output
ROUTER_ROLES = ("mlp.gate", "mlp.up")  # the router prototypes come from these
CALIBRATED_ROUTERS = ("few_shot", "data_free")  # gate rows fitted by calibration.py


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
    hash_inputs: bool = False  # also fingerprint input files by sha256 (reads them once more)
    # how the run was asked for, for the model card: `pacer-stream run ...` argv (the options
    # that change the output), or the lines of a Python API call; not part of the fingerprint
    command: tuple[str, ...] | None = None


class MergeJob:
    def __init__(self, config: PlanConfig, models: ModelSet, params: MethodParams,
                 options: RunOptions) -> None:
        self.config, self.models, self.params, self.options = config, models, params, options
        self.budget = options.budget or default_budget()
        self.out_dir = config.output.path
        self.device = torch.device(options.device)
        self.out_dtype = OUT_DTYPES.get(config.output.dtype)
        self.reads = TensorReads(models, params.method.name, self.out_dtype, self.budget,
                                 bool(config.align), self.device, options.allow_nonfinite)
        self.anchor, self.inputs = self.reads.anchor, self.reads.inputs  # the models, then base
        self.order = [t for u in models.graph.units for t in (*u.tensors, *u.passthrough)]
        self.unit_of = {t: u.name for u in models.graph.units for t in (*u.tensors, *u.passthrough)}
        self.dense = DenseStage(config, models, params, self.reads)  # checks every tensor's values
        self.shard_size = options.shard_size or config.output.shard_size
        self.upcycling = config.method == "pacer" and config.pacer["enable_moe_upcycle"]
        self.moe_type = VIT_MOE if models.spec.family == "vit" else moe_model_type(
            models.spec.family)
        if self.upcycling and config.pacer["router_mode"] != "linear" and self.moe_type != VIT_MOE:
            raise PacerError(f"pacer.router_mode {config.pacer['router_mode']}: a per-input "
                             "router needs custom modeling code, which only ViT-MoE outputs "
                             f"have; {models.spec.family} exports use router_mode: linear")
        if self.upcycling and config.output.target == LLAMACPP and self.moe_type is not None:
            check_source(models.spec.family, self.anchor.config)  # before any work
        self.stats: dict[int, dict[str, PartStats]] = {}  # layer -> part -> consensus sums
        self.decision: Decision | None = None
        self.prototypes: dict[int, torch.Tensor] = {}  # layer -> router sums, while writing it
        self.router_kind: str | None = None  # few_shot | data_free | abs_deviation, once decided
        self.router_report: dict | None = None
        self.real_samples: SampleSet | None = None  # the plan's sample lines, once read
        self.samples: SampleSet | None = None  # what RegMean, token rows and the gate use
        self.vocab_rows: dict[str, torch.Tensor] = {}  # token-row tensor -> r_k(t) [N, V]
        self.vocab_report: dict | None = None
        self.regmean_names: set[str] = set()  # tensors the RegMean pass solved, once it ran
        self.regmean_solved = None  # their zarr group in the run state
        self._set_layout(None)
        self.summary = RunSummary(self.out_dir, budget=self.budget)
        self.align_report: dict | None = None

    # -- set-up -----------------------------------------------------------------

    def _set_layout(self, decision: Decision | None) -> None:
        """The output tensors (dense, or MoE once a decision upcycles) and their shards."""
        self.layout, self.target = None, None
        shapes = self._shapes()
        if decision is not None and decision.upcycles and self.moe_type is not None \
                and self._can_route():
            self.layout, recipes, self.target = self._moe_layout(
                decision.blocks, decision.num_experts, decision.top_k, shapes)
        else:
            recipes = [OutRecipe(t, dtype, shape, "source", t) for t, (dtype, shape) in shapes.items()]
        rank = {u.name: i for i, u in enumerate(self.models.graph.units)}
        unit = {r.name: self._recipe_unit(r) for r in recipes}
        self.recipes = sorted(recipes, key=lambda r: rank[unit[r.name]])  # stable: keeps order
        self.unit_recipes: dict[str, list[OutRecipe]] = {}
        for r in self.recipes:
            self.unit_recipes.setdefault(unit[r.name], []).append(r)
        self.expert_names: dict[str, list[str]] = {}
        for r in self.recipes:
            if r.kind == "expert":
                names = self.expert_names.setdefault(r.source, [""] * decision.num_experts)
                names[r.expert] = r.name
        # the tensors the merge produces; the llama.cpp target places them in its own
        self.out = {r.name: OutTensor(r.name, r.dtype, tuple(r.shape)) for r in self.recipes}
        written = [self.out[r.name] for r in self.recipes] if self.target is None \
            else _in_unit_order(self.target, self.recipes)
        self.shards = plan_shards(written, self.shard_size)

    def _shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every input tensor's output (dtype, shape), in the anchor's order."""
        return {t: (out_dtype_of(self.anchor.tensors[t].dtype, self.out_dtype),
                    tuple(self.anchor.tensors[t].shape)) for t in self.order}

    def _moe_layout(self, blocks: list[int], experts: int, top_k: int,
                    shapes: dict[str, tuple[str, tuple[int, ...]]]):
        """The export layout, its output recipes and, for ``output.target: llama.cpp``,
        where they land (export/llamacpp.py): ViT-MoE (custom code) or qwen*_moe."""
        layers = self.models.graph.dims["layers"]
        if self.moe_type == VIT_MOE:
            layout = VitMoeLayout(layers, tuple(blocks), experts, top_k,
                                  self.config.pacer["tome_r"])
            return layout, vit_moe_recipes(layout, shapes), None
        layout = MoeLayout(self.models.spec.family, layers, tuple(blocks), experts, top_k)
        recipes = moe_recipes(layout, shapes)
        if self.config.output.target != LLAMACPP:
            return layout, recipes, None
        target = llamacpp_target(layout, recipes, self.anchor.config)
        return layout, target.recipes, target

    def _recipe_unit(self, recipe: OutRecipe) -> str:
        if recipe.source in self.unit_of:
            return self.unit_of[recipe.source]
        if recipe.layer is not None:
            return f"block.{recipe.layer}"
        found = re.search(r"\.layers\.(\d+)\.", recipe.name)
        if found is None:
            raise AssertionError(f"output tensor {recipe.name!r} belongs to no unit")
        return f"block.{found.group(1)}"

    @property
    def source_params(self) -> int:
        return sum(info.numel for info in self.anchor.tensors.values())

    def _fingerprint(self) -> str:
        return fingerprint({
            "tool": __version__, "method": self.config.method, "params": self._param_record(),
            # every setting as written (filters, gradients, slices): what
            # DenseStage.params_for resolves
            "settings": {"parameters": self.config.parameters,
                         "models": [e.parameters for e in self.config.models],
                         "slices": [[[s.ref.text, s.start, s.end, s.entry.parameters]
                                     for s in piece.sources] + [piece.parameters]
                                    for piece in self.config.slices]},
            "seed": self.config.seed, "output_dtype": self.config.output.dtype,
            "align": [self.config.align, str(self.config.pacer["anchor_strategy"]),
                      self.config.pacer["max_sweeps"]],
            "shard_size": self.shard_size, "target": self.config.output.target,
            "pacer": self.config.pacer if self.config.method == "pacer" else None,
            # the routers are fitted to the sample files' content: another content, another run
            "router_samples": {str(k): hashlib.sha256(path.read_bytes()).hexdigest()
                               for k, path in (self.config.pacer["router_samples"] or {}).items()},
            "inputs": [{"ref": m.label, "config": m.config,
                        "tensors": {n: [i.file, i.dtype, list(i.shape), i.begin, i.end]
                                    for n, i in sorted(m.tensors.items())}}
                       for m in self.inputs],
        })

    def _param_record(self) -> dict:
        p = self.params
        return {"weights": list(p.weights), "densities": list(p.densities), "lambda": p.lam,
                "normalize": p.normalize, "rescale": p.rescale, "base_free": self.models.base is None}

    def check_output(self) -> tuple[Path, bool, list[Path]]:
        """Whose the output folder is: (state path, ours, what else it holds).

        Refuses, touching nothing, a foreign state folder, a state of another output
        folder, and a non-empty folder that is not this run's without ``--force``.
        Called before the output lock is taken (so a refused folder gets no lock
        file) and again under it.
        """
        state_path = self.options.state_dir or (self.out_dir / STATE_DIR)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise PacerError(f"output path {self.out_dir} exists and is not a folder")
        if is_foreign(state_path):
            where = "--state-dir" if self.options.state_dir else "output folder's state"
            raise PacerError(f"{where} {state_path} exists and is not a pacer-stream run state; "
                             "nothing was changed: choose a new or empty folder")
        attrs = run_state_attributes(state_path)
        recorded = attrs.get("output") if attrs is not None else None
        ours = recorded == str(self.out_dir) or (attrs is not None and recorded is None
                                                 and self.options.state_dir is None)
        if recorded is not None and not ours and not self.options.restart:
            raise PacerError(f"--state-dir {state_path} holds the run state of another output "
                             f"folder ({recorded}); choose another --state-dir, or pass --restart "
                             "to discard that state")
        others = [c for c in self.out_dir.iterdir() if c.name != LOCK_FILE
                  and c.resolve() != state_path.resolve()] if self.out_dir.exists() else []
        if others and not ours:
            if not self.options.force:
                raise PacerError(f"output folder {self.out_dir} is not empty and holds no "
                                 "pacer-stream run; choose another output path or pass --force "
                                 "to overwrite it")
            check_clear_allowed(self.out_dir)
        return state_path, ours, others

    def _open_state(self) -> RunState:
        """The run state, after emptying what of the output folder may be replaced.

        Only two things are ever deleted: a folder the user named with ``--force``
        (never an input: see preflight) and, with ``--restart``, this plan's own
        earlier run (a state that records this output folder).
        """
        state_path, ours, others = self.check_output()
        if others and (not ours or self.options.restart):
            _clear(self.out_dir, keep=(state_path, self.out_dir / LOCK_FILE))
        state = RunState.open(state_path, self._fingerprint(), restart=self.options.restart)
        state.group.attrs["output"] = str(self.out_dir)
        state.check_inputs(self.models.file_identities(self.options.hash_inputs))
        return state

    # -- the run ----------------------------------------------------------------

    def run(self) -> RunSummary:
        start = time.perf_counter()
        state = self._open_state()
        if "decision" in state.group.attrs:  # the layout an earlier attempt decided on
            self._set_layout(Decision.from_json(state.group.attrs["decision"]))
        if state.complete and all((self.out_dir / s.file).exists() for s in self.shards):
            self.summary.already_complete = True
            return self.summary
        state.group.attrs["attempts"] = attempt = int(state.group.attrs.get("attempts", 0)) + 1
        quiet = self.options.quiet or not sys.stderr.isatty()
        if self.config.align:
            self._align(state, quiet)
        if self.config.align == "only":
            return self._write_aligned(state, start, quiet)
        if self._generates():
            self._generate(state, quiet)
        if self.upcycling:
            self._upcycle(state, quiet)
        if self._uses_regmean():
            self._regmean(state, quiet)
        writer = ShardWriter(self.out_dir, self.shards)
        if self.target is not None:
            writer = TargetWriter(writer, self.target, self.out)
        units = self.models.graph.units
        todo = [u for u in units if not state.is_done(u.name)]
        self.summary.units_skipped = [u.name for u in units if state.is_done(u.name)]
        with RssMonitor() as rss, ThreadPoolExecutor(max_workers=1) as pool, \
                tqdm(total=len(units), initial=len(units) - len(todo), unit="unit",
                     desc=f"{self.config.method} merge", disable=quiet, file=sys.stderr) as bar:
            jobs = [(u, r) for u in todo for r in self.unit_recipes[u.name]]

            def read_ahead(recipe: OutRecipe | None, current: OutRecipe | None):
                if recipe is None or recipe.kind != "source" or \
                        not self.reads.may_read_ahead(current, recipe.source):
                    return None
                return pool.submit(self.reads.read_whole, recipe.source)

            pending = read_ahead(jobs[0][1], None) if jobs else None
            unit_start, unit_bytes = time.perf_counter(), 0
            for i, (unit, recipe) in enumerate(jobs):
                raw = pending.result() if pending is not None else None
                nxt = jobs[i + 1][1] if i + 1 < len(jobs) else None
                pending = read_ahead(nxt, recipe)
                unit_bytes += self._write_recipe(recipe, raw, writer)
                raw = None  # freed before the next tensor is taken
                failpoints.hit("tensor-written")
                if nxt is None or jobs[i + 1][0] is not unit:
                    writer.sync()
                    state.mark_done(unit.name, {
                        "attempt": attempt, "seconds": round(time.perf_counter() - unit_start, 4),
                        "read_bytes": unit_bytes, "tensors": len(self.unit_recipes[unit.name]),
                        "rss_bytes": rss.peak})
                    self.summary.units_done.append(unit.name)
                    return_freed_memory()
                    failpoints.hit("unit-done")
                    bar.update(1)
                    bar.set_postfix_str(f"{format_size(self.summary.read_bytes)} read")
                    unit_start, unit_bytes = time.perf_counter(), 0
        if self.router_kind in CALIBRATED_ROUTERS:
            self._calibrate(state, writer, quiet)
        writer.close()
        self._finish_output(state, writer)
        self.summary.peak_rss = rss.peak
        self.summary.seconds = time.perf_counter() - start
        state.mark_complete()
        return self.summary

    def _write_recipe(self, recipe: OutRecipe, raw: list[torch.Tensor] | None,
                      writer: ShardWriter) -> int:
        """Produce one output tensor (experts: all of a source's at once); bytes read."""
        if recipe.kind == "source":
            return self._merge_tensor(recipe.source, raw, writer)
        if recipe.kind == "expert":
            return self._write_experts(recipe, writer) if recipe.expert == 0 else 0
        dtype = DTYPES[recipe.dtype][0]
        if recipe.kind == "router":
            if self.router_kind in CALIBRATED_ROUTERS:
                return 0  # written by the calibration stage, once the blocks are
            sums = self.prototypes.pop(recipe.layer)
            writer.write(recipe.name, router_rows(sums, self.config.pacer["router_temperature"])
                         .to(dtype))
        elif recipe.kind == "zeros":
            writer.write(recipe.name, torch.zeros(recipe.shape, dtype=dtype))
        else:
            raise AssertionError(f"unknown output recipe {recipe.kind!r}")
        return 0

    # -- consensus and upcycling ------------------------------------------------------

    def _upcycle(self, state: RunState, quiet: bool) -> None:
        """Phase 2-3: per-block consensus statistics, then which MLP blocks become experts."""
        self.stats = self._block_stats(state, quiet)
        if "decision" in state.group.attrs:
            decision = Decision.from_json(state.group.attrs["decision"])
        else:
            mlp = {layer: parts["mlp"] for layer, parts in self.stats.items() if "mlp" in parts}
            decision = decide(mlp, UpcyclePolicy.from_pacer(self.config.pacer), self._growth)
            if decision.upcycles and self.moe_type is None:
                decision.note = (f"{self.models.spec.family} MoE export is not supported yet; "
                                 f"blocks {decision.blocks} were merged dense")
            elif decision.upcycles and not self._can_route():
                decision.note = (f"blocks {decision.blocks} were merged dense: experts need a "
                                 "router that routes; give pacer.router_samples (a file of "
                                 "sample lines per model), or set router: data_free (on "
                                 "benchmarks/quality it routed no better than chance)")
            state.group.attrs["decision"] = decision.to_json()
        self.decision = decision
        self._set_layout(decision)
        self.router_kind = self._router_kind() if self.layout is not None else None

    def _block_stats(self, state: RunState, quiet: bool) -> dict[int, dict[str, PartStats]]:
        """Consensus sums of every block's MLP and attention, one unit at a time (resumable)."""
        graph = self.models.graph
        blocks = [u for u in graph.units if u.kind == "block"]
        saved = dict(state.group.attrs.get("stats", {}))
        n = len(self.models.models)
        with tqdm(total=len(blocks), initial=len(saved), unit="block", desc="consensus",
                  disable=quiet, file=sys.stderr) as bar:
            for unit in blocks:
                if unit.name in saved:
                    continue
                parts: dict[str, PartStats] = {}
                for name in unit.tensors:
                    node = graph.nodes[name]
                    part = part_of(node.role)
                    if part is None or not node.info.is_float:
                        continue
                    stats = parts.setdefault(part, PartStats(n))
                    work = acct.stats_work(n, self.models.base is not None,
                                           self.models.widest_itemsize(name),
                                           bool(self.config.align))
                    for rows in self.reads.ranges(name, work=work):
                        stats.add(*self.reads.load(name, rows, check=True))
                        self.summary.read_bytes += self.reads.nbytes(name, rows)
                saved[unit.name] = {part: st.to_json() for part, st in parts.items()}
                state.group.attrs["stats"] = saved
                return_freed_memory()
                failpoints.hit("stats-unit")
                bar.update(1)
        return {u.layer: {part: PartStats.from_json(data) for part, data in saved[u.name].items()}
                for u in blocks}

    def _growth(self, blocks: list[int], experts: int) -> float:
        """Output parameters over the source's if ``blocks`` got ``experts`` experts each."""
        if experts < 2:  # one cluster: nothing would be upcycled
            return 1.0
        if self.moe_type is None:  # no export layout: whole MLP copies plus the router
            extra = sum(self._mlp_params(b) * (experts - 1) + experts * self.models.graph.dims[
                "residual"] for b in blocks)
            return (self.source_params + extra) / self.source_params
        _, recipes, target = self._moe_layout(
            blocks, experts, min(self.config.pacer["top_k_experts"], experts), self._shapes())
        count = moe_parameter_count(recipes) if target is None else target.parameters()
        return count / self.source_params

    def _mlp_params(self, layer: int) -> int:
        unit = next(u for u in self.models.graph.units if u.layer == layer)
        return sum(self.models.graph.nodes[t].info.numel for t in unit.tensors
                   if self.models.graph.nodes[t].role in EXPERT_ROLES)

    def _write_experts(self, recipe: OutRecipe, writer: ShardWriter) -> int:
        """Every expert's copy of one MLP tensor: the mean of its cluster's aligned copies."""
        source, layer = recipe.source, recipe.layer
        labels, m = self.decision.clusters[layer], self.decision.num_experts
        info = self.anchor.tensors[source]
        names = self.expert_names[source]
        dtype = DTYPES[self.out[names[0]].dtype][0]
        sums = None
        if self.router_kind == "abs_deviation" and \
                self.models.graph.nodes[source].role in ROUTER_ROLES:  # Σ_rows |E_m − θ_c|
            sums = self.prototypes.setdefault(
                layer, torch.zeros(m, info.shape[1], dtype=torch.float64))
        read = 0
        for rows in self.reads.ranges(source, work=self.reads.expert_work(source)):
            x, _ = self.reads.load(source, rows, check=True)
            read += self.reads.nbytes(source, rows)
            means = expert_means(x, labels, m)
            if sums is not None:
                consensus = x.mean(0)
                for e, mean in enumerate(means):
                    sums[e] += (mean - consensus).abs().sum(0, dtype=torch.float64).cpu()
            for e, mean in enumerate(means):
                writer.write(names[e], mean.to(dtype).cpu().reshape(rows[1] - rows[0],
                                                                    *info.shape[1:]),
                             first_row=rows[0])
        self.summary.read_bytes += read
        return read

    # -- router calibration ---------------------------------------------------------------

    def _can_route(self) -> bool:
        """Whether the plan gives the experts a router (config.py: no samples and no
        ``router: data_free`` means none, except the ViT-MoE's per-input router)."""
        pacer = self.config.pacer
        return pacer["router"] is not None or (self.moe_type == VIT_MOE
                                               and pacer["router_mode"] != "linear")

    def _router_kind(self) -> str:
        """Where the gate rows come from (calibration.py): the plan's choice, or the
        weight-only prototype router where neither calibrated router can run."""
        pacer = self.config.pacer
        if self.moe_type == VIT_MOE and pacer["router_mode"] != "linear":
            return "abs_deviation"  # a per-input router: the gate rows are not used alone
        if pacer["router"] == "few_shot":
            return "few_shot"
        if not self._generates():
            return "abs_deviation"  # no model that writes text (ViT): the weight-only router
        return "data_free"

    def _generates(self) -> bool:
        """Data-free: the samples are ones each model writes (self_samples.py); decoders only."""
        return self.config.method == "pacer" and self.config.pacer["router"] == "data_free" \
            and writes_samples(self.anchor.config)

    def _generate(self, state: RunState, quiet: bool) -> None:
        """Every model's own samples (self_samples.py), kept in the run state per model."""
        from .runtime.blocks import BlockModel

        group = state.group.require_group("generated")
        config = self.anchor.config
        tokenize = text_tokenizer(self.anchor.files.read_text("tokenizer.json"), "") \
            if self.anchor.files.has("tokenizer.json") else None
        start, ends = start_token(config, tokenize), end_tokens(config)
        generated = []
        with tqdm(total=len(self.models.models) * GENERATED_LENGTH, unit="token",
                  desc="data-free samples", disable=quiet, file=sys.stderr) as bar:
            for k, index in enumerate(self.models.models):
                if f"tokens{k}" in group.attrs.get("done", []):
                    tokens = torch.from_numpy(group[f"tokens{k}"][...])
                    lengths = torch.from_numpy(group[f"lengths{k}"][...])
                    bar.update(GENERATED_LENGTH)
                else:
                    def read(name: str, index=index) -> torch.Tensor:
                        self.summary.read_bytes += index.tensors[name].nbytes
                        return index.read(name, None)

                    model = BlockModel.from_config(index.config, index.tensors.keys())
                    get = TensorCache(read, max(acct.usable(self.budget) // 2, 1 << 26))
                    tokens, lengths = generate(model, get, start, ends, self.config.seed, k,
                                               on_step=lambda: bar.update(1))
                    for name, values in ((f"tokens{k}", tokens), (f"lengths{k}", lengths)):
                        group.create_array(name, shape=tuple(values.shape), dtype="int64",
                                           overwrite=True)[...] = values.numpy()
                    group.attrs["done"] = [*group.attrs.get("done", []), f"tokens{k}"]
                    failpoints.hit("generated-model")
                generated.append((tokens, lengths))
        self.samples = sample_set(generated, self.config.pacer["router_holdout"])
        self._check_regmean_fits()
        self._set_vocabulary_rows()

    def _calibrate(self, state: RunState, writer: ShardWriter, quiet: bool) -> None:
        """The calibration stage (calibration.py): every upcycled block's gate, written."""
        from .runtime.blocks import BlockModel  # only upcycled runs need the forward pass

        model = BlockModel.from_config(self._output_config(logical=True))
        routers = {r.layer: r for r in self.recipes if r.kind == "router"}

        def write_router(layer: int, rows: torch.Tensor) -> torch.Tensor:
            recipe = routers[layer]
            data = rows.to(DTYPES[recipe.dtype][0]).reshape(recipe.shape)
            writer.write(recipe.name, data)
            writer.sync()
            return data.float()

        samples = self._router_samples()
        stage = RouterCalibration(model, writer.read, write_router, samples,
                                  self.decision.clusters, self.decision.num_experts,
                                  self.config.pacer["router_temperature"],
                                  PassCheckpoint(state.group.require_group("calibration")),
                                  max(acct.usable(self.budget) // 2, 1 << 26))
        with tqdm(total=stage.last_layer + 1, unit="block", desc="router calibration",
                  disable=quiet, file=sys.stderr) as bar:
            layers = stage.run(on_layer=lambda: bar.update(1))
        self.router_report = {
            "kind": self.router_kind, "layers": layers, "note": samples.note,
            "sequences": {"fit": int(samples.fit.sum()), "held_out": int(samples.held_out.sum())}}
        state.group.attrs["router_report"] = self.router_report

    def _uses_regmean(self) -> bool:
        return self.config.method == "pacer" and self.config.pacer.get("dense") == "regmean" \
            and (self.samples is not None or self._generates())

    def _regmean_targets(self) -> dict[int, dict[str, str]]:
        """Per block, the linear weights RegMean solves and the input each reads (the MLP of
        an upcycled block becomes experts instead)."""
        upcycled = set(self.layout.upcycled) if self.layout is not None else set()
        targets: dict[int, dict[str, str]] = {}
        for unit in self.models.graph.units:
            if unit.layer is None:
                continue
            for name in unit.tensors:
                role = self.models.graph.nodes[name].role
                info = self.anchor.tensors[name]
                if role not in INPUT_OF_ROLE or len(info.shape) != 2 or not info.is_float:
                    continue
                if role.startswith("mlp.") and unit.layer in upcycled:
                    continue
                targets.setdefault(unit.layer, {})[name] = INPUT_OF_ROLE[role]
        return targets

    def _regmean(self, state: RunState, quiet: bool) -> None:
        """The RegMean pass (regmean_pass.py): solutions stored in the run state."""
        from .runtime.blocks import BlockModel

        group = state.group.require_group("regmean")
        solved = group.require_group("solved")
        self.regmean_solved = solved
        targets = self._regmean_targets()
        config = self.anchor.config
        model = BlockModel.from_config(config, self.anchor.tensors.keys(),
                                       mlp_chunk=max(self.models.graph.dims.get("mlp", 1), 1))
        samples = [self.samples.of_model(k) for k in range(len(self.models.models))]

        def reader(k: int):
            def read(name: str) -> torch.Tensor:
                self.summary.read_bytes += self.anchor.tensors[name].nbytes
                return self.reads.read_model(k, name, None)
            return read

        out_dtype = {n: DTYPES[self.out[n].dtype][0] for layer in targets.values() for n in layer}

        def store(name: str, w: torch.Tensor) -> None:
            data = w.to(out_dtype[name]).contiguous()
            bits = data.view(BITS_OF_SIZE[data.element_size()]).numpy()
            array = solved.create_array(_zarr_key(name), shape=bits.shape, dtype=bits.dtype,
                                        chunks=bits.shape, overwrite=True)
            array[...] = bits

        stage = RegMeanPass(model, [reader(k) for k in range(len(self.models.models))], samples,
                            self.params.weights, targets, self.config.pacer["regmean_alpha"],
                            store, PassCheckpoint(group.require_group("pass")))
        with tqdm(total=stage.last_layer + 1, unit="block", desc="RegMean", disable=quiet,
                  file=sys.stderr) as bar:
            stage.run(on_layer=lambda: bar.update(1))
        self.regmean_names = {n for layer in targets.values() for n in layer}

    def _write_solved(self, name: str, writer: ShardWriter) -> None:
        """A RegMean solution, stored in the output dtype, into the output."""
        bits = torch.from_numpy(self.regmean_solved[_zarr_key(name)][...])
        writer.write(name, bits.view(DTYPES[self.out[name].dtype][0]))

    def load_router_samples(self) -> None:
        """Read and tokenize the plan's sample lines, before the run touches the disk, so a
        bad sample file is refused with nothing written."""
        pacer = self.config.pacer
        reads = self.upcycling or pacer.get("vocabulary") == "usage" \
            or pacer.get("dense") == "regmean"
        files, real = pacer["router_samples"] if reads else None, None
        if files:
            if self.models.spec.family == "vit":
                dims = self.anchor.config
                tokens = (dims["image_size"] // dims["patch_size"]) ** 2 + 1
                real = image_samples(files, pacer["router_holdout"], tokens)
            else:
                has = self.anchor.files.has("tokenizer.json")
                tokenize = text_tokenizer(self.anchor.files.read_text("tokenizer.json")
                                          if has else None, self.anchor.label)
                real = text_samples(files, tokenize, pacer["router_holdout"])
        self.real_samples = real
        self.samples = None if self._generates() else real  # generated in the run, else
        self._check_calibration_fits()
        self._check_regmean_fits()
        self._set_vocabulary_rows()

    def _set_vocabulary_rows(self) -> None:
        """pacer.vocabulary usage: the row weights r_k(t) of methods/vocabulary.py for every
        token-row tensor (the embedding table, an untied LM head), from the sample tokens."""
        self.vocab_rows, self.vocab_report = {}, None
        if self.config.method != "pacer" or self.config.pacer.get("vocabulary") != "usage" \
                or self.samples is None or self.models.spec.family == "vit":
            return
        names = [n for n, node in self.models.graph.nodes.items()
                 if node.role in VOCABULARY_ROLES and n in self.anchor.tensors]
        if not names:
            return
        vocab = self.anchor.tensors[names[0]].shape[0]
        real = self.samples
        counts = token_usage(real.inputs, real.lengths, real.model, len(self.models.models), vocab)
        try:
            weights = row_weights(counts, self.params.weights)
        except ValueError:
            raise PacerError("pacer.vocabulary usage: a model's sample file has no token; give "
                             "every model sample lines, or use vocabulary: mean") from None
        if not self.params.normalize:
            weights = weights * sum(self.params.weights)
        self.vocab_rows = {n: weights.float() for n in names
                           if self.anchor.tensors[n].shape[:1] == (vocab,)}
        self.vocab_report = {"rule": "usage", "tensors": sorted(self.vocab_rows),
                             **usage_summary(counts)}

    def _check_regmean_fits(self) -> None:
        """The RegMean pass holds every model's sample activations and one block's Gram
        matrices (regmean_pass.block_bytes): refuse up front a budget that cannot."""
        if not self._uses_regmean():
            return
        if self.samples is not None:
            sequences, width = len(self.samples.inputs), self.samples.width
        else:  # data-free, before generation
            sequences = len(self.models.models) * GENERATED_SEQUENCES
            width = 1 + GENERATED_LENGTH
        shapes = {n: tuple(info.shape) for n, info in self.anchor.tensors.items()}
        widest = max((block_bytes(t, shapes) for t in self._regmean_targets().values()),
                     default=0)
        need = activation_bytes(sequences, width, self.models.graph.dims["residual"]) + widest
        if need > acct.usable(self.budget):
            raise PacerError(f"the RegMean pass needs {format_size(need)} for the samples' "
                             f"hidden states and one block's Gram matrices, more than "
                             f"--max-memory {format_size(self.budget)} leaves for tensors; use "
                             "fewer or shorter sample lines, pacer.dense: mean, or a budget "
                             f"of at least {format_size(acct.budget_for(need))}")

    def _check_calibration_fits(self) -> None:
        """The calibration stage keeps the samples' hidden states in memory (beside one
        block's tensors): refuse up front a budget that cannot hold them."""
        if not self.upcycling or not self._can_route() \
                or self._router_kind() not in CALIBRATED_ROUTERS:
            return
        real = self.real_samples
        sequences, width = (len(real.inputs), real.width) if real else (0, 0)
        if self._router_kind() == "data_free":  # generated samples join the lines
            sequences += len(self.models.models) * GENERATED_SEQUENCES
            width = max(width, 1 + GENERATED_LENGTH)
        need = activation_bytes(sequences, width, self.models.graph.dims["residual"])
        if need > acct.usable(self.budget) // 2:
            raise PacerError(f"the router samples' hidden states take {format_size(need)}, more "
                             f"than half of what --max-memory {format_size(self.budget)} leaves "
                             "for tensors; use fewer or shorter sample lines, or raise the "
                             f"budget to at least {format_size(acct.budget_for(2 * need))}")

    def _router_samples(self) -> SampleSet:
        """The sequences of calibration.py: the sample lines, or the generated samples (the
        sample lines, when given too, only measure the data-free gate)."""
        if self.router_kind == "few_shot":
            return self.real_samples
        if self.real_samples is not None:
            return measured_on(self.samples, self.real_samples)
        return self.samples

    def _pacer_report(self) -> dict | None:
        """Per-block interference, the decision and the parameter accounting."""
        if self.decision is None:
            return None
        d = self.decision
        exported = list(self.layout.upcycled) if self.layout is not None else []
        blocks = []
        for layer, parts in sorted(self.stats.items()):
            entry = {"layer": layer, "selected": layer in d.blocks, "upcycled": layer in exported,
                     "movement": self._movement(layer)}
            entry.update({part: stats.summary() for part, stats in parts.items()})
            blocks.append(entry)
        source = self.source_params
        output = sum(math.prod(r.shape) for r in self.recipes) if self.target is None \
            else self.target.parameters()
        layers = self.models.graph.dims["layers"]
        mlp_fraction = sum(self._mlp_params(b) for b in range(layers)) / source
        m = d.num_experts if exported else 1
        formula = source * (1 + mlp_fraction * (len(exported) / layers) * (m - 1))
        target = self._target_cost()  # the formula is the default layout's
        default_output = target.get("default_parameters", output)
        return {
            "metric": "base_interference" if self.models.base is not None else "interference",
            "threshold": self.config.pacer["interference_threshold"],
            "blocks": blocks, "decision": d.to_json(),
            "exported_as": (self.target.model_type if self.target else self.moe_type)
            if exported else "dense",
            "parameters": {"source": source, "output": output, "growth": output / source,
                           "mlp_fraction": mlp_fraction, "formula": formula,
                           "router_and_zero_tensors": default_output - round(formula)},
            "router": self.router_report or ({"kind": self.router_kind} if exported else None),
            "target": target,
            "model_similarity": model_similarity([p for parts in self.stats.values()
                                                  for p in parts.values()]),
        }

    def _target_cost(self) -> dict:
        """The export target and, for llama.cpp's, its parameter and compute cost against
        the default layout's (compute: the parameters a token runs through)."""
        record = {"name": self.config.output.target}
        if self.target is None or not isinstance(self.layout, MoeLayout):
            return record
        m, k = self.layout.num_experts, self.layout.top_k
        default = moe_recipes(self.layout, self._shapes())
        active = sum(math.prod(r.shape) * (k / m if r.kind == "expert" else 1) for r in default)
        record.update(model_type=self.target.model_type,
                      parameters=self.target.parameters(),
                      default_parameters=moe_parameter_count(default),
                      active_parameters=round(self.target.active_parameters(k, m)),
                      default_active_parameters=round(active))
        return record

    def _movement(self, layer: int) -> dict[str, float]:
        """Per peer, the fraction of this block's MLP units that alignment moved."""
        out = {}
        for k, perms in sorted(self.reads.perms.items()):
            perm = perms.get(f"block.{layer}/mlp")
            if perm is not None:
                moved = (perm != torch.arange(perm.shape[-1])).float().mean().item()
                out[self.inputs[k].label] = moved
        return out

    # -- alignment ----------------------------------------------------------------------

    def _align(self, state: RunState, quiet: bool) -> None:
        """Find every input's permutations onto the anchor (resumable), for the merge pass."""
        from .align.stage import AlignStage  # here: scipy's solvers cost a merge 40 MB RSS

        started = time.perf_counter()
        anchor = self._anchor_index(state)
        graph = self.models.graph
        labels = [m.label for m in self.inputs]
        with tqdm(total=None, unit="unit", desc="align", disable=quiet, file=sys.stderr) as bar:
            stage = AlignStage(graph, labels, anchor, self._read_device,
                               state.group.require_group("align"), self.budget, self.config.seed,
                               self.config.pacer["max_sweeps"], on_unit=lambda: bar.update(1))
            self.reads.perms = stage.run()
        self.align_report = {"anchor": labels[anchor], "peers_per_pass": stage.chunk_size,
                             "seconds_this_run": round(time.perf_counter() - started, 3),
                             "peers": stage.report()}
        self.summary.align = self.align_report

    def _write_aligned(self, state: RunState, start: float, quiet: bool) -> RunSummary:
        """``align: only``: every peer re-based onto the anchor, as its own checkpoint.

        All peers' tensors are written first; the folders are finished (shards renamed,
        index, side files, config.json last) only when every peer is done, so no
        folder looks like a finished checkpoint while the run is not.
        """
        graph = self.models.graph
        outputs = []  # (peer, folder, writer, shards)
        with tqdm(total=len(self.reads.perms) * len(graph.units), unit="unit", desc="write aligned",
                  disable=quiet, file=sys.stderr) as bar:
            for k in sorted(self.reads.perms):
                index = self.inputs[k]
                folder = self.out_dir / aligned_folder(k, index.label)
                folder.mkdir(parents=True, exist_ok=True)
                shards = plan_shards([OutTensor(t, index.tensors[t].dtype, index.tensors[t].shape)
                                      for t in self.order],
                                     self.options.shard_size or self.config.output.shard_size)
                writer = ShardWriter(folder, shards)
                outputs.append((k, folder, writer, shards))
                for unit in graph.units:
                    key = f"aligned/{k}/{unit.name}"
                    if not state.is_done(key):
                        for name in (*unit.tensors, *unit.passthrough):
                            writer.write(name, self.reads.read_model(k, name, None))
                        writer.sync()
                        state.mark_done(key, {"peer": index.label})
                        self.summary.units_done.append(key)
                        failpoints.hit("aligned-unit")
                    bar.update(1)
                writer.close()
        for k, folder, writer, shards in outputs:
            writer.finish_all()
            writer.write_index()
            copy_side_files(folder, self.inputs[k])
            write_config(folder, self.inputs[k].config, None)
        self.summary.write_bytes = sum(s.size for *_, shards in outputs for s in shards)
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

    def _finish_output(self, state: RunState, writer: ShardWriter) -> None:
        """Once every unit is done (so no shard looks final before the whole output is):
        shards renamed and checked, index, side files, the plan as run (pacer_plan.yaml),
        model card, and config.json last: a folder with a config.json is a finished model."""
        writer.finish_all()
        writer.write_index()
        config = self._output_config()
        if isinstance(self.layout, VitMoeLayout):
            write_modeling(self.out_dir)
        self.describe_output(config, self._pacer_report())
        write_config(self.out_dir, config, self.out_dtype)
        self.summary.write_bytes = sum(s.size for s in self.shards)
        self._write_report(state)

    def describe_output(self, out_config: dict, pacer: dict | None = None) -> None:
        """What the output folder says of itself, before its config.json: the tokenizer
        files, the plan as run (pacer_plan.yaml) and the model card."""
        tokenizer = self.tokenizer_input()
        side_files = copy_side_files(self.out_dir, tokenizer) if tokenizer else []
        as_run = plan_as_run(self.config, self.inputs, self.shard_size)
        write_plan(self.out_dir, as_run)
        write_card(self.out_dir, model_card(
            as_run, self.models.models, self.models.spec.family, self._param_record(), pacer,
            out_config=out_config, command=self.options.command, base=self.models.base,
            side_files=side_files))

    def tokenizer_input(self) -> CheckpointIndex | None:
        """The input whose tokenizer and generation files the output gets (output.
        tokenizer_source; by default the base model, else the first model)."""
        output = self.config.output
        if not output.copy_tokenizer:
            return None
        source = output.tokenizer_source
        if source is None or source == "base":
            return self.models.base or self.anchor
        refs = [e.ref for e in self.config.models]
        if source in refs:
            return self.models.models[refs.index(source)]
        return self.models.base

    def _output_config(self, logical: bool = False) -> dict:
        """The config.json of the output: the anchor's, or its MoE form once upcycled (with
        ``logical``, the default target's even when the output is llama.cpp's: the model
        the calibration stage runs, through the TargetWriter's map)."""
        if self.target is not None and not logical:
            return self.target.config
        config = self.anchor.config
        if isinstance(self.layout, VitMoeLayout):
            config = vit_moe_config(config, self.layout)
            config.update(router_mode=self.config.pacer["router_mode"],
                          router_temperature=self.config.pacer["router_temperature"],
                          expert_sizes={str(layer): [labels.count(e) for e in range(
                              self.decision.num_experts)] for layer, labels in
                              self.decision.clusters.items()})
        elif self.layout is not None:
            config = moe_config(config, self.layout)
        return config

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
            "pacer": self._pacer_report(),
            "vocabulary": self.vocab_report,
            "dense": self._dense_report(),
            **self._method_report(),
        }
        self.summary.pacer = report["pacer"]
        self.summary.dense, self.summary.vocabulary = report["dense"], report["vocabulary"]
        write_atomic(self.out_dir / REPORT, json.dumps(report, indent=1, sort_keys=True) + "\n")

    def _dense_report(self) -> dict | None:
        """PACER's rule for the linear layers it did not upcycle, and from which samples."""
        if self.config.method != "pacer":
            return None
        if not self.regmean_names:
            return {"rule": "mean"}
        return {"rule": "regmean", "alpha": self.config.pacer["regmean_alpha"],
                "tensors": len(self.regmean_names), "samples": self.samples.note or
                "the sample lines of pacer.router_samples"}

    def _method_report(self) -> dict:
        """Sections a method adds to pacer_report.json (Split-Merge: its k, c_t and memory)."""
        return {}

    # -- one tensor ---------------------------------------------------------------

    def _merge_tensor(self, name: str, raw: list[torch.Tensor] | None, writer: ShardWriter) -> int:
        """Merge one tensor into the writer; returns the bytes read."""
        info = self.anchor.tensors[name]
        if name in self.models.graph.passthrough or not info.is_float:
            copies = raw if raw is not None else self.reads.read(name, (0, info.shape[0]))
            self.reads.check_equal(name, copies)
            read = sum(c.numel() * c.element_size() for c in copies)
            self.summary.read_bytes += read
            writer.write(name, copies[0])
            return read
        if name in self.regmean_names:
            self._write_solved(name, writer)
            return 0
        read = self.dense.merge_tensor(name, raw, writer, self.out[name].dtype,
                                       self.vocab_rows.get(name))
        self.summary.read_bytes += read
        return read


BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _zarr_key(name: str) -> str:
    """A tensor name as one zarr array name (no path separators)."""
    return name.replace("/", "%2F")


def aligned_folder(k: int, label: str) -> str:
    """Sub-folder of ``align: only`` output for input ``k``: its position and a safe name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label.rstrip("/").split("/")[-1])
    return f"{k}-{safe}"


def _clear(folder: Path, keep: tuple[Path, ...] = ()) -> None:
    kept = {k.resolve() for k in keep}
    for child in folder.iterdir():
        if child.resolve() in kept:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _in_unit_order(target: TargetLayout, recipes: list[OutRecipe]) -> list[OutTensor]:
    """The target's tensors in the order the recipes (sorted by unit) first fill them, so
    each unit's tensors stay together in the shards, as in the default layout."""
    tensors = {t.name: t for t in target.tensors}
    order: dict[str, OutTensor] = {}
    for r in recipes:
        for place in target.places.get(r.name, (Place(r.name),)):
            order.setdefault(place.name, tensors[place.name])
    if len(order) != len(tensors):
        raise AssertionError(f"target tensors no recipe fills: {sorted(set(tensors) - set(order))}")
    return list(order.values())
