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

With ``--gpt2-tokenizer`` it writes instead, under OUT/gpt2/<family>/, decoder
families whose vocabulary is GPT-2's real one (50257 tokens, with its tokenizer.json
rebuilt from llama.cpp's ggml-vocab-gpt-2.gguf), so that merges of them convert to
GGUF and run in llama.cpp (benchmarks/bench_runtimes.py, tests/test_runtimes.py):

    python scripts/make_fixtures.py --out /tmp/fx --gpt2-tokenizer \
        llama.cpp/models/ggml-vocab-gpt-2.gguf
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
    # Gemma: tied LM head, head_dim set (the config's default is 256); gemma2/3 with a
    # window shorter than the tests' sequences, so their sliding layers really slide.
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**DECODER, "head_dim": 16}, {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**DECODER, "head_dim": 16,
                                                     "sliding_window": 4}, {}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        **DECODER, "head_dim": 16, "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"]}, {}),
    # the config's default pad/eos ids (32000) lie outside the tiny vocabulary
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**DECODER, "pad_token_id": 0, "bos_token_id": 1,
                                               "eos_token_id": 2}, {}),
    # MoE inputs: 3 experts, top 2; qwen2_moe with a shared expert and block 1 dense
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        **DECODER, "num_local_experts": 3, "num_experts_per_tok": 2, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2}, {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        **DECODER, "num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "mlp_only_layers": [1], "eos_token_id": 2}, {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        **DECODER, "head_dim": 16, "num_experts": 3, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "norm_topk_prob": True, "eos_token_id": 2}, {}),
    "bert": ("BertConfig", "BertForMaskedLM", {**ENCODER, "vocab_size": 256,
                                               "max_position_embeddings": 64}, {}),
    "vit": ("ViTConfig", "ViTForImageClassification", {**ENCODER, "image_size": 32,
                                                       "patch_size": 8, "num_labels": 5}, {}),
}
NOISE = 0.02  # relative size of a fine-tune's deviation from the anchor


def make_model(family: str, seed: int = 0, **overrides):
    """A freshly initialised tiny transformers model of ``family`` (fp32, eval mode);
    ``overrides`` replace config values of FAMILIES."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
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
    for k in range(1, 4):
        model.load_state_dict(conflict_state(anchor, seed=500 + k))
        target = out / "conflict" / f"m{k}"
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target)


def conflict_state(anchor: dict[str, torch.Tensor], seed: int,
                   block: int = CONFLICT_BLOCK) -> dict[str, torch.Tensor]:
    """A fine-tune that disagrees with its siblings (other seeds) in one MLP block only:
    the anchor plus NOISE everywhere, plus CONFLICT_NOISE on ``block``'s MLP weights."""
    gen = torch.Generator().manual_seed(seed)
    conflict = f"model.layers.{block}.mlp."
    state = {}
    for key, v in anchor.items():
        scale = CONFLICT_NOISE if key.startswith(conflict) else NOISE
        noise = torch.randn(v.shape, generator=gen)
        state[key] = v + scale * v.std().nan_to_num(1.0) * noise if v.numel() > 1 else v.clone()
    return state


# --gpt2-tokenizer: decoders with GPT-2's real vocabulary, for llama.cpp's converter, which
# names a BPE pre-tokenizer by hashing how the tokenizer encodes a test text: a toy
# vocabulary has no known hash, so only a real tokenizer converts (and loads in llama.cpp).
GPT2_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
GPT2_LAYERS = 4  # CONFLICT_BLOCK (2) is the block the fine-tunes disagree on
GPT2_CONTROL = 3  # gguf.TokenType.CONTROL: the special tokens (<|endoftext|>)


def import_gguf(vocab_file: Path):
    """gguf-py: the copy in the llama.cpp tree the vocab file comes from (the version that
    wrote it), else an installed ``gguf`` package."""
    tree = vocab_file.resolve().parents[1] / "gguf-py"
    if tree.is_dir() and str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    import gguf

    return gguf


def gpt2_vocab(vocab_file: Path) -> dict:
    """GPT-2's tokenizer as llama.cpp stores it: tokens, token types, merges, bos/eos ids."""
    reader = import_gguf(vocab_file).GGUFReader(str(vocab_file))
    value = lambda key: reader.fields[f"tokenizer.ggml.{key}"].contents()  # noqa: E731
    return {"tokens": value("tokens"), "types": value("token_type"), "merges": value("merges"),
            "bos": int(value("bos_token_id")), "eos": int(value("eos_token_id"))}


def gpt2_tokenizer_files(vocab: dict) -> dict[str, str]:
    """tokenizer.json (byte-level BPE, as GPT-2's) and tokenizer_config.json for ``vocab``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = vocab["tokens"]
    merges = [tuple(m.split(" ")) for m in vocab["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(vocab["types"]) if kind == GPT2_CONTROL])
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": tokens[vocab["bos"]],
              "eos_token": tokens[vocab["eos"]], "unk_token": tokens[vocab["eos"]],
              "add_bos_token": False, "add_prefix_space": False, "model_max_length": 1024}
    return {"tokenizer.json": tokenizer.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=1) + "\n"}


def gpt2_tokenizer_mismatches(folder: Path, vocab_file: Path) -> list[str]:
    """The texts of llama.cpp's own test of this vocabulary (ggml-vocab-gpt-2.gguf.inp and
    .out, next to it) that folder's tokenizer.json encodes otherwise: [] for GPT-2's."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = Path(f"{vocab_file}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    wanted = Path(f"{vocab_file}.out").read_text(encoding="utf-8").split("\n")
    if len(texts) != len(wanted):
        raise ValueError(f"{vocab_file}.inp has {len(texts)} texts, .out {len(wanted)} encodings")
    return [text for text, ids in zip(texts, wanted)
            if tokenizer.encode(text, add_special_tokens=False).ids != [int(i) for i in ids.split()]]


def make_gpt2_family(family: str, out: Path, vocab: dict) -> Path:
    """OUT/gpt2/<family>/{anchor,ft1,ft2,ft3}: a GPT2_LAYERS-block decoder with GPT-2's
    vocabulary and tokenizer, and three fine-tunes that disagree strongly only on block
    CONFLICT_BLOCK's MLP (PACER upcycles that block alone at interference_threshold 0.35,
    as plans/tiny-smoke.yaml, and every block at 0)."""
    model = make_model(family, vocab_size=len(vocab["tokens"]), bos_token_id=vocab["bos"],
                       eos_token_id=vocab["eos"], num_hidden_layers=GPT2_LAYERS,
                       tie_word_embeddings=False)
    base = out / "gpt2" / family
    anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = {"anchor": anchor} | {f"ft{k}": conflict_state(anchor, seed=700 + 10 * k + len(family))
                                   for k in (1, 2, 3)}
    files = gpt2_tokenizer_files(vocab)
    for name, state in states.items():
        model.load_state_dict(state)
        save(model, base / name, family)
        for file, text in files.items():
            (base / name / file).write_text(text, encoding="utf-8")
    return base


def make_gpt2_families(out: Path, vocab_file: Path, families: list[str]) -> Path:
    """Every GPT-2-vocabulary family asked for, and OUT/gpt2/FIXTURES.json to tell them by."""
    import hashlib

    vocab = gpt2_vocab(vocab_file)
    for family in families:
        make_gpt2_family(family, out, vocab)
    stamp = {"families": sorted(families), "script": script_digest(),
             "vocab": hashlib.sha256(vocab_file.read_bytes()).hexdigest()[:16]}
    (out / "gpt2" / "FIXTURES.json").write_text(json.dumps(stamp, indent=1) + "\n")
    return out / "gpt2"


def script_digest() -> str:
    """Fingerprint of this script, so callers can tell stale fixtures from current ones."""
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("fixtures"))
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES))
    parser.add_argument("--gpt2-tokenizer", type=Path, metavar="GGUF",
                        help="llama.cpp's models/ggml-vocab-gpt-2.gguf: write the GPT-2-vocabulary "
                             f"families ({', '.join(GPT2_FAMILIES)}) under OUT/gpt2 instead")
    args = parser.parse_args(argv)
    if args.gpt2_tokenizer:
        families = args.family or list(GPT2_FAMILIES)
        if not set(families) <= set(GPT2_FAMILIES):
            parser.error(f"--gpt2-tokenizer makes only {', '.join(GPT2_FAMILIES)}")
        where = make_gpt2_families(args.out, args.gpt2_tokenizer, families)
        print(f"wrote GPT-2-vocabulary fixtures for {', '.join(families)} under {where}")
        return 0
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
