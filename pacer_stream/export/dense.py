"""Output folder files for a dense merge: config and tokenizer (the model card is
export/card.py's, the plan as run export/plan_file.py's)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

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
