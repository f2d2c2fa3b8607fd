"""The plan's models and its output: ``models`` entries, ``base_model``, ``slices`` (layer
ranges of several models), the values that name one of the models (``anchor_strategy``,
``router_samples`` keys, ``output.tokenizer_source``), and the ``output`` section.

Relative paths are resolved against the plan file's folder (``base_dir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config_methods import PARAMETER_KEYS, PER_MODEL_KEYS, check_parameters
from .config_schema import ANCHORS, ModelEntry, OutputSpec, as_mapping, check_keys
from .errors import PacerError
from .io.sources import ModelRef, parse_ref
from .sizes import parse_size
from .slices import SliceSource, SliceSpec

DTYPES = ("auto", "float32", "float16", "bfloat16")
SLICE_KEYS = ("sources", "parameters")
OUTPUT_KEYS = ("path", "save_format", "dtype", "shard_size", "target", "tokenizer_source",
               "copy_tokenizer")
# Who runs the output (export/llamacpp.py): the minimal layout for transformers and vLLM,
# or one llama.cpp converts and runs (every block a MoE block when any is).
TARGETS = ("transformers", "llama.cpp")
MODEL_KEYS = ("model",) + PER_MODEL_KEYS
SOURCE_KEYS = MODEL_KEYS + ("layer_range",)  # a slice's source: a model entry and its layers


def parse_slices(raw: dict, base_dir: Path, label: str) -> tuple[SliceSpec, ...]:
    """``slices: [{sources: [{model, layer_range, <its parameters>}], parameters}]``."""
    if "models" in raw:
        raise PacerError(f"{label}: give models or slices, not both")
    out = []
    for where, item in mappings(raw["slices"], SLICE_KEYS, f"{label}: slices",
                                f"{label}: slices must be a list of {{sources: [...]}}"):
        parsed = []
        for at, source in mappings(item.get("sources"), SOURCE_KEYS, f"{where}.sources",
                                   f"{where}.sources: expected a list of "
                                   "{model, layer_range}"):
            span = source.get("layer_range")
            if (not isinstance(span, list) or len(span) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in span)
                    or span[0] >= span[1]):
                raise PacerError(f"{at}.layer_range: expected [start, end] with start < end, "
                                 f"got {span!r}")
            entry = model_entry({k: v for k, v in source.items() if k != "layer_range"},
                                base_dir, at)
            parsed.append(SliceSource(entry, span[0], span[1]))
        if len({s.end - s.start for s in parsed}) > 1:
            raise PacerError(f"{where}: its sources cover different numbers of layers "
                             f"({[[s.start, s.end] for s in parsed]}); give each the same")
        parameters = as_mapping(item.get("parameters", {}), f"{where}.parameters")
        check_keys(parameters, PARAMETER_KEYS, f"{where}.parameters")
        check_parameters(parameters, f"{where}.parameters")
        out.append(SliceSpec(tuple(parsed), parameters))
    return tuple(out)


def mappings(value: Any, keys: tuple[str, ...], where: str, refusal: str):
    """A non-empty list's items as (``where[i]``, mapping), each mapping's keys checked;
    anything else is refused with ``refusal``."""
    if not isinstance(value, list) or not value:
        raise PacerError(refusal)
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        item = as_mapping(item, at)
        check_keys(item, keys, at)
        yield at, item


def base_of(raw: dict, base_dir: Path) -> ModelRef | None:
    base = raw.get("base_model")
    return parse_ref(base, base_dir) if isinstance(base, str) else None


def model_entry(item: Any, base_dir: Path, where: str) -> ModelEntry:
    if isinstance(item, ModelEntry):  # a slice's source, parsed already
        return item
    if isinstance(item, str):
        return ModelEntry(parse_ref(item, base_dir))
    if not isinstance(item, dict) or "model" not in item:
        raise PacerError(f"{where}: expected a model reference or a mapping with 'model'")
    check_keys(item, MODEL_KEYS, where)
    parameters = {k: v for k, v in item.items() if k != "model"}
    check_parameters(parameters, where)
    return ModelEntry(parse_ref(item["model"], base_dir), parameters)


def parse_output(raw: Any, base_dir: Path, where: str, name: str) -> OutputSpec:
    raw = as_mapping(raw if raw is not None else {}, where)
    check_keys(raw, OUTPUT_KEYS, where)
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


def check_tokenizer_source(output: OutputSpec, entries: tuple[ModelEntry, ...],
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


def anchor_ref(text: str, entries: tuple[ModelEntry, ...], base: ModelRef | None,
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
