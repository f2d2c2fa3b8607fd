"""MoE export (pacer_stream.export.moe): tiny dense models re-exported as MoE load in
stock transformers (no remote code, no missing or unexpected keys) and compute the
dense function exactly; distinct experts route and compute as the spec says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from pacer_stream.errors import PacerError  # noqa: E402
from pacer_stream.export.llamacpp import TargetWriter, check_source, llamacpp_target  # noqa: E402
from pacer_stream.export.moe import (SHARED_EXPERT_WIDTH, MoeLayout, OutRecipe,  # noqa: E402
                                     moe_config, moe_model_type,
                                     moe_parameter_count, moe_recipes)
from pacer_stream.io.header import DTYPE_NAMES  # noqa: E402
from pacer_stream.io.writer import OutTensor, ShardWriter, plan_shards  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=64)
# family -> (layers, upcycled blocks, extra config): every family has a dense block
# (mlp_only_layers) and a feature its MoE class must reproduce.
FAMILIES = {
    "llama": (2, (1,), {}),
    # a window shorter than the inputs: qwen2_moe must slide every layer like mistral
    "mistral": (3, (0, 2), {"sliding_window": 3}),
    # sliding only from layer 1 on: qwen2_moe reproduces it through layer_types
    "qwen2": (3, (0, 2), {"use_sliding_window": True, "sliding_window": 3,
                          "max_window_layers": 1}),
    # q_norm/k_norm, a head_dim other than hidden/heads, tied embeddings
    "qwen3": (2, (1,), {"head_dim": 32, "tie_word_embeddings": True}),
}
SEQ_LEN = 8
# A stock qwen2_moe config without a shared expert (0 wide) builds zero-element nn.Linear
# layers, whose init warns; the engine's exports have a narrow all-zero one instead
# (test_export_loads_without_zero_element_modules).
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


# -- helpers ----------------------------------------------------------------------


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter, so norms and biases are not their trivial init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (3, SEQ_LEN),
                         generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory) -> dict:
    """family -> (model, folder it was saved to), built once for the module."""
    built = {}
    for i, (family, (layers, _, extra)) in enumerate(FAMILIES.items()):
        config = AutoConfig.for_model(family, num_hidden_layers=layers, **TINY, **extra)
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config).eval()
        perturb_(model, seed=100 + i)
        folder = tmp_path_factory.mktemp(f"dense-{family}")
        model.save_pretrained(folder)
        built[family] = (model, folder)
    return built


def source_of(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A saved dense model's config.json and tensors (what the executor reads)."""
    return json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in state.items()}


def build_moe(recipes: list[OutRecipe], source: dict[str, torch.Tensor], routers: dict,
              expert=None) -> dict[str, torch.Tensor]:
    """The MoE state dict the recipes describe; ``expert(recipe)`` gives an expert tensor
    (default: the dense block's own tensor, i.e. identical experts)."""
    out = {}
    for r in recipes:
        if r.kind == "source":
            t = source[r.source]
        elif r.kind == "expert":
            t = expert(r) if expert else source[r.source]
        elif r.kind == "router":
            t = routers[r.layer]
        else:
            assert r.kind == "zeros"
            t = torch.zeros(r.shape)
        assert (DTYPE_NAMES[t.dtype], tuple(t.shape)) == (r.dtype, r.shape), r.name
        out[r.name] = t.clone().contiguous()
    return out


def write_and_load(folder: Path, state: dict, config: dict) -> torch.nn.Module:
    """Write the checkpoint, load it with stock transformers; no key may be missing,
    unexpected or mismatched."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                    "error_msgs": []}
    return model.eval()


def export(family: str, dense_models: dict, folder: Path, num_experts: int, top_k: int,
           routers: str | dict = "zeros", expert=None):
    """Export ``family``'s dense model as MoE; returns (layout, recipes, loaded model)."""
    _, dense_dir = dense_models[family]
    config, source = source_of(dense_dir)
    layers, upcycled, _ = FAMILIES[family]
    layout = MoeLayout(family, layers, upcycled, num_experts, top_k)
    recipes = moe_recipes(layout, shapes_of(source))
    if isinstance(routers, str):
        gen = torch.Generator().manual_seed(7)
        make = (lambda: torch.zeros(num_experts, TINY["hidden_size"])) if routers == "zeros" \
            else (lambda: torch.randn(num_experts, TINY["hidden_size"], generator=gen))
        routers = {layer: make() for layer in upcycled}
    routers = {layer: torch.zeros(num_experts, TINY["hidden_size"]) for layer in upcycled} | routers
    state = build_moe(recipes, source, routers, expert)
    moe = write_and_load(folder, state, moe_config(config, layout))
    return layout, recipes, moe


# -- 1. identical experts reproduce the dense model ---------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_experts_exact(family, top_k, dense_models, tmp_path):
    """Zero router: every token goes to the same expert(s) with weight exactly 1 (top-1:
    p/p) or 0.5 + 0.5 (top-2 of tied probabilities: p/(p+p)), each expert sees all
    tokens, so the MoE computes bit for bit what the dense model does."""
    dense, _ = dense_models[family]
    layout, _, moe = export(family, dense_models, tmp_path, num_experts=3, top_k=top_k)
    assert moe.config.model_type == moe_model_type(family)
    assert moe.config.mlp_only_layers == layout.dense
    assert moe.config._attn_implementation == dense.config._attn_implementation
    with torch.no_grad():
        for seed in range(2):
            ids = tokens(seed)
            assert torch.equal(moe(ids).logits, dense(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_experts_random_router(family, top_k, dense_models, tmp_path):
    """Random router: not bit-exact, for two structural reasons. Top-1 weights are
    exactly 1.0 (p/p), but each expert's matmuls run on only the tokens routed to it,
    and CPU BLAS picks its kernel (so its summation order) by row count: for a handful
    of rows the MLP output differs in the last bits. Top-2 adds w1*y + w2*y where
    w1 + w2 = 1 only up to rounding. Observed: <= 6e-7 on logits of |x| < 2 (<= 5 ulp);
    we allow 2e-6 + 2e-6 |x| (~16 ulp there) for other BLAS builds, far below what a
    real mistake does (a wrong window, expert or bias moves logits by > 1e-2)."""
    dense, _ = dense_models[family]
    _, _, moe = export(family, dense_models, tmp_path, num_experts=3, top_k=top_k,
                       routers="random")
    with torch.no_grad():
        for seed in range(2):
            ids = tokens(seed)
            torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=2e-6, atol=2e-6)


# -- 2. distinct experts: routing and naming ----------------------------------------


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The SwiGLU MLP every family here uses (hidden_act silu)."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@pytest.mark.parametrize("family,num_experts", [("llama", 3), ("mistral", 3), ("qwen2", 3),
                                                ("qwen3", 3), ("llama", 11)])
def test_distinct_experts_route_top1(family, num_experts, dense_models, tmp_path):
    """Each token's block output is the MLP of the expert its router logits pick;
    11 experts also check that experts.10 loads after experts.9 (numeric order)."""
    _, dense_dir = dense_models[family]
    source = source_of(dense_dir)[1]
    layer = FAMILIES[family][1][-1]
    gen = torch.Generator().manual_seed(3)
    noise = {}  # every expert a different perturbed copy of the dense MLP

    def expert(r: OutRecipe) -> torch.Tensor:
        noise[r.name] = source[r.source] + 0.5 * source[r.source].std() * torch.randn(
            r.shape, generator=gen)
        return noise[r.name]

    router = 3 * torch.randn(num_experts, TINY["hidden_size"], generator=gen)
    _, _, moe = export(family, dense_models, tmp_path, num_experts, top_k=1,
                       routers={layer: router}, expert=expert)
    block = moe.model.layers[layer].mlp
    h = torch.randn(1, 64, TINY["hidden_size"], generator=gen)
    chosen = (h[0] @ router.T).argmax(-1)
    assert len(set(chosen.tolist())) >= min(num_experts, 3)  # several experts exercised
    prefix = f"model.layers.{layer}.mlp.experts."
    experts = [[noise[f"{prefix}{e}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")]
               for e in range(num_experts)]
    every = torch.stack([mlp(h[0], *w) for w in experts])  # [M, tokens, hidden]
    expected = every[chosen, torch.arange(h.shape[1])]
    with torch.no_grad():
        got = block(h)[0]
    # weight exactly 1.0; only the matmul kernels (row counts) may differ, as above
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    other = every[(chosen + 1) % num_experts, torch.arange(h.shape[1])]
    assert (got - other).abs().amax() > 1e-2  # the experts really differ
    with torch.no_grad():
        out = moe.generate(tokens()[:1], max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
    assert SEQ_LEN < out.shape[1] <= SEQ_LEN + 4


# -- 3. parameter accounting ----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count(family, dense_models, tmp_path):
    """Recipes = checkpoint = loaded model, exactly: the all-zero shared expert is counted,
    the fused gate_up_proj holds the gate and up experts, a tied lm_head is neither in
    the checkpoint nor counted twice by parameters(); no buffer is stored."""
    _, recipes, moe = export(family, dense_models, tmp_path, num_experts=3, top_k=2)
    written = load_file(tmp_path / "model.safetensors")
    count = moe_parameter_count(recipes)
    assert count == sum(t.numel() for t in written.values())
    assert count == sum(p.numel() for p in moe.parameters())
    assert sorted(r.name for r in recipes) == sorted(written)


def test_export_loads_without_zero_element_modules(dense_models, tmp_path):
    """vLLM builds no shared expert for a 0-wide one and then cannot place the checkpoint's
    shared_expert weights; transformers warns on the zero-element layers it builds for it.
    The export's shared expert is SHARED_EXPERT_WIDTH wide, all zero, and adds exactly 0."""
    import warnings

    _, _, moe = export("llama", dense_models, tmp_path, num_experts=3, top_k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the zero-element init warning would raise here
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == SHARED_EXPERT_WIDTH
    written = load_file(tmp_path / "model.safetensors")
    shared = {n: t for n, t in written.items() if ".shared_expert" in n}
    assert shared and all(t.numel() > 0 and not t.any() for t in shared.values())
    block = next(b for b in loaded.model.layers if hasattr(b.mlp, "shared_expert"))
    x = torch.randn(5, config["hidden_size"])
    with torch.no_grad():
        assert not block.mlp.shared_expert(x).any()


# -- recipes and config, unit level -------------------------------------------------------


def test_recipe_order_and_kinds():
    L = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": ("BF16", (256, 64)),
        L + "self_attn.q_proj.weight": ("BF16", (64, 64)),
        L + "self_attn.k_proj.weight": ("BF16", (32, 64)),
        L + "self_attn.rotary_emb.inv_freq": ("F32", (8,)),
        L + "mlp.gate_proj.weight": ("BF16", (128, 64)),
        L + "mlp.up_proj.weight": ("BF16", (128, 64)),
        L + "mlp.down_proj.weight": ("BF16", (64, 128)),
        L + "post_attention_layernorm.weight": ("BF16", (64,)),
    }
    recipes = moe_recipes(MoeLayout("llama", 1, (0,), 2, 1), tensors)
    names = [r.name for r in recipes]
    assert names == [
        "model.embed_tokens.weight",
        L + "self_attn.q_proj.weight", L + "self_attn.q_proj.bias",
        L + "self_attn.k_proj.weight", L + "self_attn.k_proj.bias",
        L + "mlp.experts.0.gate_proj.weight", L + "mlp.experts.1.gate_proj.weight",
        L + "mlp.experts.0.up_proj.weight", L + "mlp.experts.1.up_proj.weight",
        L + "mlp.experts.0.down_proj.weight", L + "mlp.experts.1.down_proj.weight",
        L + "mlp.gate.weight", L + "mlp.shared_expert_gate.weight",
        L + "mlp.shared_expert.gate_proj.weight", L + "mlp.shared_expert.up_proj.weight",
        L + "mlp.shared_expert.down_proj.weight",
        L + "post_attention_layernorm.weight",
    ]
    by = {r.name: r for r in recipes}
    assert by[L + "self_attn.k_proj.bias"] == OutRecipe(L + "self_attn.k_proj.bias", "BF16", (32,),
                                                        "zeros", layer=0)
    assert by[L + "mlp.experts.1.down_proj.weight"] == OutRecipe(
        L + "mlp.experts.1.down_proj.weight", "BF16", (64, 128), "expert",
        L + "mlp.down_proj.weight", 0, 1)
    assert by[L + "mlp.gate.weight"] == OutRecipe(L + "mlp.gate.weight", "BF16", (2, 64), "router",
                                                  layer=0)
    assert by["model.embed_tokens.weight"].source == "model.embed_tokens.weight"
    # qwen3_moe: no zero biases, no shared expert
    qwen3 = moe_recipes(MoeLayout("qwen3", 1, (0,), 2, 1), tensors)
    assert not [r for r in qwen3 if r.kind == "zeros"]


def test_config_defaults_and_rope():
    """Keys absent from a source config.json take the source class's default, and RoPE
    resolves to what the source class computes."""
    source = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 500000.0,
              "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "bfloat16"}
    config = moe_config(source, MoeLayout("llama", 2, (1,), 4, 2))
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    assert config["num_key_value_heads"] == 4 and config["head_dim"] == 16
    assert config["vocab_size"] == 32000 and config["max_position_embeddings"] == 2048
    assert config["torch_dtype"] == "bfloat16"
    assert config["mlp_only_layers"] == [0] and config["moe_intermediate_size"] == 128
    assert config["shared_expert_intermediate_size"] == SHARED_EXPERT_WIDTH
    assert config["qkv_bias"] is True
    assert "router_aux_loss_coef" not in config
    ours = AutoConfig.for_model(**config)
    theirs = AutoConfig.for_model(**source)
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.bos_token_id == theirs.bos_token_id and ours.head_dim == theirs.head_dim
    # qwen3's class default head_dim is 128, not hidden/heads
    qwen3 = moe_config({**source, "model_type": "qwen3"}, MoeLayout("qwen3", 2, (1,), 4, 2))
    assert qwen3["head_dim"] == 128 and qwen3["model_type"] == "qwen3_moe"
    assert qwen3["architectures"] == ["Qwen3MoeForCausalLM"]


# -- 4. errors ---------------------------------------------------------------------------------


def test_families_without_moe():
    assert moe_model_type("bert") is None and moe_model_type("vit") is None
    assert moe_model_type("mistral") == "qwen2_moe" and moe_model_type("qwen3") == "qwen3_moe"


@pytest.mark.parametrize("args,message", [
    (("llama", 4, (1,), 1, 1), "num_experts"),
    (("llama", 4, (1,), 3, 0), "top_k"),
    (("llama", 4, (1,), 3, 4), "top_k"),
    (("llama", 4, (2, 1), 3, 1), "sorted and unique"),
    (("llama", 4, (1, 1), 3, 1), "sorted and unique"),
    (("llama", 4, (1, 4), 3, 1), "out of range"),
    (("llama", 4, (-1,), 3, 1), "out of range"),
    (("llama", 4, (), 3, 1), "no upcycled block"),
    (("bert", 4, (1,), 3, 1), "no MoE layout"),
])
def test_bad_layout(args, message):
    with pytest.raises(PacerError, match=message):
        MoeLayout(*args)


BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4}


@pytest.mark.parametrize("family,extra,message", [
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"attention_bias": True}, "o_proj bias"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     "only some layers"),
    ("llama", {"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, "rope type"),
    ("llama", {"num_hidden_layers": 3}, "num_hidden_layers"),
])
def test_unsupported_source_config(family, extra, message):
    with pytest.raises(PacerError, match=message) as err:
        moe_config({**BASE, **extra}, MoeLayout(family, 2, (1,), 2, 1))
    assert "\n" not in str(err.value)
    if message != "num_hidden_layers":
        assert "enable_moe_upcycle: false" in str(err.value)


def test_unsupported_source_tensors():
    tensors = {"model.layers.0.mlp.gate_proj.weight": ("F32", (128, 64)),
               "model.layers.0.mlp.gate_proj.bias": ("F32", (128,)),
               "model.layers.0.mlp.up_proj.weight": ("F32", (128, 64)),
               "model.layers.0.mlp.down_proj.weight": ("F32", (64, 128))}
    with pytest.raises(PacerError, match="MLP bias.*enable_moe_upcycle: false"):
        moe_recipes(MoeLayout("llama", 1, (0,), 2, 1), tensors)
    del tensors["model.layers.0.mlp.gate_proj.bias"]
    o_bias = {**tensors, "model.layers.0.self_attn.o_proj.bias": ("F32", (64,))}
    with pytest.raises(PacerError, match="output bias"):
        moe_recipes(MoeLayout("llama", 1, (0,), 2, 1), o_bias)
    del tensors["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(PacerError, match="lacks MLP weights"):
        moe_recipes(MoeLayout("llama", 1, (0,), 2, 1), tensors)


# -- 4. the llama.cpp target (export/llamacpp.py) ------------------------------------------


def llamacpp_export(family: str, config: dict, source: dict, folder: Path, upcycled: tuple,
                    num_experts: int, top_k: int):
    """The default layout's state (distinct experts, random routers) and the llama.cpp
    layout written from it through a TargetWriter, as the executor writes; returns
    (default model, llama.cpp model, target)."""
    gen = torch.Generator().manual_seed(11)
    layers = config["num_hidden_layers"]
    layout = MoeLayout(family, layers, upcycled, num_experts, top_k)
    recipes = moe_recipes(layout, shapes_of(source))
    routers = {b: 3 * torch.randn(num_experts, TINY["hidden_size"], generator=gen)
               for b in upcycled}
    state = build_moe(recipes, source, routers, expert=lambda r: source[r.source] + 0.5 * (
        source[r.source].std() * torch.randn(r.shape, generator=gen)))
    default = write_and_load(folder / "default", state, moe_config(config, layout))
    target = llamacpp_target(layout, recipes, config)
    (folder / "llamacpp").mkdir()
    shards = plan_shards(target.tensors, 1 << 40)
    logical = {r.name: OutTensor(r.name, r.dtype, r.shape) for r in target.recipes}
    writer = TargetWriter(ShardWriter(folder / "llamacpp", shards), target, logical)
    for r in target.recipes:  # the target's own tensors (zero routers, o_proj biases) too
        writer.write(r.name, state.get(r.name, torch.zeros(r.shape)))
    for name, tensor in state.items():  # what the calibration stage reads back
        assert torch.equal(writer.read(name), tensor), name
    writer.finish_all()
    writer.close()
    (folder / "llamacpp" / "config.json").write_text(json.dumps(target.config))
    model, info = AutoModelForCausalLM.from_pretrained(folder / "llamacpp",
                                                       output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                    "error_msgs": []}
    return default, model.eval(), target


@pytest.mark.parametrize("family,arch", [("llama", "MixtralForCausalLM"),
                                         ("mistral", "MixtralForCausalLM"),
                                         ("qwen2", "GraniteMoeForCausalLM"),
                                         ("qwen3", "Qwen3MoeForCausalLM")])
def test_llamacpp_target_computes_what_the_default_layout_does(family, arch, dense_models,
                                                                tmp_path):
    """Every block a MoE block (the dense ones as identical experts under a zero router),
    in the class llama.cpp knows for the family: it loads in stock transformers with no
    missing or unexpected key and gives the default layout's logits, with distinct
    experts and a random router in the upcycled blocks (mistral: a window shorter than
    the input; qwen3: q/k norms, head_dim 32, tied embeddings)."""
    if family == "qwen2":  # granitemoe has no sliding window: a qwen2 without one
        config = AutoConfig.for_model("qwen2", num_hidden_layers=3, **TINY)
        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_config(config).eval()
        perturb_(model, seed=105)
        model.save_pretrained(tmp_path / "dense")
        dense_dir = tmp_path / "dense"
    else:
        dense_dir = dense_models[family][1]
    config, source = source_of(dense_dir)
    upcycled = (0, 2) if config["num_hidden_layers"] == 3 else (1,)
    default, moe, target = llamacpp_export(family, config, source, tmp_path, upcycled,
                                           num_experts=3, top_k=2)
    assert type(moe).__name__ == arch and target.model_type == moe.config.model_type
    for layer in moe.model.layers:  # every block a MoE block of 3 experts
        block = getattr(layer, "block_sparse_moe", None) or layer.mlp
        assert block.experts.num_experts == 3
    with torch.no_grad():
        for seed in range(2):
            ids = tokens(seed)
            # granitemoe softmaxes the top-k logits instead of renormalising the top-k
            # probabilities: the same weights, rounded differently
            torch.testing.assert_close(moe(ids).logits, default(ids).logits, rtol=1e-5,
                                       atol=1e-5)


def test_llamacpp_target_parameters():
    """Dense blocks cost M copies of their MLP and run k of them; the config says so."""
    tensors = {"model.embed_tokens.weight": ("F32", (256, 64))}
    for b in range(2):
        tensors |= {f"model.layers.{b}.self_attn.{p}_proj.weight": ("F32", (64, 64))
                    for p in "qkvo"}
        tensors |= {f"model.layers.{b}.mlp.gate_proj.weight": ("F32", (128, 64)),
                    f"model.layers.{b}.mlp.up_proj.weight": ("F32", (128, 64)),
                    f"model.layers.{b}.mlp.down_proj.weight": ("F32", (64, 128))}
    layout = MoeLayout("llama", 2, (1,), 4, 2)
    target = llamacpp_target(layout, moe_recipes(layout, tensors),
                             {**BASE, "num_hidden_layers": 2})
    mlp = 3 * 128 * 64
    attention, embed, router = 4 * 64 * 64, 256 * 64, 4 * 64
    assert target.parameters() == embed + 2 * (attention + 4 * mlp + router)
    assert target.active_parameters(2, 4) == embed + 2 * (attention + 2 * mlp + router)
    assert target.config["num_local_experts"] == 4 and target.config["num_experts_per_tok"] == 2
    assert not any("bias" in t.name or "shared_expert" in t.name for t in target.tensors)


@pytest.mark.parametrize("family,extra,message", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
     "sliding-window"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("vit", {}, "no llama.cpp MoE layout"),
])
def test_llamacpp_target_refuses_what_it_cannot_represent(family, extra, message):
    with pytest.raises(PacerError, match=message) as err:
        check_source(family, {**BASE, **extra})
    assert "\n" not in str(err.value) and "target: transformers" in str(err.value)
