"""The block-wise forward pass (pacer_stream.runtime.blocks) against transformers.

Every family runs block by block from a getter over its checkpoint (the fixtures' files,
a state dict, or a save_pretrained / engine-export folder) and must give transformers'
logits in fp32 to 1e-5: dense decoders with their RoPE variants, biases, q/k norms and
sliding windows, qwen2_moe / qwen3_moe with dense layers, top-1/2, renormalised or not
and (qwen2_moe) with or without a shared expert, ViT in both name spellings, and the
engine's ViT-MoE with both router modes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForImageClassification, ViTConfig,
                          ViTForImageClassification)

from pacer_stream.errors import PacerError  # noqa: E402
from pacer_stream.export.vit_moe import (VitMoeLayout, vit_moe_config,  # noqa: E402
                                         vit_moe_recipes, write_modeling)
from pacer_stream.io.reader import CheckpointIndex  # noqa: E402
from pacer_stream.io.sources import LocalFolder  # noqa: E402
from pacer_stream.runtime.blocks import BlockModel  # noqa: E402

ATOL = 1e-5
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
MOE = dict(TINY, num_hidden_layers=3, num_experts=4, moe_intermediate_size=24,
           mlp_only_layers=[1])
VIT = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3,
           num_attention_heads=4, intermediate_size=48, num_labels=5)
# qwen2_moe builds a 0-wide shared expert with nn.Linear, whose init warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


# -- helpers ----------------------------------------------------------------------


def perturb_(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Noise on every parameter, so norms, biases and routers are not their trivial init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def token_ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def pixels(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def folder_getter(folder: Path):
    """A getter over a checkpoint folder (sharded or not), and its tensor names."""
    index = CheckpointIndex.open(LocalFolder(folder))
    return index.read, list(index.tensors)


def file_getter(path: Path):
    f = safe_open(str(path), "pt")
    return f.get_tensor, list(f.keys())


def blocks(config: dict, get, inputs: torch.Tensor, names=None, **kw) -> torch.Tensor:
    """Logits through the public per-block calls, as the calibration stage makes them."""
    bm = BlockModel.from_config(config, names=names, **kw)
    hidden = bm.embed(get, inputs)
    for i in range(bm.num_layers):
        hidden = bm.attention(get, i, hidden)
        hidden = hidden + bm.mlp(get, i, bm.mlp_input(get, i, hidden))
    return bm.head(get, hidden)


def built(model_type: str, seed: int = 0, auto=AutoModelForCausalLM, **kwargs):
    """A tiny random transformers model in fp32, eval mode."""
    torch.manual_seed(seed)
    return perturb_(auto.from_config(AutoConfig.for_model(model_type, **kwargs)), seed + 1)


# -- dense decoders and ViT: the fixtures --------------------------------------------

# family -> config overrides for both sides. mistral's window (5) is shorter than the
# inputs (12 tokens) so it matters; llama is sharded and runs its MLP in 7-unit chunks.
FIXTURE_CASES = {
    "llama": ({}, {"mlp_chunk": 7}),
    "mistral": ({"sliding_window": 5}, {}),
    "qwen2": ({}, {}),
    "qwen3": ({}, {}),
    "vit": ({}, {}),
}


@pytest.mark.parametrize("family", sorted(FIXTURE_CASES))
def test_fixture_matches_transformers(fixtures_dir, family):
    folder = fixtures_dir / family / "anchor"
    overrides, options = FIXTURE_CASES[family]
    config = {**json.loads((folder / "config.json").read_text()), **overrides}
    get, names = folder_getter(folder)
    if family == "vit":
        model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32)
        inputs = pixels(config["image_size"])
    else:  # mistral is stored in bf16: both sides compute in fp32 from the same values
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **overrides)
        inputs = token_ids(config["vocab_size"])
    with torch.no_grad():
        want = model.eval()(inputs).logits
    got = blocks(config, get, inputs, names=names, **options)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if family == "mistral":  # the window changed the result: the test can see it
        unwindowed = blocks({**config, "sliding_window": None}, get, inputs)
        assert not torch.allclose(unwindowed, want, atol=1e-3)


def test_right_padding_leaves_real_positions_alone(fixtures_dir):
    get, _ = folder_getter(fixtures_dir / "llama" / "anchor")
    config = json.loads((fixtures_dir / "llama" / "anchor" / "config.json").read_text())
    ids = token_ids(config["vocab_size"], batch=2, length=10)
    padded = ids.clone()
    padded[1, 6:] = 0  # row 1: 6 real tokens, then padding
    bm = BlockModel.from_config(config)
    a, b = bm.forward(get, ids), bm.forward(get, padded)  # forward = embed, blocks, head
    torch.testing.assert_close(b[1, :6], a[1, :6], atol=1e-6, rtol=0)
    torch.testing.assert_close(a, blocks(config, get, ids), atol=0, rtol=0)


# -- dense decoders: the switches the fixtures do not reach ---------------------------

DECODER_CASES = {
    # only layer 1 slides (i >= max_window_layers), from the default pattern
    "qwen2-window-from-layer-1": ("qwen2", dict(use_sliding_window=True, sliding_window=3,
                                                max_window_layers=1)),
    "llama-rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                         "rope_theta": 500.0})),
    # head_dim 8: wavelengths 6, 63, 628, 6283 -> kept, kept, smoothed, divided
    "llama-rope-llama3": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024, "rope_theta": 10000.0})),
    "llama-legacy-rope-scaling": ("llama", dict(rope_scaling={"type": "linear", "factor": 3.0},
                                                rope_theta=2000.0)),
    "llama-tied-biases-gelu": ("llama", dict(tie_word_embeddings=True, attention_bias=True,
                                             mlp_bias=True, hidden_act="gelu_pytorch_tanh")),
    "qwen3-head-dim-24-biases": ("qwen3", dict(head_dim=24, attention_bias=True)),
    "mistral-gqa-4-to-1": ("mistral", dict(num_key_value_heads=1, sliding_window=4)),
}


@pytest.mark.parametrize("case", sorted(DECODER_CASES))
def test_decoder_switches_match_transformers(case):
    model_type, extra = DECODER_CASES[case]
    kwargs = {**TINY, **extra}
    model = built(model_type, **kwargs)
    state = model.state_dict()
    if kwargs.get("tie_word_embeddings"):  # the head must come from the embeddings
        state.pop("lm_head.weight")
    ids = token_ids(TINY["vocab_size"])
    with torch.no_grad():
        want = model(ids).logits
    # the bare kwargs, as a hand-written config.json: absent keys mean class defaults
    got = blocks({"model_type": model_type, **kwargs}, state.__getitem__, ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# -- MoE decoders ------------------------------------------------------------------------

MOE_CASES = {
    "qwen2_moe-top1-shared": ("qwen2_moe", dict(num_experts_per_tok=1, norm_topk_prob=False,
                                                shared_expert_intermediate_size=16)),
    "qwen2_moe-top2-norm-no-shared-window": ("qwen2_moe", dict(
        num_experts_per_tok=2, norm_topk_prob=True, shared_expert_intermediate_size=0,
        use_sliding_window=True, sliding_window=3, max_window_layers=2)),
    "qwen2_moe-top2-shared": ("qwen2_moe", dict(num_experts_per_tok=2, norm_topk_prob=False,
                                                shared_expert_intermediate_size=20)),
    "qwen3_moe-top1-norm": ("qwen3_moe", dict(num_experts_per_tok=1, norm_topk_prob=True)),
    "qwen3_moe-top2": ("qwen3_moe", dict(num_experts_per_tok=2, norm_topk_prob=False,
                                         head_dim=12)),
}


def saved(model, folder: Path):
    """save_pretrained, then a getter over the file: experts one tensor each, as the
    engine writes them (model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight)."""
    model.save_pretrained(folder)
    get, names = file_getter(folder / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    return get, json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_matches_transformers(case, tmp_path):
    model_type, extra = MOE_CASES[case]
    model = built(model_type, **MOE, **extra)
    get, config = saved(model, tmp_path)
    bm = BlockModel.from_config(config)
    assert [bm.is_moe(i) for i in range(3)] == [True, False, True]
    assert bm.router_name(1) is None and bm.router_name(2) == "model.layers.2.mlp.gate.weight"
    ids = token_ids(MOE["vocab_size"], length=10)
    with torch.no_grad():
        want = model(ids).logits
    got = blocks(config, get, ids, mlp_chunk=10)  # experts in 10-unit slices
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # without the layer_types transformers saved: the class's own default pattern
    bare = {k: v for k, v in config.items() if k != "layer_types"}
    torch.testing.assert_close(blocks(bare, get, ids), want, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    model = built("qwen3_moe", **MOE, num_experts_per_tok=2, norm_topk_prob=True)
    return saved(model, tmp_path_factory.mktemp("qwen3_moe"))


def test_router_override(qwen3_moe):
    get, config = qwen3_moe
    bm = BlockModel.from_config(config)
    ids = token_ids(MOE["vocab_size"], length=10)
    x = bm.mlp_input(get, 0, bm.attention(get, 0, bm.embed(get, ids)))
    stock = bm.mlp(get, 0, x)
    same = bm.mlp(get, 0, x, router=get(bm.router_name(0)))
    assert torch.equal(same, stock)
    other = bm.mlp(get, 0, x, router=torch.randn(4, MOE["hidden_size"],
                                                 generator=torch.Generator().manual_seed(3)))
    assert not torch.allclose(other, stock, atol=1e-3)
    with pytest.raises(ValueError, match="router must be"):
        bm.mlp(get, 0, x, router=torch.zeros(3, MOE["hidden_size"]))


def test_getter_reads_only_what_it_needs(qwen3_moe):
    """One expert chosen by no token is never read; nothing is cached between calls."""
    get, config = qwen3_moe
    bm = BlockModel.from_config(config)
    x = torch.randn(5, MOE["hidden_size"])
    router = torch.zeros(4, MOE["hidden_size"])
    router[:, 0] = torch.tensor([-4.0, 4.0, 2.0, -4.0])  # x[:, 0] > 0: top-2 = {1, 2}
    x[:, 0] = x[:, 0].abs() + 1
    read: list[str] = []

    def spy(name: str) -> torch.Tensor:
        read.append(name)
        return get(name)

    bm.mlp(spy, 0, x, router=router)
    experts = {name.split(".")[5] for name in read if ".experts." in name}
    assert experts == {"1", "2"}
    count = len(read)
    bm.mlp(spy, 0, x, router=router)
    assert len(read) == 2 * count


# -- ViT: both spellings, with and without a classifier ---------------------------------


@pytest.mark.parametrize("classifier", [True, False], ids=["classifier", "bare"])
def test_vit_in_memory_spelling(classifier):
    """transformers >= 5 state dicts spell blocks ``[vit.]layers.{i}.attention.q_proj``."""
    auto = AutoModelForImageClassification if classifier else AutoModel
    model = built("vit", auto=auto, **VIT)
    state = model.state_dict()
    assert any(".layers.0.attention.q_proj" in n or n.startswith("layers.0.") for n in state)
    inputs = pixels(VIT["image_size"])
    with torch.no_grad():
        out = model(inputs)
    want = out.logits if classifier else out.last_hidden_state
    config = {**model.config.to_dict(), "model_type": "vit"}
    got = blocks(config, state.__getitem__, inputs, names=state)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# -- ViT-MoE: engine exports, loaded with their own modeling code -----------------------


def export_vit_moe(folder: Path, top_k: int, config_extra: dict | None = None) -> None:
    """A ViT-MoE folder as the engine writes it, with distinct experts (noise on copies)."""
    torch.manual_seed(0)
    dense = perturb_(ViTForImageClassification(ViTConfig(**VIT)))
    dense_dir = folder / "dense"
    dense.save_pretrained(dense_dir)
    get, names = file_getter(dense_dir / "model.safetensors")
    source = {n: get(n) for n in names}
    layout = VitMoeLayout(num_layers=3, upcycled=(0, 2), num_experts=3, top_k=top_k)
    gen = torch.Generator().manual_seed(7)
    out = {}
    for recipe in vit_moe_recipes(layout, {n: ("F32", tuple(t.shape)) for n, t in source.items()}):
        if recipe.kind == "router":
            out[recipe.name] = torch.randn(recipe.shape, generator=gen)
        elif recipe.kind == "expert":
            t = source[recipe.source]
            out[recipe.name] = t + 0.3 * t.std() * torch.randn(t.shape, generator=gen)
        else:
            out[recipe.name] = source[recipe.source].clone()
    moe_dir = folder / "moe"
    moe_dir.mkdir()
    save_file(out, str(moe_dir / "model.safetensors"), metadata={"format": "pt"})
    config = vit_moe_config(json.loads((dense_dir / "config.json").read_text()), layout)
    (moe_dir / "config.json").write_text(json.dumps({**config, **(config_extra or {})}))
    write_modeling(moe_dir)


VIT_MOE_CASES = {
    "top1": (1, None),
    "top2": (2, None),
    "top2-deviation-norm": (2, {"router_mode": "deviation_norm", "router_temperature": 0.5,
                                "expert_sizes": {"0": [2, 1, 1], "2": [1, 1, 3]}}),
}


@pytest.mark.parametrize("case", sorted(VIT_MOE_CASES))
def test_vit_moe_export_matches_its_modeling_code(case, tmp_path):
    top_k, extra = VIT_MOE_CASES[case]
    export_vit_moe(tmp_path, top_k, extra)
    folder = tmp_path / "moe"
    model, info = AutoModelForImageClassification.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = pixels(VIT["image_size"], batch=3)
    with torch.no_grad():
        want = model.eval()(inputs).logits
    config = json.loads((folder / "config.json").read_text())
    get, names = file_getter(folder / "model.safetensors")
    bm = BlockModel.from_config(config)  # names as saved: vit. prefix from architectures
    assert [bm.is_moe(i) for i in range(3)] == [True, False, True]
    linear = extra is None
    assert bm.router_name(0) == ("vit.encoder.layer.0.moe.gate.weight" if linear else None)
    for names_arg in (None, names):
        got = blocks(config, get, inputs, names=names_arg, mlp_chunk=20)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# -- what it refuses ----------------------------------------------------------------------


@pytest.mark.parametrize("config, named", [
    ({"model_type": "gpt2", "hidden_size": 32}, "'gpt2'"),
    ({"model_type": "llama", **TINY, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
     "'yarn'"),
    ({"model_type": "llama", **TINY, "hidden_act": "mish"}, "'mish'"),
    ({"model_type": "qwen2", **TINY, "layer_types": ["full_attention", "sliding_attention"]},
     "layer_types"),
    ({"model_type": "llama", **TINY, "num_key_value_heads": 3}, "num_key_value_heads"),
], ids=["model-type", "rope-type", "hidden-act", "window-off", "kv-heads"])
def test_refusals_name_the_culprit(config, named):
    with pytest.raises(PacerError, match=named):
        BlockModel.from_config(config)


def test_package_module_imports_no_transformers():
    code = ("import sys, pacer_stream.runtime.blocks; "
            "sys.exit('transformers' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
