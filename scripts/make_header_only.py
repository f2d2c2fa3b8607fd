#!/usr/bin/env python
"""Make header-only 70B-class checkpoints for planning at scale.

Each model folder gets a real ``config.json`` (Llama-3-70B shapes), a real
``model.safetensors.index.json`` and real shard headers; each shard's data region
is a sparse hole of the right length, so the files have their true sizes but take
no disk. ``pacer-stream plan`` reads only headers, so it works on them; reading
tensor data would give zeros.

    python scripts/make_header_only.py --out /tmp/llama70b --models 3
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}


def llama_tensors(c: dict) -> list[tuple[str, list[int]]]:
    """Tensor names and shapes of a Llama checkpoint, in file order."""
    d, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", [c["vocab_size"], d])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", [d]),
            (p + "self_attn.q_proj.weight", [q, d]),
            (p + "self_attn.k_proj.weight", [kv, d]),
            (p + "self_attn.v_proj.weight", [kv, d]),
            (p + "self_attn.o_proj.weight", [d, q]),
            (p + "post_attention_layernorm.weight", [d]),
            (p + "mlp.gate_proj.weight", [inter, d]),
            (p + "mlp.up_proj.weight", [inter, d]),
            (p + "mlp.down_proj.weight", [d, inter]),
        ]
    out += [("model.norm.weight", [d]), ("lm_head.weight", [c["vocab_size"], d])]
    return out


def write_model(folder: Path, config: dict, shard_bytes: int = 5 * 10**9, itemsize: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in llama_tensors(config):
        nbytes = itemsize * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in tensors:
            nbytes = itemsize * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data region 8-byte aligned, as safetensors does
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)  # the data: a sparse hole, no disk blocks
        total += offset
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", type=int, default=3)
    args = parser.parse_args(argv)
    for k in range(args.models):
        write_model(args.out / f"model{k}", LLAMA3_70B)
    print(f"wrote {args.models} header-only Llama-3-70B checkpoints under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
