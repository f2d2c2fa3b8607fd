"""The plan file: schema, defaults and validation, up front.

Plans are YAML and accept PacerKit's keys as they are::

    project_name: qwen-coder-merge
    models:
      - fluently/FluentlyQwen3-Coder-4B-0909
      - {model: SamuelBang/AesCoder-4B, weight: 0.7}
    output: {path: ./merged_model, save_format: safetensors}
    method: pacer
    pacer: {interference_threshold: 0.35, top_k_experts: 2,
            anchor_strategy: first, enable_moe_upcycle: true}

Every mistake is a :class:`PacerError` naming the key; an unknown key comes with
the closest known one as a suggestion. Relative model paths and the output path
are resolved against the plan file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PacerError
from .io.sources import ModelRef, parse_ref
from . import mergekit_yaml
from .methods import schedule
from .sizes import parse_size
from .slices import SliceSource, SliceSpec

METHODS = ("pacer", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "split_merge",
           "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "slerp", "nuslerp",
           "multislerp", "karcher", "model_stock", "passthrough")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ANCHORS = ("first", "lowest_magnitude")  # or a reference to one of the models
TOP_KEYS = ("project_name", "models", "slices", "base_model", "output", "method", "parameters",
            "pacer", "seed", "align", "accept_config_differences")
SLICE_KEYS = ("sources", "parameters")
ROUTER_MODES = ("linear", "deviation_norm")
ROUTERS = ("few_shot", "data_free")
DENSE_RULES = ("regmean", "mean")  # pacer.dense: how linear layers that are not upcycled merge
VOCABULARY_RULES = ("usage", "mean")  # pacer.vocabulary: how token-embedding / LM-head rows merge
# PACER's dense layers are the consensus mean: on benchmarks/quality no TIES/DARE rule,
# with the base or around a pseudo-base, beat the mean on both tasks. The values only a
# TIES/DARE dense path would read are refused (the methods themselves remain).
DENSE_ONLY_PACER_KEYS = ("dropout_rate",)
DENSE_ONLY_PARAMETERS = ("lambda", "rescale")
ALIGN_MODES = (True, False, "only")  # "only": write each input re-based onto the anchor
OUTPUT_KEYS = ("path", "save_format", "dtype", "shard_size", "target", "tokenizer_source",
               "copy_tokenizer")
# Who runs the output (export/llamacpp.py): the minimal layout for transformers and vLLM,
# or one llama.cpp converts and runs (every block a MoE block when any is).
TARGETS = ("transformers", "llama.cpp")
PER_MODEL_KEYS = ("weight", "density", "epsilon", "gamma", "scale")  # parameters a model
# entry may set for itself
MODEL_KEYS = ("model",) + PER_MODEL_KEYS
SOURCE_KEYS = MODEL_KEYS + ("layer_range",)  # a slice's source: a model entry and its layers
PARAMETER_KEYS = ("weight", "density", "lambda", "normalize", "rescale", "epsilon", "gamma",
                  "t", "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps",
                  "max_iter", "tol", "filter_wise", "scale")
RESCALES = ("inverse_density", "l1", "none")
# What each method reads of `parameters` (and of a model entry's weight/density). A plan
# that sets anything else is refused by name: a value that is silently ignored is a lie.
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "linear": ("weight", "normalize"),
    "task_arithmetic": ("weight", "lambda", "normalize"),
    "ties": ("weight", "density", "lambda", "normalize"),
    "dare_linear": ("weight", "density", "lambda", "normalize", "rescale"),
    "dare_ties": ("weight", "density", "lambda", "normalize", "rescale"),
    "pacer": ("weight", "normalize"),  # the dense layers are the (weighted) mean
    "split_merge": ("density",),
    "della": ("weight", "density", "epsilon", "lambda", "normalize", "rescale"),
    "della_linear": ("weight", "density", "epsilon", "lambda", "normalize", "rescale"),
    "breadcrumbs": ("weight", "density", "gamma", "lambda", "normalize", "rescale"),
    "breadcrumbs_ties": ("weight", "density", "gamma", "lambda", "normalize", "rescale"),
    "slerp": ("t",),
    "nuslerp": ("weight", "nuslerp_flatten", "nuslerp_row_wise"),
    "multislerp": ("weight", "normalize_weights", "eps"),
    "karcher": ("max_iter", "tol"),
    "model_stock": ("filter_wise",),
    "passthrough": ("scale",),
}
# Methods that need a base_model (task arithmetic and mergekit's base-required methods).
BASE_METHODS = ("task_arithmetic", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties",
                "slerp", "model_stock")
# How many models a method merges, a base listed among them not counted (mergekit's
# contracts): (at least, at most or None). Any other method: at least two.
MODEL_COUNTS: dict[str, tuple[int, int | None]] = {
    "slerp": (1, 1), "nuslerp": (2, 2), "multislerp": (1, None), "model_stock": (2, None),
    "passthrough": (1, 1)}
# Methods whose values hold for the whole model (no per-tensor filters or gradients).
WHOLE_MODEL_METHODS = ("pacer", "split_merge")
# Methods that ignore a base model (linear averages the models; split_merge is base-free).
BASE_FREE_METHODS = ("linear", "split_merge", "karcher", "passthrough")
BASE_FREE_REASONS = {"linear": "averages the models themselves",
                     "split_merge": "is base-free (μ is the models' mean)",
                     "karcher": "is the models' mean on the sphere (list the base among the "
                                "models to include it)",
                     "passthrough": "copies its one model"}
# The pacer keys a method other than pacer reads: those of the alignment, when it aligns.
ALIGN_PACER_KEYS = ("anchor_strategy", "max_sweeps")
PACER_DEFAULTS: dict[str, Any] = {
    # gamma: upcycle an MLP block whose conflict exceeds it. Measured (benchmarks/quality and
    # issue 15): experts that lose each other's domains when averaged show I = 0.12-0.40
    "interference_threshold": 0.1,
    "top_k_experts": 2,
    "dropout_rate": None,  # PacerKit's key; refused: the dense layers are the mean
    "anchor_strategy": "first",
    "enable_moe_upcycle": True,
    "max_sweeps": 20,  # safety cap: alignment sweeps until converged (measured: 1-2, at worst 7)
    "max_param_growth": None,  # budget mode: stop upcycling at this parameter ratio, e.g. 1.36
    "upcycle_fraction": None,  # budget mode: upcycle this fraction of the MLP blocks
    "max_experts": None,  # cap on the experts per upcycled block (default: the number of models)
    "expert_distance": 1.0,  # join clusters whose average 1 - cos(deviations) is below this
    "router_temperature": 1.0,
    "tome_r": 0,  # ViT-MoE outputs: tokens merged per block at inference (ToMe), 0 = off
    "router_mode": "linear",  # or "deviation_norm": R_m(x) = ||Delta_m x|| (ViT-MoE only)
    "router": None,  # the linear gate's rows: few_shot (from router_samples) or data_free
    "router_samples": None,  # {model: file}: sample lines (text) or images (.npy) per model
    "router_holdout": 0.2,  # share of each model's sample lines held out to measure routing
    "dense": None,  # linear layers not upcycled: regmean (methods/regmean.py, from the
    # router_samples) or mean; default regmean when router_samples are given, else mean
    "regmean_alpha": 0.9,  # RegMean's shrinkage of the Gram matrices' off-diagonal terms
    "vocabulary": None,  # token rows: usage (weighted by the samples' use, methods/vocabulary.py)
    # or mean; default usage when router_samples are given, else mean
    "align": True,
}


@dataclass(frozen=True)
class ModelEntry:
    ref: ModelRef
    # this model's own parameter settings (weight, density, ...), over the plan-level ones;
    # a setting is a scalar or a filter/gradient list (methods/schedule.py)
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def weight(self) -> float | None:
        """The model's own weight when it is one number (None: the plan-level one)."""
        return _scalar(self.parameters.get("weight"))

    @property
    def density(self) -> float | None:
        return _scalar(self.parameters.get("density"))


def _scalar(setting: Any) -> Any:
    return setting if isinstance(setting, (int, float)) and not isinstance(setting, bool) \
        else None


@dataclass(frozen=True)
class OutputSpec:
    path: Path
    save_format: str = "safetensors"
    dtype: str = "auto"
    shard_size: int = 5 * 10**9
    target: str = "transformers"  # one of TARGETS
    # whose tokenizer and generation files are copied: None (the base model if there is
    # one, else the first model), "base", or one of the models; none if copy_tokenizer is off
    tokenizer_source: ModelRef | str | None = None
    copy_tokenizer: bool = True


@dataclass(frozen=True)
class PlanConfig:
    """A validated plan."""

    project_name: str
    models: tuple[ModelEntry, ...]
    output: OutputSpec
    method: str = "pacer"
    base_model: ModelRef | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    pacer: dict[str, Any] = field(default_factory=lambda: dict(PACER_DEFAULTS))
    seed: int = 0
    source: Path | None = None
    align: bool | str = False  # True, False or "only"
    # config.json keys that may differ between the models (the anchor's values are written)
    accept_config_differences: tuple[str, ...] = ()
    # read from a mergekit configuration (mergekit_yaml.py): what was read as what
    read_as: tuple[str, ...] = ()
    # an output assembled from layer ranges (slices.py); models are then the first slice's
    # merged sources (the base, if any, left out)
    slices: tuple[SliceSpec, ...] = ()

    @property
    def anchor_ref(self) -> ModelRef | None:
        """The model named by ``pacer.anchor_strategy``, if it names one."""
        strategy = self.pacer["anchor_strategy"]
        return strategy if isinstance(strategy, ModelRef) else None


def load_plan(path: str | Path, out: str | Path | None = None) -> PlanConfig:
    """Read and validate a plan file, or a mergekit configuration (mergekit_yaml.py).
    ``out``, if given, is the output folder (a mergekit configuration names none)."""
    path = Path(path)
    if not path.is_file():
        raise PacerError(f"{path}: plan file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise PacerError(f"{path}: malformed plan file{where}: {problem}") from None
    except UnicodeDecodeError:
        raise PacerError(f"{path}: plan file is not UTF-8 text") from None
    out_path = Path(out).expanduser().resolve() if out is not None else None
    if mergekit_yaml.is_mergekit(raw):
        raw, notes = mergekit_yaml.to_plan(raw, str(path), out_path, path.stem)
        plan = parse_plan(raw, base_dir=path.resolve().parent, label=str(path))
        return dataclasses.replace(plan, source=path.resolve(), read_as=tuple(notes))
    if out_path is not None and isinstance(raw, dict):
        output = raw.get("output")
        raw = {**raw, "output": {**(output if isinstance(output, dict) else {}),
                                 "path": str(out_path)}}
    plan = parse_plan(raw, base_dir=path.resolve().parent, label=str(path))
    return dataclasses.replace(plan, source=path.resolve())


def parse_plan(raw: Any, base_dir: Path | None = None, label: str = "plan") -> PlanConfig:
    base_dir = base_dir or Path.cwd()
    if not isinstance(raw, dict):
        raise PacerError(f"{label}: a plan must be a YAML mapping with at least 'models'")
    _check_keys(raw, TOP_KEYS, label)
    slices = _slices(raw, base_dir, label) if "slices" in raw else ()
    models = raw.get("models") if not slices else [
        s.entry for s in slices[0].sources if s.ref != _base_of(raw, base_dir)]
    at_least = MODEL_COUNTS.get(raw.get("method"), (2,))[0]
    if not isinstance(models, list) or len(models) < max(at_least, 1):
        raise PacerError(f"{label}: 'models' must list at least "
                         f"{'two models' if at_least > 1 else 'one model'} to merge")
    entries = tuple(_model_entry(m, base_dir, f"{label}: models[{i}]") for i, m in enumerate(models))

    method = raw.get("method", "pacer")
    if method not in METHODS:
        raise PacerError(f"{label}: unknown method {method!r}{_suggest(method, METHODS)} "
                         f"(choose from {', '.join(METHODS)})")
    base = raw.get("base_model")
    base_ref = parse_ref(base, base_dir) if base is not None else None
    if method in BASE_METHODS and base_ref is None:
        raise PacerError(f"{label}: method {method} needs 'base_model'")
    _check_model_count(method, entries, base_ref, label)

    parameters = _mapping(raw.get("parameters", {}), f"{label}: parameters")
    _check_keys(parameters, PARAMETER_KEYS, f"{label}: parameters")
    _check_parameters(parameters, f"{label}: parameters")
    _check_used(method, parameters, entries, base_ref, label)
    _check_method_values(method, parameters, entries, label)
    given_pacer = _mapping(raw.get("pacer", {}), f"{label}: pacer")
    _check_keys(given_pacer, tuple(PACER_DEFAULTS), f"{label}: pacer")
    pacer = {**PACER_DEFAULTS, **given_pacer}
    _check_pacer(pacer, f"{label}: pacer")
    if pacer["anchor_strategy"] not in ANCHORS:
        pacer["anchor_strategy"] = _anchor_ref(pacer["anchor_strategy"], entries, base_ref,
                                               base_dir, f"{label}: pacer.anchor_strategy")
    if method == "pacer":
        _check_pacer_dense(given_pacer, parameters, label)
        pacer["router_samples"] = _router_samples(pacer["router_samples"], entries, base_dir,
                                                  f"{label}: pacer.router_samples")
        pacer["router"] = _router(pacer, f"{label}: pacer.router")
        pacer["vocabulary"] = _sample_rule(pacer, "vocabulary", VOCABULARY_RULES,
                                           "to count which tokens each model uses",
                                           f"{label}: pacer.vocabulary")
        pacer["dense"] = _sample_rule(pacer, "dense", DENSE_RULES,
                                      "to fit each layer to the models' own inputs",
                                      f"{label}: pacer.dense")
    if method != "pacer" and "align" in given_pacer:
        raise PacerError(f"{label}: pacer.align is read by method pacer only; for method "
                         f"{method} write align: {str(given_pacer['align']).lower()} at the top "
                         "level")
    align = raw.get("align", pacer["align"] if method == "pacer" else False)
    if not any(align is mode or align == mode == "only" for mode in ALIGN_MODES):
        raise PacerError(f"{label}: align must be true, false or only, got {align!r}")
    if method != "pacer":
        unused = [k for k in given_pacer if k not in ALIGN_PACER_KEYS or not align]
        if unused:
            raise PacerError(f"{label}: pacer.{unused[0]} has no effect with method {method}"
                             + (" without align" if unused[0] in ALIGN_PACER_KEYS else "")
                             + "; remove it, or use method: pacer")
    accept = raw.get("accept_config_differences", [])
    if not isinstance(accept, list) or not all(isinstance(k, str) and k for k in accept):
        raise PacerError(f"{label}: accept_config_differences must be a list of config.json "
                         f"keys, e.g. [rope_theta], got {accept!r}")

    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PacerError(f"{label}: seed must be a non-negative integer, got {seed!r}")
    name = raw.get("project_name", "merge")
    if not isinstance(name, str) or not name:
        raise PacerError(f"{label}: project_name must be a non-empty string")
    output = _output(raw.get("output"), base_dir, f"{label}: output", name)
    _check_tokenizer_source(output, entries, base_ref, f"{label}: output.tokenizer_source")
    if slices and (method in ("pacer", "split_merge") or align):
        what = f"method {method}" if method in ("pacer", "split_merge") else "align"
        raise PacerError(f"{label}: slices with {what}: its statistics need whole models, "
                         "which slices take apart; use a plain method (passthrough, linear, "
                         "slerp, ...) without align")
    return PlanConfig(name, entries, output,
                      method, base_ref, parameters, pacer, seed, None, align, tuple(accept),
                      slices=slices)


def _slices(raw: dict, base_dir: Path, label: str) -> tuple[SliceSpec, ...]:
    """``slices: [{sources: [{model, layer_range, <its parameters>}], parameters}]``."""
    if "models" in raw:
        raise PacerError(f"{label}: give models or slices, not both")
    items = raw["slices"]
    if not isinstance(items, list) or not items:
        raise PacerError(f"{label}: slices must be a list of {{sources: [...]}}")
    out = []
    for p, item in enumerate(items):
        where = f"{label}: slices[{p}]"
        item = _mapping(item, where)
        _check_keys(item, SLICE_KEYS, where)
        sources = item.get("sources")
        if not isinstance(sources, list) or not sources:
            raise PacerError(f"{where}.sources: expected a list of {{model, layer_range}}")
        parsed = []
        for i, source in enumerate(sources):
            at = f"{where}.sources[{i}]"
            source = _mapping(source, at)
            _check_keys(source, SOURCE_KEYS, at)
            span = source.get("layer_range")
            if (not isinstance(span, list) or len(span) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in span)
                    or span[0] >= span[1]):
                raise PacerError(f"{at}.layer_range: expected [start, end] with start < end, "
                                 f"got {span!r}")
            entry = _model_entry({k: v for k, v in source.items() if k != "layer_range"},
                                 base_dir, at)
            parsed.append(SliceSource(entry, span[0], span[1]))
        if len({s.end - s.start for s in parsed}) > 1:
            raise PacerError(f"{where}: its sources cover different numbers of layers "
                             f"({[[s.start, s.end] for s in parsed]}); give each the same")
        parameters = _mapping(item.get("parameters", {}), f"{where}.parameters")
        _check_keys(parameters, PARAMETER_KEYS, f"{where}.parameters")
        _check_parameters(parameters, f"{where}.parameters")
        out.append(SliceSpec(tuple(parsed), parameters))
    return tuple(out)


def _base_of(raw: dict, base_dir: Path) -> ModelRef | None:
    base = raw.get("base_model")
    return parse_ref(base, base_dir) if isinstance(base, str) else None


def _model_entry(item: Any, base_dir: Path, where: str) -> ModelEntry:
    if isinstance(item, ModelEntry):  # a slice's source, parsed already
        return item
    if isinstance(item, str):
        return ModelEntry(parse_ref(item, base_dir))
    if not isinstance(item, dict) or "model" not in item:
        raise PacerError(f"{where}: expected a model reference or a mapping with 'model'")
    _check_keys(item, MODEL_KEYS, where)
    parameters = {k: v for k, v in item.items() if k != "model"}
    _check_parameters(parameters, where)
    return ModelEntry(parse_ref(item["model"], base_dir), parameters)


def _output(raw: Any, base_dir: Path, where: str, name: str) -> OutputSpec:
    raw = _mapping(raw if raw is not None else {}, where)
    _check_keys(raw, OUTPUT_KEYS, where)
    path = Path(str(raw.get("path", f"./{name}"))).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    fmt = raw.get("save_format", "safetensors")
    if fmt != "safetensors":
        raise PacerError(f"{where}.save_format: only 'safetensors' is written, got {fmt!r}")
    dtype = raw.get("dtype", "auto")
    if dtype not in DTYPES:
        raise PacerError(f"{where}.dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    shard = parse_size(raw.get("shard_size", "5GB"), f"{where}.shard_size")
    target = raw.get("target", "transformers")
    if target not in TARGETS:
        raise PacerError(f"{where}.target: expected one of {', '.join(TARGETS)}, got {target!r}")
    copy = raw.get("copy_tokenizer", True)
    if not isinstance(copy, bool):
        raise PacerError(f"{where}.copy_tokenizer must be true or false, got {copy!r}")
    source = raw.get("tokenizer_source")
    if source is not None and source != "base":
        source = parse_ref(source, base_dir)
    return OutputSpec(path.resolve(), fmt, dtype, shard, target, source, copy)


def _check_tokenizer_source(output: OutputSpec, entries: tuple[ModelEntry, ...],
                            base: ModelRef | None, where: str) -> None:
    source = output.tokenizer_source
    if source is None:
        return
    if not output.copy_tokenizer:
        raise PacerError(f"{where}: no tokenizer is copied (copy_tokenizer: false); remove one "
                         "of the two")
    if source == "base":
        if base is None:
            raise PacerError(f"{where}: base, but the plan has no base_model; name one of the "
                             "models")
        return
    if source != base and source not in [e.ref for e in entries]:
        raise PacerError(f"{where}: {source.text!r} is not one of the models or the base "
                         "model; the tokenizer is copied from one of the inputs")


def _number_check(value: Any, where: str) -> None:
    _number(value, where)


def _density_check(value: Any, where: str) -> None:
    if not 0 < _number(value, where) <= 1:
        raise PacerError(f"{where} must be in (0, 1], got {value}")


def _bool_check(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise PacerError(f"{where} must be true or false, got {value!r}")


def _rescale_check(value: Any, where: str) -> None:
    if value not in RESCALES:
        raise PacerError(f"{where}: expected one of {', '.join(RESCALES)}, got {value!r}")


def _unit_check(value: Any, where: str) -> None:
    if not 0 <= _number(value, where) <= 1:
        raise PacerError(f"{where} must be in [0, 1], got {value}")


def _epsilon_check(value: Any, where: str) -> None:
    if not 0 <= _number(value, where) < 0.5:
        raise PacerError(f"{where} must be in [0, 0.5) (density ± epsilon are probabilities), "
                         f"got {value}")


def _positive_check(value: Any, where: str) -> None:
    if _number(value, where) <= 0:
        raise PacerError(f"{where} must be positive, got {value}")


def _count_check(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PacerError(f"{where} must be a positive integer, got {value!r}")


def _check_model_count(method: str, entries: tuple[ModelEntry, ...], base: ModelRef | None,
                       label: str) -> None:
    """A method's number of models (MODEL_COUNTS), a base listed among them not counted."""
    if method not in MODEL_COUNTS:
        return
    low, high = MODEL_COUNTS[method]
    key = (base.path, base.repo_id, base.revision) if base is not None else None
    listed = sum((e.ref.path, e.ref.repo_id, e.ref.revision) == key for e in entries)
    count = len(entries) - listed
    if count < low or (high is not None and count > high):
        want = f"exactly {low}" if low == high else f"at least {low}"
        besides = " besides its base_model" if method in BASE_METHODS or base is not None else ""
        raise PacerError(f"{label}: method {method} merges {want} model(s){besides}, got "
                         f"{count}; list them under models")


def _check_method_values(method: str, parameters: dict, entries: tuple[ModelEntry, ...],
                         label: str) -> None:
    """What only a method and a combination of values show (one value is checked alone)."""
    if method == "slerp" and "t" not in parameters:
        raise PacerError(f"{label}: method slerp needs parameters.t (0 gives the base_model, 1 "
                         "the other model)")
    if method.startswith("breadcrumbs") and parameters.get("rescale") == "inverse_density":
        raise PacerError(f"{label}: parameters.rescale inverse_density has no meaning for "
                         f"{method} (nothing is dropped at random); use l1 or none")
    if method.startswith("della"):  # where both are one number; per tensor: methods/dense.py
        for i, entry in enumerate(entries):
            d = entry.parameters.get("density", parameters.get("density", 1.0))
            e = entry.parameters.get("epsilon", parameters.get("epsilon", 0.15))
            if schedule.is_scalar(d) and schedule.is_scalar(e) and d < 1 \
                    and not (d - e > 0 and d + e < 1):
                raise PacerError(f"{label}: models[{i}]: della needs density - epsilon > 0 "
                                 f"and density + epsilon < 1, got density {d}, epsilon {e}")


# The check of one value of each parameter (a filter/gradient setting has each of its
# values checked; methods/schedule.py). Every key of PARAMETER_KEYS has one.
PARAMETER_CHECKS: dict[str, Any] = {
    "weight": _number_check,
    "lambda": _number_check,
    "density": _density_check,
    "normalize": _bool_check,
    "rescale": _rescale_check,
    "epsilon": _epsilon_check,
    "gamma": _unit_check,
    "t": _unit_check,
    "scale": _number_check,
    "nuslerp_flatten": _bool_check,
    "nuslerp_row_wise": _bool_check,
    "normalize_weights": _bool_check,
    "filter_wise": _bool_check,
    "eps": _positive_check,
    "tol": _positive_check,
    "max_iter": _count_check,
}


def _check_parameters(p: dict, where: str) -> None:
    """Types and ranges of parameter settings (each method checks its combination)."""
    for key, setting in p.items():
        for value, at in schedule.scalars(setting, f"{where}.{key}"):
            PARAMETER_CHECKS[key](value, at)


def _check_used(method: str, parameters: dict, entries: tuple[ModelEntry, ...],
                base: ModelRef | None, label: str) -> None:
    """Refuse every value the method would not read (see METHOD_PARAMETERS)."""
    uses = METHOD_PARAMETERS[method]
    hint = {"pacer": {"density": " (PACER's dense layers are the models' mean)"}}.get(
        method, {})
    for key in parameters:
        if key not in uses:
            raise PacerError(f"{label}: parameters.{key} has no effect with method {method}"
                             f"{hint.get(key, '')}; remove it (method {method} reads: "
                             f"{', '.join(uses)})")
    for i, entry in enumerate(entries):
        for key in PER_MODEL_KEYS:
            if key in entry.parameters and key not in uses:
                raise PacerError(f"{label}: models[{i}].{key} has no effect with method "
                                 f"{method}{hint.get(key, '')}; remove it")
    if method in WHOLE_MODEL_METHODS:
        varying = schedule.varies(parameters) + [
            f"models[{i}].{k}" for i, e in enumerate(entries) for k in schedule.varies(e.parameters)]
        if varying:
            raise PacerError(f"{label}: {varying[0]} varies by tensor (a filter or gradient), but "
                             f"method {method} uses one value per model for the whole model; "
                             "give one number")
    if base is not None and method in BASE_FREE_METHODS:
        what = BASE_FREE_REASONS[method]
        raise PacerError(f"{label}: method {method} {what}, so base_model would be ignored; "
                         "remove base_model" + (" or use task_arithmetic" if method == "linear"
                                                else ""))


def _check_pacer(p: dict, where: str) -> None:
    value = _number(p["interference_threshold"], f"{where}.interference_threshold")
    if not 0 <= value < 2:
        raise PacerError(f"{where}.interference_threshold out of range: {value}")
    if p["router_mode"] not in ROUTER_MODES:
        raise PacerError(f"{where}.router_mode: expected one of {', '.join(ROUTER_MODES)}, got "
                         f"{p['router_mode']!r}")
    if not isinstance(p["tome_r"], int) or isinstance(p["tome_r"], bool) or p["tome_r"] < 0:
        raise PacerError(f"{where}.tome_r must be a non-negative integer, got {p['tome_r']!r}")
    for key in ("top_k_experts", "max_sweeps"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1:
            raise PacerError(f"{where}.{key} must be a positive integer, got {p[key]!r}")
    if not isinstance(p["anchor_strategy"], str) or not p["anchor_strategy"]:
        raise PacerError(f"{where}.anchor_strategy: expected one of {', '.join(ANCHORS)} or one "
                         f"of the models, got {p['anchor_strategy']!r}")
    for key in ("enable_moe_upcycle", "align"):
        if not isinstance(p[key], bool):
            raise PacerError(f"{where}.{key} must be true or false, got {p[key]!r}")
    if p["max_param_growth"] is not None and _number(p["max_param_growth"], f"{where}.max_param_growth") < 1:
        raise PacerError(f"{where}.max_param_growth must be at least 1.0")
    if p["upcycle_fraction"] is not None:
        if not 0 <= _number(p["upcycle_fraction"], f"{where}.upcycle_fraction") <= 1:
            raise PacerError(f"{where}.upcycle_fraction must be in [0, 1], got "
                             f"{p['upcycle_fraction']}")
        if p["max_param_growth"] is not None:
            raise PacerError(f"{where}: give max_param_growth or upcycle_fraction, not both")
    if p["max_experts"] is not None and (not isinstance(p["max_experts"], int) or isinstance(
            p["max_experts"], bool) or p["max_experts"] < 2):
        raise PacerError(f"{where}.max_experts must be an integer of at least 2, got "
                         f"{p['max_experts']!r}")
    if not 0 <= _number(p["expert_distance"], f"{where}.expert_distance") <= 2:
        raise PacerError(f"{where}.expert_distance must be in [0, 2] (a cosine distance), got "
                         f"{p['expert_distance']}")
    if not 0 <= _number(p["regmean_alpha"], f"{where}.regmean_alpha") <= 1:
        raise PacerError(f"{where}.regmean_alpha must be in [0, 1], got {p['regmean_alpha']}")
    if not 0 <= _number(p["router_holdout"], f"{where}.router_holdout") < 1:
        raise PacerError(f"{where}.router_holdout must be in [0, 1), got {p['router_holdout']}")
    if _number(p["router_temperature"], f"{where}.router_temperature") <= 0:
        raise PacerError(f"{where}.router_temperature must be positive, got "
                         f"{p['router_temperature']}")


def _check_pacer_dense(given: dict, parameters: dict, label: str) -> None:
    """PACER's dense layers are the mean: DARE/TIES values would have no effect."""
    for key in DENSE_ONLY_PACER_KEYS:
        if key in given:
            raise PacerError(f"{label}: pacer.{key} has no effect: PACER merges its dense layers "
                             "as the models' mean (measured better than DARE/TIES on "
                             "benchmarks/quality); remove it, or use method: dare_ties")
    for key in DENSE_ONLY_PARAMETERS:
        if key in parameters:
            raise PacerError(f"{label}: parameters.{key} has no effect: PACER merges its dense "
                             "layers as the models' mean; remove it, or use method: dare_ties")


def _router_samples(raw: Any, entries: tuple[ModelEntry, ...], base_dir: Path,
                    where: str) -> dict[int, Path] | None:
    """``router_samples: {model: file}`` -> {model index: file}, one file for every model."""
    if raw is None:
        return None
    raw = _mapping(raw, where)
    samples: dict[int, Path] = {}
    for key, file in raw.items():
        ref = _anchor_ref(str(key), entries, None, base_dir, f"{where}: key", also=())
        k = next(i for i, e in enumerate(entries) if e.ref is ref)
        if not isinstance(file, str) or not file:
            raise PacerError(f"{where}.{key}: expected the path of a file of sample lines, got "
                             f"{file!r}")
        path = Path(file).expanduser()
        path = (base_dir / path if not path.is_absolute() else path).resolve()
        if not path.is_file():
            raise PacerError(f"{where}.{key}: sample file {path} not found")
        samples[k] = path
    missing = [e.ref.text for i, e in enumerate(entries) if i not in samples]
    if missing:
        raise PacerError(f"{where}: no sample file for {', '.join(missing)}; the few-shot router "
                         "needs samples of every model")
    return samples


def _router(pacer: dict, where: str) -> str | None:
    """The gate's kind: few_shot when samples are given (the default then); data_free only
    when asked for; None (no block is upcycled) otherwise: on benchmarks/quality the
    data-free gate routed no better than chance and its MoE was worse than the mean."""
    router = pacer["router"]
    if router is None:
        return "few_shot" if pacer["router_samples"] else None
    if router not in ROUTERS:
        raise PacerError(f"{where}: expected one of {', '.join(ROUTERS)}, got {router!r}")
    if router == "few_shot" and not pacer["router_samples"]:
        raise PacerError(f"{where}: few_shot needs pacer.router_samples ({{model: file of "
                         "sample lines}}); or use router: data_free")
    return router


def _sample_rule(pacer: dict, key: str, rules: tuple[str, ...], purpose: str,
                 where: str) -> str:
    """``pacer.vocabulary`` / ``pacer.dense``: ``rules[0]`` is fitted to samples (the default
    when there are any) and is refused without them; ``mean`` needs nothing."""
    rule = pacer[key]
    if rule is None:
        return rules[0] if _has_samples(pacer) else "mean"
    if rule not in rules:
        raise PacerError(f"{where}: expected one of {', '.join(rules)}, got {rule!r}")
    if rule == rules[0] and not _has_samples(pacer):
        raise PacerError(f"{where}: {rule} needs samples {purpose}: pacer.router_samples "
                         "({model: file of sample lines}) or router: data_free (each model "
                         "writes its own); or use mean")
    return rule


def _has_samples(pacer: dict) -> bool:
    """Sample lines given, or the data-free router, whose samples the models write."""
    return bool(pacer["router_samples"]) or pacer["router"] == "data_free"


def _anchor_ref(text: str, entries: tuple[ModelEntry, ...], base: ModelRef | None,
                base_dir: Path, where: str, also: tuple[str, ...] = ANCHORS) -> ModelRef:
    """A plan value naming a model (``anchor_strategy``, a ``router_samples`` key): it
    must be one of the plan's inputs; ``also`` lists the other values it could be."""
    known = [e.ref for e in entries] + ([base] if base is not None else [])
    try:
        ref = parse_ref(text, base_dir)
    except PacerError:
        ref = None
    if ref is None:
        known = []
    for candidate in known:
        if (candidate.path, candidate.repo_id, candidate.revision) == (ref.path, ref.repo_id,
                                                                       ref.revision):
            return candidate
    names = ", ".join(e.ref.text for e in entries)
    other = f"neither {' nor '.join(also)} nor" if also else "not"
    raise PacerError(f"{where}: {text!r} is {other} one of the models ({names})")


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise PacerError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PacerError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):  # YAML's .nan and .inf are floats too
        raise PacerError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _suggest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(raw: dict, known: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in known:
            raise PacerError(f"{where}: unknown key {key!r}{_suggest(key, known)}; "
                             f"known keys: {', '.join(known)}")
