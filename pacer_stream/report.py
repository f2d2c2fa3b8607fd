"""What a finished output says of itself: pacer_report.json (the run, alignment, PACER's
per-block interference and decision, the dense rule, a method's own sections), and the
tokenizer files, the plan as run and the model card beside the weights.
"""

from __future__ import annotations

import json
import math

import torch

from . import __version__
from .export.card import model_card, write_card
from .export.plan_file import plan_as_run, write_plan
from .export.dense import copy_side_files
from .io.reader import CheckpointIndex
from .io.writer import write_atomic
from .job import MergeContext
from .memory import peak_rss
from .methods.consensus import model_similarity
from .output_layout import target_cost

REPORT = "pacer_report.json"


def write_report(ctx: MergeContext, state) -> None:
    summary = ctx.summary
    report = {
        "tool": f"pacer-stream {__version__}", "method": ctx.config.method,
        "params": ctx.param_record(), "seed": ctx.config.seed,
        "models": [m.label for m in ctx.models.models],
        "base_model": ctx.models.base.label if ctx.models.base else None,
        "budget_bytes": ctx.budget, "device": ctx.options.device,
        "backend": ctx.options.backend,
        "units": state.units, "attempts": state.group.attrs.get("attempts"),
        "this_run": {"units_done": summary.units_done,
                     "units_skipped": summary.units_skipped,
                     "read_bytes": summary.read_bytes,
                     "peak_rss_bytes": max(summary.peak_rss, peak_rss())},
        "shards": [{"file": s.file, "bytes": s.size, "tensors": len(s.tensors)}
                   for s in ctx.shards],
        "align": ctx.align_report,
        "pacer": pacer_report(ctx),
        "vocabulary": ctx.vocab_report,
        "dense": dense_report(ctx),
        **ctx.method_report,
    }
    summary.pacer = report["pacer"]
    summary.dense, summary.vocabulary = report["dense"], report["vocabulary"]
    write_atomic(ctx.out_dir / REPORT, json.dumps(report, indent=1, sort_keys=True) + "\n")


def pacer_report(ctx: MergeContext) -> dict | None:
    """Per-block interference, the decision and the parameter accounting."""
    if ctx.decision is None:
        return None
    d, out = ctx.decision, ctx.output
    exported = list(out.layout.upcycled) if out.layout is not None else []
    blocks = []
    for layer, parts in sorted(ctx.stats.items()):
        entry = {"layer": layer, "selected": layer in d.blocks, "upcycled": layer in exported,
                 "movement": movement(ctx, layer)}
        entry.update({part: stats.summary() for part, stats in parts.items()})
        blocks.append(entry)
    source = ctx.source_params
    output = sum(math.prod(r.shape) for r in out.recipes) if out.target is None \
        else out.target.parameters()
    layers = ctx.models.graph.dims["layers"]
    mlp_fraction = sum(ctx.mlp_params(b) for b in range(layers)) / source
    m = d.num_experts if exported else 1
    formula = source * (1 + mlp_fraction * (len(exported) / layers) * (m - 1))
    target = target_cost(ctx)  # the formula is the default layout's
    default_output = target.get("default_parameters", output)
    return {
        "metric": "base_interference" if ctx.models.base is not None else "interference",
        "threshold": ctx.config.pacer["interference_threshold"],
        "blocks": blocks, "decision": d.to_json(),
        "exported_as": (out.target.model_type if out.target else ctx.moe_type)
        if exported else "dense",
        "parameters": {"source": source, "output": output, "growth": output / source,
                       "mlp_fraction": mlp_fraction, "formula": formula,
                       "router_and_zero_tensors": default_output - round(formula)},
        "router": ctx.router_report or ({"kind": ctx.router_kind} if exported else None),
        "target": target,
        "model_similarity": model_similarity([p for parts in ctx.stats.values()
                                              for p in parts.values()]),
    }


def movement(ctx: MergeContext, layer: int) -> dict[str, float]:
    """Per peer, the fraction of this block's MLP units that alignment moved."""
    out = {}
    for k, perms in sorted(ctx.reads.perms.items()):
        perm = perms.get(f"block.{layer}/mlp")
        if perm is not None:
            moved = (perm != torch.arange(perm.shape[-1])).float().mean().item()
            out[ctx.inputs[k].label] = moved
    return out


def dense_report(ctx: MergeContext) -> dict | None:
    """PACER's rule for the linear layers it did not upcycle, and from which samples."""
    if ctx.config.method != "pacer":
        return None
    if not ctx.regmean_names:
        return {"rule": "mean"}
    return {"rule": "regmean", "alpha": ctx.config.pacer["regmean_alpha"],
            "tensors": len(ctx.regmean_names), "samples": ctx.samples.note or
            "the sample lines of pacer.router_samples"}


def describe_output(ctx: MergeContext, out_config: dict, pacer: dict | None = None) -> None:
    """What the output folder says of itself, before its config.json: the tokenizer
    files, the plan as run (pacer_plan.yaml) and the model card."""
    tokenizer = tokenizer_input(ctx)
    side_files = copy_side_files(ctx.out_dir, tokenizer) if tokenizer else []
    as_run = plan_as_run(ctx.config, ctx.inputs, ctx.shard_size)
    write_plan(ctx.out_dir, as_run)
    write_card(ctx.out_dir, model_card(
        as_run, ctx.models.models, ctx.models.spec.family, ctx.param_record(), pacer,
        out_config=out_config, command=ctx.options.command, base=ctx.models.base,
        side_files=side_files))


def tokenizer_input(ctx: MergeContext) -> CheckpointIndex | None:
    """The input whose tokenizer and generation files the output gets (output.
    tokenizer_source; by default the base model, else the first model)."""
    output = ctx.config.output
    if not output.copy_tokenizer:
        return None
    source = output.tokenizer_source
    if source is None or source == "base":
        return ctx.models.base or ctx.anchor
    refs = [e.ref for e in ctx.config.models]
    if source in refs:
        return ctx.models.models[refs.index(source)]
    return ctx.models.base
