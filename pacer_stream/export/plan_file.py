"""The plan as run: the output folder's ``pacer_plan.yaml``.

``pacer_plan.yaml`` is the plan as run (every default filled in, paths absolute, hub ids
pinned to the commit that was read when the cache tells it, the effective shard size), so
``pacer-stream run`` on a copy of it makes the same weights again. It holds no timestamp
or anything else that differs between a run and its resume: a killed run resumed with the
same command writes it byte for byte again. The model card (:mod:`.card`) tells how to
re-run it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path, PurePath
from typing import Any, Sequence

import yaml

from .. import __version__
from ..config import PlanConfig
from ..config_pacer import DENSE_ONLY_PACER_KEYS
from ..errors import PacerError
from ..io.reader import CheckpointIndex
from ..io.sources import ModelFiles, ModelRef
from ..io.writer import write_atomic
from ..slices import slice_models

PLAN_FILE = "pacer_plan.yaml"
PLAN_HEADER = """\
# The plan this folder was made with, written by pacer-stream {version} when the run finished:
# every setting as validated (defaults filled in), paths absolute, hub ids with their revision.
# A plan may not lie inside its own output folder: to re-run it, copy this file out, set
# output.path to a new folder, and run  pacer-stream run pacer_plan.yaml
"""


def ref_text(ref: ModelRef) -> str:
    """A reference as a plan writes it unambiguously: the absolute folder, or org/name@rev."""
    if ref.path is not None:
        return str(ref.path)
    return f"{ref.repo_id}@{ref.revision}" if ref.revision else str(ref.repo_id)


def plan_dict(config: PlanConfig) -> dict[str, Any]:
    """``config`` as the plain mapping of a plan file that parses back to it."""
    out: dict[str, Any] = {
        "project_name": config.project_name,
        "method": config.method,
        "parameters": dict(config.parameters),
        "seed": config.seed,
        "align": config.align,
        "accept_config_differences": list(config.accept_config_differences),
        "output": {f.name: _plain(getattr(config.output, f.name))
                   for f in dataclasses.fields(config.output)},
    }
    if config.slices:
        out["slices"] = [{"sources": [{**_entry(s.entry), "layer_range": [s.start, s.end]}
                                      for s in piece.sources],
                          "parameters": dict(piece.parameters)} for piece in config.slices]
    else:
        out["models"] = [_entry(e) for e in config.models]
    if config.base_model is not None:
        out["base_model"] = ref_text(config.base_model)
    pacer = _pacer_dict(config)
    if pacer:
        out["pacer"] = pacer
    return out


def plan_yaml(config: PlanConfig) -> str:
    """``pacer_plan.yaml``'s text: a header comment, then the plan (sorted keys: the same
    plan always gives the same bytes)."""
    body = yaml.safe_dump(plan_dict(config), sort_keys=True, allow_unicode=True)
    return PLAN_HEADER.format(version=__version__) + body


def _entry(entry) -> dict[str, Any]:
    return {"model": ref_text(entry.ref), **entry.parameters}


def _pacer_dict(config: PlanConfig) -> dict[str, Any]:
    """The ``pacer`` keys the method reads, as validated: all of them for pacer, the
    alignment's for another method that aligns, none otherwise (the parser refuses the
    rest, and PacerKit's dropout_rate, which PACER refuses)."""
    if config.method == "pacer":
        keys = [k for k in config.pacer if k not in DENSE_ONLY_PACER_KEYS]
    elif config.align:
        keys = ["anchor_strategy", "max_sweeps"]
    else:
        return {}
    pacer = {k: _plain(config.pacer[k]) for k in keys}
    samples = config.pacer.get("router_samples")
    if "router_samples" in pacer and samples:
        pacer["router_samples"] = {ref_text(config.models[k].ref): str(path)
                                   for k, path in sorted(samples.items())}
    return pacer


def _plain(value: Any) -> Any:
    """A plan value as YAML writes it (a reference or path as its text, tuples as lists)."""
    if isinstance(value, ModelRef):
        return ref_text(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def plan_as_run(config: PlanConfig, inputs: Sequence[CheckpointIndex],
                shard_size: int) -> PlanConfig:
    """The plan that reproduces this run: ``--shard-size`` folded in, and hub models
    pinned to the commit read (``inputs``: the models' indexes, then the base's)."""
    if config.slices:  # virtual inputs (slices.py): their files hold each real model's
        by_ref = [(ref, _pinned(ref, files))
                  for ref, files in zip(input_refs(config), inputs[0].files.members)]

        def pin(ref):
            return next((p for r, p in by_ref if r == ref), ref) if isinstance(ref, ModelRef) \
                else ref
    else:
        pinned = {id(ref): _pinned(ref, index.files)
                  for ref, index in zip(input_refs(config), inputs)}

        def pin(ref):
            return pinned.get(id(ref), ref) if isinstance(ref, ModelRef) else ref

    pacer = {**config.pacer, "anchor_strategy": pin(config.pacer["anchor_strategy"])}
    source = config.output.tokenizer_source  # its own reference, equal to one of the inputs'
    if isinstance(source, ModelRef):
        source = next(pin(ref) for ref in input_refs(config) if ref == source)
    slices = tuple(dataclasses.replace(piece, sources=tuple(
        dataclasses.replace(s, entry=dataclasses.replace(s.entry, ref=pin(s.ref)))
        for s in piece.sources)) for piece in config.slices)
    return dataclasses.replace(
        config, models=tuple(dataclasses.replace(e, ref=pin(e.ref)) for e in config.models),
        base_model=pin(config.base_model), pacer=pacer, slices=slices,
        output=dataclasses.replace(config.output, shard_size=shard_size,
                                   tokenizer_source=source))


def input_refs(config: PlanConfig) -> list[ModelRef]:
    """The models' references, then the base model's (the order of the run's inputs); for
    a sliced plan, every model its slices read, once each, in order of first use."""
    if config.slices:
        return slice_models(config.slices)
    return [e.ref for e in config.models] + ([config.base_model] if config.base_model else [])


def _pinned(ref: ModelRef, files: ModelFiles) -> ModelRef:
    """A hub reference at the commit its cached config.json came from (the cache's
    ``snapshots/<commit>/``); the reference as written when that is not known."""
    if ref.repo_id is None:
        return ref
    try:
        cached = files.local_path("config.json")
    except (PacerError, OSError, ValueError):
        return ref
    if cached is None or Path(cached).parent.parent.name != "snapshots":
        return ref
    commit = Path(cached).parent.name
    return ModelRef(f"{ref.repo_id}@{commit}", repo_id=ref.repo_id, revision=commit)


def write_plan(out_dir: Path, config: PlanConfig) -> None:
    write_atomic(out_dir / PLAN_FILE, plan_yaml(config))
