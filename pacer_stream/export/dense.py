"""Output folder files for a dense merge: config, tokenizer, model card, report."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from .. import __version__
from ..config import PlanConfig
from ..io.reader import CheckpointIndex
from ..io.writer import write_atomic

# Files copied from the tokenizer source (the anchor unless the plan names one).
COPIED = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model",
          "generation_config.json", "preprocessor_config.json", "chat_template*")
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def write_config(out_dir: Path, config: dict, out_dtype: str | None) -> None:
    """``config`` (the anchor's, or the MoE one) as config.json, the output dtype recorded."""
    config = dict(config)
    if out_dtype in TORCH_DTYPES:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = TORCH_DTYPES[out_dtype]
    write_atomic(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(out_dir: Path, source: CheckpointIndex) -> list[str]:
    """Copy tokenizer and generation files; returns the names copied."""
    copied = []
    for name in source.files.list():
        if "/" in name or not any(fnmatch.fnmatch(name, p) for p in COPIED):
            continue
        src = source.files.open(name)
        write_atomic(out_dir / name, src.read(0, src.size()))
        copied.append(name)
    return copied


def model_card(config: PlanConfig, inputs: list[CheckpointIndex], family: str,
               params: dict, pacer: dict | None = None) -> str:
    """A README.md that says exactly how the model was made (no timestamps: reproducible)."""
    lines = [
        "---",
        "tags: [merge, pacer-stream]",
        "---",
        f"# {config.project_name}",
        "",
        f"A `{config.method}` merge of {len(config.models)} {family} checkpoints, made with "
        f"pacer-stream {__version__}.",
        "",
        "## Inputs",
        "",
    ]
    for entry, index in zip(config.models, inputs):
        revision = index.files.label
        lines.append(f"- `{entry.ref}` (weight {entry.weight}" +
                     (f", density {entry.density}" if entry.density is not None else "") +
                     f"; read from `{revision}`)")
    if config.base_model is not None:
        lines.append(f"- base model: `{config.base_model}`")
    lines += [
        "",
        "## Method",
        "",
        "```json",
        json.dumps({"method": config.method, "seed": config.seed, **params}, indent=2,
                   sort_keys=True),
        "```",
        "",
    ]
    if pacer is not None:
        d = pacer["decision"]
        if pacer["exported_as"] != "dense":
            kind = (pacer.get("router") or {}).get("kind", "linear")
            lines.append(f"Exported as `{pacer['exported_as']}`: MLP blocks {d['blocks']} were "
                         f"upcycled to {d['num_experts']} experts each (top-{d['top_k']} "
                         f"{kind} router); parameters {pacer['parameters']['growth']:.3f}x the "
                         "source's.")
        else:
            lines.append(f"All blocks merged dense ({d['note'] or 'no block over the threshold'}).")
        lines.append("")
    return "\n".join(lines)


def write_card(out_dir: Path, text: str) -> None:
    write_atomic(out_dir / "README.md", text)
