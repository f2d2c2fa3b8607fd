#!/usr/bin/env python
"""Make tiny checkpoint families for tests and demos (a few MB, a few seconds).

For each supported architecture it writes, under OUT/<family>/:

* ``anchor``  a randomly initialised tiny model (transformers, fixed seed);
* ``ft1``, ``ft2``  "fine-tunes": the anchor plus small noise (different seeds);
* ``perm``   a third fine-tune with a random valid permutation of every symmetry
  group applied, so it computes exactly what its unpermuted twin computes but
  with its weights in another basin (alignment must undo it).

The llama family is written sharded (with ``model.safetensors.index.json``) and
mistral in bfloat16, so those code paths get exercised too. Output is
deterministic: the same command writes the same bytes.

    python scripts/make_fixtures.py --out fixtures
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pacer_stream.arch import detect_spec  # noqa: E402
from pacer_stream.graph import MergeGraph  # noqa: E402
from pacer_stream.io.reader import CheckpointIndex  # noqa: E402
from pacer_stream.io.sources import LocalFolder  # noqa: E402

DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

# family -> (config class name, model class name, config kwargs, save options)
FAMILIES: dict[str, tuple[str, str, dict, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER, {"max_shard_size": "200KB"}),
    "mistral": ("MistralConfig", "MistralForCausalLM", DECODER, {"dtype": torch.bfloat16}),
    # Qwen checkpoints have no BOS: a document starts after <|endoftext|>, their eos_token_id
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**DECODER, "eos_token_id": 2}, {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**DECODER, "head_dim": 16, "eos_token_id": 2},
              {}),
    "bert": ("BertConfig", "BertForMaskedLM", {**ENCODER, "vocab_size": 256,
                                               "max_position_embeddings": 64}, {}),
    "vit": ("ViTConfig", "ViTForImageClassification", {**ENCODER, "image_size": 32,
                                                       "patch_size": 8, "num_labels": 5}, {}),
}
NOISE = 0.02  # relative size of a fine-tune's deviation from the anchor


def make_model(family: str, seed: int = 0):
    """A freshly initialised tiny transformers model of ``family`` (fp32, eval mode)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # default init leaves norms at exactly 1 and biases at 0:
        for p in model.parameters():  # perturb them so permutation bugs cannot hide
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save(model, out: Path, family: str, state: dict | None = None) -> None:
    options = dict(FAMILIES[family][3])
    dtype = options.pop("dtype", None)
    if dtype is not None:
        model = model.to(dtype)
        if state is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, state_dict=state, **options)
    if dtype is not None:
        model.to(torch.float32)


def file_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model, by the names in its files."""
    index = CheckpointIndex.open(LocalFolder(folder))
    return {name: index.read(name).clone() for name in index.tensors}


def permute_folder(src: Path, dst: Path, seed: int) -> dict[str, torch.Tensor]:
    """Copy a saved model with a random permutation of every symmetry group applied."""
    index = CheckpointIndex.open(LocalFolder(src))
    spec = detect_spec(index.config)
    graph = MergeGraph.build(spec, index.config, index.tensors)
    perms = graph.random_perms(torch.Generator().manual_seed(seed))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    from safetensors.torch import save_file

    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in index.tensors.items():
        tensor = index.read(name)
        if name in graph.nodes:
            tensor = graph.permute(name, tensor, perms)
        by_file.setdefault(info.file, {})[name] = tensor.contiguous()
    for file, tensors in by_file.items():
        save_file(tensors, str(dst / file), metadata={"format": "pt"})
    return perms


def make_family(family: str, out: Path) -> None:
    model = make_model(family)
    base = out / family
    save(model, base / "anchor", family)
    anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, name in enumerate(["ft1", "ft2", "ft3"], start=1):
        gen = torch.Generator().manual_seed(1000 * k + len(family))
        state = {key: (v + NOISE * v.std().nan_to_num(1.0) * torch.randn(v.shape, generator=gen)
                       if v.is_floating_point() and v.numel() > 1 else v.clone())
                 for key, v in anchor.items()}
        model.load_state_dict(state)
        save(model, base / name, family)
    model.load_state_dict(anchor)
    # "perm" is ft3 moved to another basin; ft3 stays as its unpermuted twin.
    permute_folder(base / "ft3", base / "perm", seed=7)


CONFLICT_BLOCK = 2  # the block whose MLP the "conflict" family's models disagree on
CONFLICT_NOISE = 1.0  # its per-model deviation, relative to the weights' spread


def make_conflict(out: Path) -> None:
    """Three 4-block Llama fine-tunes that agree everywhere except one MLP block.

    ``m1``..``m3`` are the anchor plus small noise, except that block
    CONFLICT_BLOCK's gate/up/down weights get a large independent deviation per
    model: the block PACER should upcycle, and the only one.
    """
    import transformers

    config = transformers.LlamaConfig(**{**DECODER, "num_hidden_layers": 4})
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}
    conflict = f"model.layers.{CONFLICT_BLOCK}.mlp."
    for k in range(1, 4):
        gen = torch.Generator().manual_seed(500 + k)
        state = {}
        for key, v in anchor.items():
            scale = CONFLICT_NOISE if key.startswith(conflict) else NOISE
            noise = torch.randn(v.shape, generator=gen)
            state[key] = v + scale * v.std().nan_to_num(1.0) * noise if v.numel() > 1 else v.clone()
        model.load_state_dict(state)
        target = out / "conflict" / f"m{k}"
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target)


def script_digest() -> str:
    """Fingerprint of this script, so callers can tell stale fixtures from current ones."""
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("fixtures"))
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES))
    args = parser.parse_args(argv)
    for family in args.family or list(FAMILIES):
        make_family(family, args.out)
    if not args.family:
        make_conflict(args.out)
    stamp = {"families": sorted(args.family or FAMILIES), "script": script_digest()}
    (args.out / "FIXTURES.json").write_text(json.dumps(stamp, indent=1) + "\n")
    print(f"wrote tiny fixtures for {', '.join(args.family or FAMILIES)} under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
