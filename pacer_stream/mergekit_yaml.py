"""Mergekit configuration files, read as pacer-stream plans.

A mergekit user's YAML runs as it is: ``pacer-stream run merge.yml OUT``. A file is
mergekit's when it has ``merge_method`` (a plan has ``method``). :func:`to_plan` turns it
into the plan mapping that config.py validates, with these correspondences::

    merge_method                    method
    models: [{model, parameters}]   models: [{model, <parameters>}]  (a model's own values)
    slices: one slice, every source layer_range [0, L]
                                    the same as models (layer_range is checked against each
                                    model's num_hidden_layers when the models are read)
    base_model                      base_model; for the task-vector methods a base listed
                                    among the models is dropped from them, as mergekit
                                    skips its (zero) task vector; linear ignores a base, as
                                    mergekit's does
    parameters (scalars, filters, gradients)
                                    parameters (methods/schedule.py: the same semantics);
                                    a slice's parameters go before the top-level ones
    out_dtype, else dtype           output.dtype (pacer-stream always computes in fp32)
    tokenizer_source: base | model  output.tokenizer_source
    the OUT argument                output.path

Refused by name, with what to do: ``modules``, slices that take part of a model or several
slices (frankenmerges), ``tokenizer_source: union``, ``tokenizer``, ``chat_template``,
LoRA references (``model+lora``), and any key mergekit itself does not know.
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
# mergekit parameters with no effect on the result (memory layout only)
NO_EFFECT = ("int8_mask",)
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_mergekit(raw: Any) -> bool:
    """A mergekit configuration (``merge_method``), not a pacer-stream plan (``method``)."""
    return isinstance(raw, dict) and "merge_method" in raw


def to_plan(raw: dict, label: str, out: Path | None, name: str
            ) -> tuple[dict, list[str], tuple[int, int] | None]:
    """The plan mapping for a mergekit configuration, notes on what was read as what, and
    the layer range every model must cover (from a slice; None for ``models``)."""
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
    if "models" in raw:
        models, layer_range = _models(raw["models"], f"{label}: models", notes), None
    else:
        models, layer_range, slice_parameters = _one_slice(raw["slices"], f"{label}: slices",
                                                           notes)
        parameters = _before(slice_parameters, parameters)
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
    plan: dict[str, Any] = {"project_name": name, "models": models,
                            "method": method, "output": {"path": str(out)}}
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
    return plan, notes, layer_range


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


def _one_slice(slices: Any, where: str, notes: list[str]
               ) -> tuple[list[dict], tuple[int, int], dict]:
    """A slices block that is a plain merge: one slice, every source the same whole range."""
    if not isinstance(slices, list) or not slices:
        raise PacerError(f"{where}: expected a list of slices")
    if len(slices) > 1:
        raise PacerError(f"{where}: {len(slices)} slices: assembling layers from several "
                         "slices (frankenmerges, layer stacking) is not supported yet; merge "
                         "with one slice over all layers, or with models")
    piece = slices[0]
    if not isinstance(piece, dict) or "sources" not in piece:
        raise PacerError(f"{where}[0]: expected {{sources: [...]}}")
    unknown = [k for k in piece if k not in ("sources", "parameters", "base_model")]
    if unknown:
        raise PacerError(f"{where}[0]: {unknown[0]!r} is not supported in a slice "
                         "(sources, parameters)")
    if "base_model" in piece:
        raise PacerError(f"{where}[0].base_model: give base_model at the top level")
    sources = piece["sources"]
    if not isinstance(sources, list) or not sources:
        raise PacerError(f"{where}[0].sources: expected a list of {{model, layer_range}}")
    ranges = set()
    items = []
    for i, source in enumerate(sources):
        at = f"{where}[0].sources[{i}]"
        if not isinstance(source, dict) or "layer_range" not in source:
            raise PacerError(f"{at}: expected {{model: ..., layer_range: [start, end]}}")
        span = source["layer_range"]
        if (not isinstance(span, list) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise PacerError(f"{at}.layer_range: expected [start, end], got {span!r}")
        ranges.add(tuple(span))
        items.append({k: v for k, v in source.items() if k != "layer_range"})
    if len(ranges) > 1 or next(iter(ranges))[0] != 0:
        raise PacerError(f"{where}[0]: sources with layer ranges {sorted(ranges)}: a slice "
                         "that takes part of a model (frankenmerges) is not supported yet; "
                         "every source must cover [0, its number of layers]")
    notes.append("one slice over every layer: merged as models")
    return (_models(items, f"{where}[0].sources", notes), next(iter(ranges)),
            _parameters(piece.get("parameters"), f"{where}[0].parameters", notes))


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


def _before(first: dict, then: dict) -> dict:
    """Settings where ``first`` takes precedence over ``then`` key by key, but falls back
    to ``then`` for a tensor that none of its filters match (mergekit's precedence)."""
    out = dict(then)
    for key, setting in first.items():
        out[key] = _conditions(setting) + _conditions(then[key]) if key in then else setting
    return out


def _conditions(setting: Any) -> list:
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        return list(setting)
    if isinstance(setting, dict):
        return [setting]
    return [{"value": setting}]


def _check_ref(ref: Any, where: str) -> None:
    if isinstance(ref, str) and "+" in ref and not Path(ref).expanduser().exists():
        raise PacerError(f"{where}: {ref!r} applies a LoRA (model+lora), which is not "
                         "supported; merge the LoRA into its model first")
