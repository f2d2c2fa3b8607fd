"""The plan file: read, and every section validated, up front (load_plan, parse_plan).

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

The sections are validated where their rules live: config_methods.py (what each method
takes), config_models.py (models, slices, output), config_pacer.py (the ``pacer:``
section); the types they build are in config_schema.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from . import mergekit_yaml
from .config_methods import (BASE_METHODS, METHODS, MODEL_COUNTS, PARAMETER_KEYS,
                             check_method_values, check_model_count, check_parameters,
                             check_used)
from .config_models import (anchor_ref, base_of, check_tokenizer_source, model_entry,
                            parse_output, parse_slices)
from .config_pacer import (ALIGN_PACER_KEYS, DENSE_RULES,
                           VOCABULARY_RULES, check_pacer, check_pacer_dense, router_kind,
                           router_samples, sample_rule)
from .config_schema import ANCHORS, PACER_DEFAULTS, PlanConfig, as_mapping, check_keys, suggest
from .errors import PacerError
from .io.sources import parse_ref

# The entry points, and PlanConfig, which most callers import from here.
__all__ = ["load_plan", "parse_plan", "PlanConfig"]

TOP_KEYS = ("project_name", "models", "slices", "base_model", "output", "method", "parameters",
            "pacer", "seed", "align", "accept_config_differences", "backend")
BACKENDS = ("local", "ray")
ALIGN_MODES = (True, False, "only")  # "only": write each input re-based onto the anchor


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
    check_keys(raw, TOP_KEYS, label)
    slices = parse_slices(raw, base_dir, label) if "slices" in raw else ()
    models = raw.get("models") if not slices else [
        s.entry for s in slices[0].sources if s.ref != base_of(raw, base_dir)]
    at_least = MODEL_COUNTS.get(raw.get("method"), (2,))[0]
    if not isinstance(models, list) or len(models) < max(at_least, 1):
        raise PacerError(f"{label}: 'models' must list at least "
                         f"{'two models' if at_least > 1 else 'one model'} to merge")
    entries = tuple(model_entry(m, base_dir, f"{label}: models[{i}]") for i, m in enumerate(models))

    method = raw.get("method", "pacer")
    if method not in METHODS:
        raise PacerError(f"{label}: unknown method {method!r}{suggest(method, METHODS)} "
                         f"(choose from {', '.join(METHODS)})")
    base = raw.get("base_model")
    base_ref = parse_ref(base, base_dir) if base is not None else None
    if method in BASE_METHODS and base_ref is None:
        raise PacerError(f"{label}: method {method} needs 'base_model'")
    check_model_count(method, entries, base_ref, label)

    parameters = as_mapping(raw.get("parameters", {}), f"{label}: parameters")
    check_keys(parameters, PARAMETER_KEYS, f"{label}: parameters")
    check_parameters(parameters, f"{label}: parameters")
    check_used(method, parameters, entries, base_ref, label)
    check_method_values(method, parameters, entries, label)
    given_pacer = as_mapping(raw.get("pacer", {}), f"{label}: pacer")
    check_keys(given_pacer, tuple(PACER_DEFAULTS), f"{label}: pacer")
    pacer = {**PACER_DEFAULTS, **given_pacer}
    check_pacer(pacer, f"{label}: pacer")
    if pacer["anchor_strategy"] not in ANCHORS:
        pacer["anchor_strategy"] = anchor_ref(pacer["anchor_strategy"], entries, base_ref,
                                              base_dir, f"{label}: pacer.anchor_strategy")
    if method == "pacer":
        check_pacer_dense(given_pacer, parameters, label)
        pacer["router_samples"] = router_samples(pacer["router_samples"], entries, base_dir,
                                                 f"{label}: pacer.router_samples")
        pacer["router"] = router_kind(pacer, f"{label}: pacer.router")
        pacer["vocabulary"] = sample_rule(pacer, "vocabulary", VOCABULARY_RULES,
                                          "to count which tokens each model uses",
                                          f"{label}: pacer.vocabulary")
        pacer["dense"] = sample_rule(pacer, "dense", DENSE_RULES,
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
    output = parse_output(raw.get("output"), base_dir, f"{label}: output", name)
    check_tokenizer_source(output, entries, base_ref, f"{label}: output.tokenizer_source")
    if slices and (method in ("pacer", "split_merge") or align):
        what = f"method {method}" if method in ("pacer", "split_merge") else "align"
        raise PacerError(f"{label}: slices with {what}: its statistics need whole models, "
                         "which slices take apart; use a plain method (passthrough, linear, "
                         "slerp, ...) without align")
    backend, address = parse_backend(raw.get("backend"), f"{label}: backend")
    return PlanConfig(name, entries, output,
                      method, base_ref, parameters, pacer, seed, None, align, tuple(accept),
                      slices=slices, backend=backend, address=address)


def parse_backend(raw: Any, where: str) -> tuple[str | None, str | None]:
    """``backend: ray`` or ``backend: {name: ray, address: HOST:PORT}`` (absent: None)."""
    if raw is None:
        return None, None
    given = {"name": raw} if isinstance(raw, str) else as_mapping(raw, where)
    check_keys(given, ("name", "address"), where)
    name, address = given.get("name"), given.get("address")
    if name not in BACKENDS:
        raise PacerError(f"{where}: {name!r} is not a backend (choose from "
                         f"{', '.join(BACKENDS)})")
    if address is not None and (name != "ray" or not isinstance(address, str) or not address):
        raise PacerError(f"{where}.address: the HOST:PORT of a Ray cluster, for name: ray; "
                         f"got {address!r}")
    return name, address
