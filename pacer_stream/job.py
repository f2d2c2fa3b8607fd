"""MergeContext: what the stages of one merge share.

The plan, the inputs and how they are read (TensorReads), the resolved method values
(DenseStage), the output's layout, and what each stage hands to the later ones: the
permutations, the consensus statistics and upcycling decision, the samples and the
vocabulary rows, the RegMean solutions, the router. A stage reads what earlier stages
put here and adds its own; it never calls another stage. Building a context reads only
headers, so every process of a run (the driver, a resumed run, a Ray worker) can build
the same one from the plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .config import PlanConfig
from .dense_stage import DenseStage
from .errors import PacerError
from .export.llamacpp import LLAMACPP, check_source
from .export.moe import moe_model_type
from .inputs import ModelSet
from .methods.consensus import PartStats
from .methods import schedule
from .methods.dense import METHODS, MethodParams, pacer_dense
from .methods.upcycle import Decision
from .output_layout import SHARD_LAYOUTS, VIT_MOE, OutputLayout, output_layout
from .plan_units import EXPERT_ROLES
from .planner import OUT_DTYPES, default_budget
from .self_samples import writes_samples
from .calibration import SampleSet
from .state import STATE_DIR, fingerprint
from .summary import RunSummary
from .tensor_reads import TensorReads

CALIBRATED_ROUTERS = ("few_shot", "data_free")  # gate rows fitted by calibration.py


@dataclass
class RunOptions:
    budget: int | None = None
    device: str = "cpu"
    shard_size: int | None = None
    shard_layout: str | None = None  # size | unit (None: the backend's, see executor.py)
    backend: str | None = None  # local | ray (None: the plan's, else local)
    address: str | None = None  # the Ray cluster to join (None: start one on this machine)
    state_dir: Path | None = None
    restart: bool = False
    force: bool = False
    quiet: bool = False
    allow_nonfinite: bool = False
    hash_inputs: bool = False  # also fingerprint input files by sha256 (reads them once more)
    # how the run was asked for, for the model card: `pacer-stream run ...` argv (the options
    # that change the output), or the lines of a Python API call; not part of the fingerprint
    command: tuple[str, ...] | None = None

    def for_plan(self, config: PlanConfig) -> "RunOptions":
        """These options with the plan's backend where the command line gave none."""
        backend = self.backend or config.backend or "local"
        address = self.address or (config.address if backend == config.backend else None)
        options = dataclasses.replace(self, backend=backend, address=address)
        command = options.command
        if command and options.layout == "unit" and "--shard-layout" not in command:
            # the command that reproduces the output names the layout it was written in
            options = dataclasses.replace(options, command=(*command, "--shard-layout", "unit"))
        return options

    @property
    def layout(self) -> str:
        """The shard layout: as asked, else the backend's (Ray: one shard set per unit)."""
        return self.shard_layout or ("unit" if self.backend == "ray" else "size")


class MergeContext:
    def __init__(self, config: PlanConfig, models: ModelSet, params: MethodParams,
                 options: RunOptions) -> None:
        self.config, self.models, self.params, self.options = config, models, params, options
        self.budget = options.budget or default_budget()
        self.out_dir = config.output.path
        self.state_path = options.state_dir or (self.out_dir / STATE_DIR)
        self.device = torch.device(options.device)
        self.out_dtype = OUT_DTYPES.get(config.output.dtype)
        self.reads = TensorReads(models, params.method.name, self.out_dtype, self.budget,
                                 bool(config.align), self.device, options.allow_nonfinite)
        self.anchor, self.inputs = self.reads.anchor, self.reads.inputs  # the models, then base
        self.order = [t for u in models.graph.units for t in (*u.tensors, *u.passthrough)]
        self.unit_of = {t: u.name for u in models.graph.units for t in (*u.tensors, *u.passthrough)}
        self.dense = DenseStage(config, models, params, self.reads)  # checks every tensor's values
        self.shard_size = options.shard_size or config.output.shard_size
        self.shard_layout = options.layout
        if self.shard_layout not in SHARD_LAYOUTS:
            raise PacerError(f"--shard-layout {self.shard_layout}: use one of "
                             f"{', '.join(SHARD_LAYOUTS)}")
        if options.backend == "ray" and self.shard_layout != "unit":
            raise PacerError("--backend ray writes each unit's shards in its own task: use "
                             "--shard-layout unit (or leave it unset)")
        self.upcycling = config.method == "pacer" and config.pacer["enable_moe_upcycle"]
        self.moe_type = VIT_MOE if models.spec.family == "vit" else moe_model_type(
            models.spec.family)
        if self.upcycling and config.pacer["router_mode"] != "linear" and self.moe_type != VIT_MOE:
            raise PacerError(f"pacer.router_mode {config.pacer['router_mode']}: a per-input "
                             "router needs custom modeling code, which only ViT-MoE outputs "
                             f"have; {models.spec.family} exports use router_mode: linear")
        if self.upcycling and config.output.target == LLAMACPP and self.moe_type is not None:
            check_source(models.spec.family, self.anchor.config)  # before any work
        # what the stages hand on (see the module docstring)
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
        self.align_report: dict | None = None
        self.method_report: dict = {}  # sections a method adds to pacer_report.json
        self.attempt = 0
        self.summary = RunSummary(self.out_dir, budget=self.budget)
        self.output: OutputLayout = output_layout(self, None)

    @classmethod
    def from_plan(cls, config: PlanConfig, options: RunOptions) -> "MergeContext":
        """The context of ``config``'s run: its method's values resolved, the inputs'
        headers read (nothing else is read or written)."""
        method, parameters = config.method, config.parameters
        if method == "pacer":
            method, parameters = pacer_dense(config)
        if method not in METHODS and method != "split_merge":
            raise PacerError(f"method {method!r} is not available in `run` yet "
                             f"(available: pacer, split_merge, {', '.join(METHODS)})")
        models = ModelSet.from_plan(config)
        if method == "split_merge":
            params = MethodParams.resolve("linear", config.models, parameters, config.seed)
        else:
            # the values outside any filter and at t = 0 (each tensor gets its own:
            # DenseStage.params_for)
            params = MethodParams.resolve(
                method, [schedule.resolve(e.parameters, "", 0.0) for e in config.models],
                schedule.resolve(parameters, "", 0.0), config.seed)
        return cls(config, models, params, options)

    def set_decision(self, decision: Decision | None) -> None:
        """The upcycling decision, and the output layout it gives."""
        self.decision = decision
        self.output = output_layout(self, decision)
        self.router_kind = self.chosen_router() if self.output.layout is not None else None

    @property
    def shards(self):
        return self.output.shards

    @property
    def source_params(self) -> int:
        return sum(info.numel for info in self.anchor.tensors.values())

    def mlp_params(self, layer: int) -> int:
        unit = next(u for u in self.models.graph.units if u.layer == layer)
        return sum(self.models.graph.nodes[t].info.numel for t in unit.tensors
                   if self.models.graph.nodes[t].role in EXPERT_ROLES)

    # -- what the plan asks for -----------------------------------------------------------

    def can_route(self) -> bool:
        """Whether the plan gives the experts a router (config.py: no samples and no
        ``router: data_free`` means none, except the ViT-MoE's per-input router)."""
        pacer = self.config.pacer
        return pacer["router"] is not None or (self.moe_type == VIT_MOE
                                               and pacer["router_mode"] != "linear")

    def chosen_router(self) -> str:
        """Where the gate rows come from (calibration.py): the plan's choice, or the
        weight-only prototype router where neither calibrated router can run."""
        pacer = self.config.pacer
        if self.moe_type == VIT_MOE and pacer["router_mode"] != "linear":
            return "abs_deviation"  # a per-input router: the gate rows are not used alone
        if pacer["router"] == "few_shot":
            return "few_shot"
        if not self.generates():
            return "abs_deviation"  # no model that writes text (ViT): the weight-only router
        return "data_free"

    def generates(self) -> bool:
        """Data-free: the samples are ones each model writes (self_samples.py); decoders only."""
        return self.config.method == "pacer" and self.config.pacer["router"] == "data_free" \
            and writes_samples(self.anchor.config)

    def uses_regmean(self) -> bool:
        return self.config.method == "pacer" and self.config.pacer.get("dense") == "regmean" \
            and (self.samples is not None or self.generates())

    # -- identity of the run ------------------------------------------------------------------

    def fingerprint(self) -> str:
        config = self.config
        return fingerprint({
            "tool": __version__, "method": config.method, "params": self.param_record(),
            # every setting as written (filters, gradients, slices): what
            # DenseStage.params_for resolves
            "settings": {"parameters": config.parameters,
                         "models": [e.parameters for e in config.models],
                         "slices": [[[s.ref.text, s.start, s.end, s.entry.parameters]
                                     for s in piece.sources] + [piece.parameters]
                                    for piece in config.slices]},
            "seed": config.seed, "output_dtype": config.output.dtype,
            "align": [config.align, str(config.pacer["anchor_strategy"]),
                      config.pacer["max_sweeps"]],
            "shard_size": self.shard_size, "target": config.output.target,
            # the default layout stays out, so a run of an earlier version still resumes
            **({"shard_layout": self.shard_layout} if self.shard_layout != "size" else {}),
            "pacer": config.pacer if config.method == "pacer" else None,
            # the routers are fitted to the sample files' content: another content, another run
            "router_samples": {str(k): hashlib.sha256(path.read_bytes()).hexdigest()
                               for k, path in (config.pacer["router_samples"] or {}).items()},
            "inputs": [{"ref": m.label, "config": m.config,
                        "tensors": {n: [i.file, i.dtype, list(i.shape), i.begin, i.end]
                                    for n, i in sorted(m.tensors.items())}}
                       for m in self.inputs],
        })

    def param_record(self) -> dict:
        p = self.params
        return {"weights": list(p.weights), "densities": list(p.densities), "lambda": p.lam,
                "normalize": p.normalize, "rescale": p.rescale, "base_free": self.models.base is None}
