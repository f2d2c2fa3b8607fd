"""Mergekit configuration files, read as pacer-stream plans.

A mergekit user's YAML runs as it is: ``pacer-stream run merge.yml OUT``. A file is
mergekit's when it has ``merge_method`` (a plan has ``method``). :func:`to_plan` turns it
into the plan mapping that config.py validates, with these correspondences::

    merge_method                    method
    models: [{model, parameters}]   models: [{model, <parameters>}]  (a model's own values)
    slices: [{sources: [{model, layer_range, parameters}], parameters}]
                                    slices (slices.py): the output's blocks assembled from
                                    layer ranges, each slice merged from its sources
    base_model                      base_model; for the task-vector methods a base listed
                                    among the models is dropped from them, as mergekit
                                    skips its (zero) task vector; linear ignores a base, as
                                    mergekit's does
    parameters (scalars, filters, gradients)
                                    parameters (methods/schedule.py: the same semantics);
                                    a slice's parameters go before the top-level ones
    rescale: true / false / absent  rescale: l1 / none / l1 for dare_* (mergekit's default)
    out_dtype, else dtype           output.dtype (pacer-stream always computes in fp32)
    tokenizer_source: base | model  output.tokenizer_source
    the OUT argument                output.path

Refused by name, with what to do: ``modules``, a ``base_model`` per slice,
``tokenizer_source: union``, ``tokenizer``, ``chat_template``, LoRA references
(``model+lora``), and any key mergekit itself does not know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import PacerError

TOP_KEYS = ("merge_method", "models", "slices", "modules", "base_model", "dtype", "out_dtype",
            "parameters", "tokenizer_source", "tokenizer", "chat_template")
REFUSED = {
    "modules": "multi-module configurations are not supported; merge one module (models or "
               "slices)",
    "tokenizer": "the tokenizer block (vocabulary merging) is not supported; use "
                 "tokenizer_source: base or a model",
    "chat_template": "chat_template is not supported; edit tokenizer_config.json of the output",
}
# mergekit methods whose base model's task vector is zero: a base listed among the models
# is no model of the merge
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "della",
                       "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock")
BASE_IGNORED = ("linear",)  # mergekit's linear averages the listed models, base or not
# mergekit's DARE rescales by the L1-norm ratio by default (rescale: true), pacer-stream's
# by 1/density (the paper's rule): a mergekit file gets mergekit's default
L1_DEFAULT = ("dare_linear", "dare_ties")
# mergekit parameters with no effect on the result (memory layout only)
NO_EFFECT = ("int8_mask",)
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_mergekit(raw: Any) -> bool:
    """A mergekit configuration (``merge_method``), not a pacer-stream plan (``method``)."""
    return isinstance(raw, dict) and "merge_method" in raw


def to_plan(raw: dict, label: str, out: Path | None, name: str) -> tuple[dict, list[str]]:
    """The plan mapping for a mergekit configuration, and notes on what was read as what."""
    if "method" in raw:
        raise PacerError(f"{label}: has both merge_method (mergekit) and method (pacer-stream); "
                         "keep one")
    for key in raw:
        if key in REFUSED:
            raise PacerError(f"{label}: mergekit's {key}: {REFUSED[key]}")
        if key not in TOP_KEYS:
            raise PacerError(f"{label}: {key!r} is not a mergekit configuration key "
                             f"(mergekit's are: {', '.join(TOP_KEYS)})")
    if out is None:
        raise PacerError(f"{label}: a mergekit configuration names no output folder; give it "
                         f"after the file: pacer-stream run {label} OUT")
    method = raw["merge_method"]
    notes = [f"read {label} as a mergekit configuration (merge_method {method})"]
    parameters = _parameters(raw.get("parameters"), f"{label}: parameters", notes)
    if ("models" in raw) == ("slices" in raw):
        raise PacerError(f"{label}: give exactly one of models and slices")
    plan: dict[str, Any] = {"project_name": name, "method": method,
                            "output": {"path": str(out)}}
    if "models" in raw:
        models = _models(raw["models"], f"{label}: models", notes)
    else:
        plan["slices"] = _slices(raw["slices"], f"{label}: slices", notes)
        models = []  # a slice lists its base among its sources (slices.py)
    base = raw.get("base_model")
    if base is not None:
        _check_ref(base, f"{label}: base_model")
        listed = [m for m in models if m["model"] == base]
        if method in TASK_VECTOR_METHODS and listed:
            models = [m for m in models if m["model"] != base]
            notes.append(f"base_model {base} is also listed among the models: its task vector "
                         "is zero, so it is dropped from them (as mergekit skips it)")
        elif method in BASE_IGNORED:
            notes.append(f"base_model is ignored by {method} (as by mergekit's)")
            base = None
    if method in L1_DEFAULT and "rescale" not in parameters:
        parameters["rescale"] = "l1"
        notes.append(f"{method}: mergekit rescales by the L1-norm ratio unless told not to; "
                     "so does this run (rescale: l1)")
    if "models" in raw:
        plan["models"] = models
    if base is not None:
        plan["base_model"] = base
    if parameters:
        plan["parameters"] = parameters
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise PacerError(f"{label}: dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        plan["output"]["dtype"] = DTYPES[dtype]
        if raw.get("dtype") not in (None, "float32", "fp32"):
            notes.append(f"dtype {raw['dtype']}: the output is written in {DTYPES[dtype]}; "
                         "pacer-stream computes in float32 whatever the dtype (mergekit "
                         "computes in it)")
    source = raw.get("tokenizer_source")
    if source is not None:
        if source == "union":
            raise PacerError(f"{label}: tokenizer_source: union (merging vocabularies) is not "
                             "supported; use base or one of the models")
        plan["output"]["tokenizer_source"] = source
    return plan, notes


def _models(items: Any, where: str, notes: list[str]) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise PacerError(f"{where}: expected a list of {{model: ..., parameters: ...}}")
    out = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise PacerError(f"{at}: expected {{model: ..., parameters: ...}}, got {item!r}")
        unknown = [k for k in item if k not in ("model", "parameters")]
        if unknown:
            raise PacerError(f"{at}: {unknown[0]!r} is not a mergekit model key (model, "
                             "parameters)")
        _check_ref(item["model"], f"{at}.model")
        entry = {"model": item["model"]}
        entry.update(_parameters(item.get("parameters"), f"{at}.parameters", notes))
        out.append(entry)
    return out


def _slices(items: Any, where: str, notes: list[str]) -> list[dict]:
    """mergekit's slices as a plan's: each source's parameters become its own keys."""
    if not isinstance(items, list) or not items:
        raise PacerError(f"{where}: expected a list of slices")
    out = []
    for p, piece in enumerate(items):
        at = f"{where}[{p}]"
        if not isinstance(piece, dict) or "sources" not in piece:
            raise PacerError(f"{at}: expected {{sources: [...]}}")
        unknown = [k for k in piece if k not in ("sources", "parameters", "base_model")]
        if unknown:
            raise PacerError(f"{at}: {unknown[0]!r} is not a mergekit slice key (sources, "
                             "parameters)")
        if "base_model" in piece:
            raise PacerError(f"{at}.base_model: a base per slice is not supported; give "
                             "base_model at the top level and list it among each slice's sources")
        if not isinstance(piece["sources"], list) or not piece["sources"]:
            raise PacerError(f"{at}.sources: expected a list of {{model, layer_range}}")
        sources = []
        for i, source in enumerate(piece["sources"]):
            if not isinstance(source, dict) or "layer_range" not in source:
                raise PacerError(f"{at}.sources[{i}]: expected {{model: ..., layer_range: "
                                 "[start, end]}}")
            item = {k: v for k, v in source.items() if k != "layer_range"}
            entry = _models([item], f"{at}.sources", notes)[0]
            sources.append({**entry, "layer_range": source["layer_range"]})
        slice_ = {"sources": sources}
        if piece.get("parameters"):
            slice_["parameters"] = _parameters(piece["parameters"], f"{at}.parameters", notes)
        out.append(slice_)
    return out


def _parameters(raw: Any, where: str, notes: list[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PacerError(f"{where}: expected a mapping, got {raw!r}")
    out = {}
    for key, value in raw.items():
        if key in NO_EFFECT:
            notes.append(f"{where.split(': ')[-1]}.{key} has no effect on the result here; "
                         "ignored")
        elif key == "rescale" and isinstance(value, bool):
            out[key] = "l1" if value else "none"  # mergekit's rescale: the L1-norm ratio
        else:
            out[key] = value
    return out


def _check_ref(ref: Any, where: str) -> None:
    if isinstance(ref, str) and "+" in ref and not Path(ref).expanduser().exists():
        raise PacerError(f"{where}: {ref!r} applies a LoRA (model+lora), which is not "
                         "supported; merge the LoRA into its model first")
