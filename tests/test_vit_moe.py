"""ViT-MoE export and token merging (pacer_stream.export.vit_moe, modeling_vit_moe):
ToMe keeps r = 0 bit-identical, merges r tokens per block with the CLS token in place,
weighs merged tokens by size; an upcycled tiny ViT saved with the recipes loads with
trust_remote_code, with no missing or unexpected keys, and computes the dense function."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForImageClassification, ViTConfig,  # noqa: E402
                          ViTForImageClassification, ViTModel)

from pacer_stream.errors import PacerError  # noqa: E402
from pacer_stream.export.configuration_vit_moe import ViTMoeConfig  # noqa: E402
from pacer_stream.export.modeling_vit_moe import ViTMoeModel, ViTMoeSparseMlp  # noqa: E402
from pacer_stream.export.moe import moe_parameter_count  # noqa: E402
from pacer_stream.export.token_merging_vit_moe import ToMeState, unmerge_tokens  # noqa: E402
from pacer_stream.export.vit_moe import (VitMoeLayout, vit_moe_config,  # noqa: E402
                                         vit_moe_recipes, write_modeling)
from pacer_stream.runtime.tome import apply_tome, bipartite_soft_matching, remove_tome  # noqa: E402

TINY = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=128, num_labels=5)
TOKENS = (32 // 4) ** 2 + 1  # 64 patches + CLS
LAYOUT = VitMoeLayout(num_layers=4, upcycled=(1, 3), num_experts=3, top_k=1)


# -- helpers ----------------------------------------------------------------------


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter, so norms and biases are not their trivial init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def pixels(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def dense_vit(attn: str = "eager") -> ViTForImageClassification:
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY, attn_implementation=attn))
    perturb_(model, seed=1)
    return model.eval()


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a save_pretrained folder, in file order (the saved spelling)."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def export(folder: Path, source: dict[str, torch.Tensor], source_config: dict,
           layout: VitMoeLayout, router_seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a ViT-MoE folder the way the engine does: config, recipe tensors, modeling code.

    Experts are plain copies of the source MLP; routers are random.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {name: ("F32", tuple(t.shape)) for name, t in source.items()}
    gen = torch.Generator().manual_seed(router_seed)
    out = {}
    for recipe in vit_moe_recipes(layout, shapes):
        if recipe.kind == "router":
            out[recipe.name] = torch.randn(recipe.shape, generator=gen)
        else:
            out[recipe.name] = source[recipe.source].clone()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(vit_moe_config(source_config, layout)))
    write_modeling(folder)
    return out


def load(folder: Path) -> torch.nn.Module:
    model, info = AutoModelForImageClassification.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == "ViTMoeForImageClassification"
    return model.eval()


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit_dense")
    dense_vit().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory, dense_folder) -> Path:
    folder = tmp_path_factory.mktemp("vit_moe")
    export(folder, saved_tensors(dense_folder),
           json.loads((dense_folder / "config.json").read_text()), LAYOUT)
    return folder


# -- token merging on a plain transformers ViT -------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tome_r0_is_bit_identical(attn):
    model = dense_vit(attn)
    with torch.no_grad():
        before = model(pixels()).logits
        apply_tome(model, 0)
        after = model(pixels()).logits
    assert torch.equal(before, after)


def test_tome_token_counts_cls_and_unmerge():
    model = dense_vit()
    counts, cls_index = [], []

    def record(module, args, output):
        counts.append(output.shape[1])
        cls_index.append(model.tome_state.source[:, 0].tolist())

    hooks = [layer.register_forward_hook(record) for layer in model.vit.layers]
    r = 8
    apply_tome(model, r)
    with torch.no_grad():
        merged = model.vit(pixels()).last_hidden_state
        logits = model(pixels()).logits
    L = TINY["num_hidden_layers"]
    assert counts[:L] == [TOKENS - l * r for l in range(1, L + 1)]
    assert all(index == [0, 0] for index in cls_index)  # CLS stays at index 0
    size = model.tome_state.size
    assert size.shape == (2, TOKENS - L * r, 1)
    assert torch.equal(size.sum(1), torch.full((2, 1), float(TOKENS)))  # every patch counted once
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, model.classifier(merged[:, 0]))  # the classifier reads CLS

    apply_tome(model, r, unmerge=True)
    with torch.no_grad():
        full = model.vit(pixels()).last_hidden_state
    assert full.shape == (2, TOKENS, TINY["hidden_size"])
    assert torch.equal(full, unmerge_tokens(merged, model.tome_state.source))
    assert torch.equal(full[:, 0], merged[:, 0])

    counts.clear()
    apply_tome(model, 40)  # capped: each block removes at most the A tokens but CLS
    with torch.no_grad():
        model.vit(pixels())
    assert counts == [33, 17, 9, 5]
    for hook in hooks:
        hook.remove()
    apply_tome(model, r)  # a patched model still deep-copies and pickles
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(clone(pixels()).logits, logits)
    remove_tome(model)
    with torch.no_grad():
        assert torch.equal(model(pixels()).logits, dense_vit()(pixels()).logits)


def test_matching_merges_most_similar_pair_and_protects_cls():
    keys = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(3))
    keys[0, 4] = keys[0, 7] * 2  # A position 4 and B position 7: cosine 1
    keys[0, 1] = keys[0, 0]  # CLS duplicated, but protected
    merge, unmerge = bipartite_soft_matching(keys, 1)
    x = torch.arange(9.0).view(1, 9, 1)
    assert merge(x, mode="sum").flatten().tolist() == [0, 1, 2, 3, 5, 6, 11, 8]
    assert unmerge(merge(x, mode="mean")).flatten().tolist() == [0, 1, 2, 3, 5.5, 5, 6, 5.5, 8]


def test_proportional_attention_weighs_merged_tokens_by_size(moe_folder):
    """Two identical tokens merged into one of size 2 change nothing for the others."""
    blocks = load(moe_folder).vit.encoder.layer
    x = torch.randn(2, TOKENS, TINY["hidden_size"], generator=torch.Generator().manual_seed(4))
    x[:, 3] = x[:, 2]  # an A token (position 2) and its B neighbour (position 3)
    with torch.no_grad():
        plain = blocks[1](blocks[0](x))
        state = ToMeState(r=1)
        merged = blocks[0](x, state)  # merges exactly the duplicates, after attention
        assert merged.shape[1] == TOKENS - 1
        state.r = 0  # block 1 (an MoE block) merges nothing but attends proportionally
        out = blocks[1](merged, state)
        source, size = state.source, state.size
        assert (source[:, 2] == source[:, 3]).all() and (size.max(1).values == 2).all()
        assert torch.allclose(unmerge_tokens(out, source), plain, atol=1e-5, rtol=0)
        for b in range(2):  # the merged token is what each duplicate became unmerged
            assert torch.allclose(out[b, source[b, 2]], plain[b, 2], atol=1e-5, rtol=0)
            assert torch.allclose(out[b, source[b, 2]], plain[b, 3], atol=1e-5, rtol=0)
        # the check is sensitive: plain attention over the merged tokens differs
        state.size = None
        assert not torch.allclose(unmerge_tokens(blocks[1](merged, state), source), plain,
                                  atol=1e-3, rtol=0)


# -- ViT-MoE --------------------------------------------------------------------------


def test_top1_identical_experts_reproduce_dense_logits(moe_folder):
    dense, moe = dense_vit(), load(moe_folder)
    assert moe.config.moe_layers == [1, 3] and moe.config.num_experts == 3
    layer = moe.vit.encoder.layer
    assert hasattr(layer[1], "moe") and not hasattr(layer[1], "intermediate")
    assert hasattr(layer[0], "intermediate") and not hasattr(layer[0], "moe")
    routed = []  # tokens per expert, per MoE block

    def record(module, args, output):
        chosen = module.route(args[0].reshape(-1, args[0].shape[-1]))[1]
        routed.append(torch.bincount(chosen.flatten(), minlength=3).tolist())

    for i in LAYOUT.upcycled:
        layer[i].moe.register_forward_hook(record)
    with torch.no_grad():
        want, got = dense(pixels()).logits, moe(pixels()).logits
    # Bit-identical: every op is transformers' eager ViT op, in the same order; the top-1
    # weight is p / p = 1 exactly and index_add_ into zeros adds exactly. The one thing
    # outside our control is MKL, which runs a Linear on fewer than ~16 rows through
    # another kernel (an ulp apart); each expert here gets enough tokens, so equality holds.
    assert all(min(counts) >= 16 for counts in routed), routed
    assert torch.equal(got, want)


def test_tome_in_vit_moe_matches_tome_on_dense(moe_folder):
    config = json.loads((moe_folder / "config.json").read_text())
    (moe_folder / "config.json").write_text(json.dumps({**config, "tome_r": 2}))
    try:
        moe = load(moe_folder)
    finally:
        (moe_folder / "config.json").write_text(json.dumps(config))
    assert moe.config.tome_r == 2
    dense = apply_tome(dense_vit(), 2)
    with torch.no_grad():
        got, want = moe(pixels()).logits, dense(pixels()).logits
    assert torch.isfinite(got).all()
    # One algorithm on identical experts; the differences are MKL's rounding on the
    # experts' row subsets (see above) and x * s / s for the merged averages.
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    moe.config.tome_unmerge = True
    with torch.no_grad():
        hidden = moe.vit(pixels()).last_hidden_state
    assert hidden.shape == (2, TOKENS, TINY["hidden_size"])


def test_distinct_experts_route_as_specified():
    config = ViTMoeConfig(**TINY, num_experts=4, num_experts_per_tok=1)
    torch.manual_seed(5)
    moe = ViTMoeSparseMlp(config)
    perturb_(moe, seed=6)
    x = torch.randn(3, 7, TINY["hidden_size"])
    flat = x.view(-1, x.shape[-1])

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        ex = moe.experts[e]
        return F.linear(F.gelu(F.linear(rows, ex.fc1.weight, ex.fc1.bias)),
                        ex.fc2.weight, ex.fc2.bias)

    with torch.no_grad():
        out = moe(x).view(-1, x.shape[-1])
        chosen = (flat @ moe.gate.weight.T).argmax(dim=-1)
        assert chosen.unique().numel() > 1
        for t in range(flat.shape[0]):
            assert torch.allclose(out[t], expert(int(chosen[t]), flat[t]), atol=1e-5, rtol=0)
        moe.top_k = 2  # top-2: softmax, keep two, renormalise
        out = moe(x).view(-1, x.shape[-1])
        probs, pick = F.softmax(flat @ moe.gate.weight.T, dim=-1).topk(2, dim=-1)
        weights = probs / probs.sum(-1, keepdim=True)
        for t in range(flat.shape[0]):
            want = sum(weights[t, k] * expert(int(pick[t, k]), flat[t]) for k in range(2))
            assert torch.allclose(out[t], want, atol=1e-5, rtol=0)


# -- recipes and config ----------------------------------------------------------------


def test_recipes_same_for_both_spellings(dense_folder, moe_folder):
    saved = {n: ("F32", tuple(t.shape)) for n, t in saved_tensors(dense_folder).items()}
    memory = {n: ("F32", tuple(t.shape)) for n, t in dense_vit().state_dict().items()}
    assert any(".q_proj." in n for n in memory) and any(".query." in n for n in saved)
    a, b = vit_moe_recipes(LAYOUT, saved), vit_moe_recipes(LAYOUT, memory)

    def key(r):
        return r.name, r.kind, r.shape, r.layer, r.expert

    assert sorted(map(key, a)) == sorted(map(key, b))
    loaded = load(moe_folder)
    assert sorted(r.name for r in a) == sorted(loaded.state_dict())
    assert moe_parameter_count(a) == sum(p.numel() for p in loaded.parameters())
    # order: experts replace the MLP tensors in place, the router follows the block's last
    names = [r.name for r in b]
    fc2_bias = names.index("vit.encoder.layer.1.moe.experts.2.fc2.bias")
    assert names[fc2_bias + 1] == "vit.encoder.layer.1.moe.gate.weight"
    router = next(r for r in a if r.kind == "router")
    assert router.shape == (3, TINY["hidden_size"]) and router.layer == 1


def test_bare_vit_model_exports_without_prefix():
    model = ViTModel(ViTConfig(**TINY))
    tensors = {n: ("F32", tuple(t.shape)) for n, t in model.state_dict().items()}
    recipes = vit_moe_recipes(LAYOUT, tensors)
    config = vit_moe_config({**model.config.to_dict(), "architectures": ["ViTModel"]}, LAYOUT)
    assert config["architectures"] == ["ViTMoeModel"] and config["add_pooling_layer"] is True
    assert config["auto_map"]["AutoModel"] == "modeling_vit_moe.ViTMoeModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_vit_moe.ViTMoeConfig"
    moe = ViTMoeModel(ViTMoeConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    assert sorted(r.name for r in recipes) == sorted(moe.state_dict())


def test_user_errors_are_pacer_errors():
    with pytest.raises(PacerError, match="top_k"):
        VitMoeLayout(4, (1,), num_experts=2, top_k=3)
    with pytest.raises(PacerError, match="out of range"):
        VitMoeLayout(4, (4,), num_experts=2, top_k=1)
    tensors = {f"encoder.layer.1.{m}.{p}": ("F32", (4, 4)) for m in
               ("intermediate.dense", "layernorm_after") for p in ("weight", "bias")}
    with pytest.raises(PacerError, match="lacks MLP tensors"):
        vit_moe_recipes(VitMoeLayout(4, (1,), 2, 1), tensors)
    with pytest.raises(PacerError, match="no place"):
        vit_moe_recipes(VitMoeLayout(4, (1,), 2, 1), {"decoder.0.weight": ("F32", (4,))})
    with pytest.raises(PacerError, match="model_type"):
        vit_moe_config({"model_type": "bert", "num_hidden_layers": 4}, LAYOUT)
    with pytest.raises(PacerError, match="num_hidden_layers"):
        vit_moe_config({"model_type": "vit", "num_hidden_layers": 6}, LAYOUT)
