"""The supported model families, as data.

Axis labels follow DESIGN.md "Symmetries". Decoder families (RoPE, GQA):

* residual  one permutation of the hidden size shared by the whole network;
* mlp       the intermediate units of one block (gate/up rows, down columns);
* kv        the KV heads of one block; each moves with its r query heads;
* q         query heads within one KV group (size r, one permutation per KV head);
* vo        the value/output dims of one KV head (shared by its r query heads);
* rot       Q/K head dims: fixed, because RoPE pairs them (no permutation is exact).

Encoder families (BERT, ViT; no RoPE): heads permute freely, and within a head Q/K
share one permutation (qk) and V/O another (vo).
"""

from __future__ import annotations

from ..errors import PacerError
from .spec import ArchSpec, GroupKind, TensorRule as R


def _need(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PacerError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value


def decoder_dims(config: dict) -> dict[str, int]:
    hidden = _need(config, "hidden_size")
    heads = _need(config, "num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if heads % kv:
        raise PacerError(f"config.json: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}")
    return {
        "residual": hidden, "mlp": _need(config, "intermediate_size"), "layers":
        _need(config, "num_hidden_layers"), "kv": kv, "q": heads // kv, "vo": head_dim,
        "rot": head_dim,
    }


def encoder_dims(config: dict) -> dict[str, int]:
    hidden = _need(config, "hidden_size")
    heads = _need(config, "num_attention_heads")
    if hidden % heads:
        raise PacerError(f"config.json: hidden_size {hidden} is not a multiple of "
                         f"num_attention_heads {heads}")
    return {
        "residual": hidden, "mlp": _need(config, "intermediate_size"),
        "layers": _need(config, "num_hidden_layers"), "heads": heads, "qk": hidden // heads,
        "vo": hidden // heads,
    }


DECODER_GROUPS = (
    GroupKind("residual", "residual", scope="global"),
    GroupKind("mlp", "mlp"),
    GroupKind("kv", "kv"),
    GroupKind("q", "q", parent="kv"),
    GroupKind("vo", "vo", parent="kv"),
)
ENCODER_GROUPS = (
    GroupKind("residual", "residual", scope="global"),
    GroupKind("mlp", "mlp"),
    GroupKind("heads", "heads"),
    GroupKind("qk", "qk", parent="heads"),
    GroupKind("vo", "vo", parent="heads"),
)

_L = "model.layers.{i}."
LLAMA_RULES = (
    R("model.embed_tokens.weight", "embed", ("-", "residual"), unit="embed"),
    R(_L + "input_layernorm.weight", "attn.norm", ("residual",)),
    R(_L + "self_attn.q_proj.weight", "attn.q", ("kv.q.rot", "residual")),
    R(_L + "self_attn.k_proj.weight", "attn.k", ("kv.rot", "residual")),
    R(_L + "self_attn.v_proj.weight", "attn.v", ("kv.vo", "residual")),
    R(_L + "self_attn.o_proj.weight", "attn.o", ("residual", "kv.q.vo")),
    R(_L + "self_attn.q_proj.bias", "attn.q.bias", ("kv.q.rot",), optional=True),
    R(_L + "self_attn.k_proj.bias", "attn.k.bias", ("kv.rot",), optional=True),
    R(_L + "self_attn.v_proj.bias", "attn.v.bias", ("kv.vo",), optional=True),
    R(_L + "self_attn.o_proj.bias", "attn.o.bias", ("residual",), optional=True),
    R(_L + "post_attention_layernorm.weight", "mlp.norm", ("residual",)),
    R(_L + "mlp.gate_proj.weight", "mlp.gate", ("mlp", "residual")),
    R(_L + "mlp.up_proj.weight", "mlp.up", ("mlp", "residual")),
    R(_L + "mlp.down_proj.weight", "mlp.down", ("residual", "mlp")),
    R(_L + "mlp.gate_proj.bias", "mlp.gate.bias", ("mlp",), optional=True),
    R(_L + "mlp.up_proj.bias", "mlp.up.bias", ("mlp",), optional=True),
    R(_L + "mlp.down_proj.bias", "mlp.down.bias", ("residual",), optional=True),
    R("model.norm.weight", "final.norm", ("residual",), unit="head"),
    R("lm_head.weight", "lm_head", ("-", "residual"), unit="head", optional=True),
)
QWEN3_RULES = LLAMA_RULES + (
    # q_norm/k_norm act within one head on its rotary dims: unaffected by head moves.
    R(_L + "self_attn.q_norm.weight", "attn.q.norm", ("rot",)),
    R(_L + "self_attn.k_norm.weight", "attn.k.norm", ("rot",)),
)
DECODER_PASSTHROUGH = (R(_L + "self_attn.rotary_emb.inv_freq", "rope", ("-",), optional=True),)

# Gemma: the llama tensors, with the LM head tied to the embeddings (no lm_head.weight).
# Its RMSNorm scales by (1 + w) and the embeddings by sqrt(hidden): a residual permutation
# of w permutes 1 + w alike, and a scalar commutes with it, so the llama rules stay exact.
# Gemma 2 and 3 norm the attention output (post_attention_layernorm) and the MLP's input
# and output (pre_/post_feedforward_layernorm), all on the residual stream; their logit
# softcapping (tanh(x / c) * c, elementwise) and sliding windows touch no weight.
GEMMA2_RULES = tuple(
    R(_L + "post_attention_layernorm.weight", "attn.post_norm", ("residual",))
    if r.role == "mlp.norm" else r for r in LLAMA_RULES) + (
    R(_L + "pre_feedforward_layernorm.weight", "mlp.norm", ("residual",)),
    R(_L + "post_feedforward_layernorm.weight", "mlp.post_norm", ("residual",)),
)
GEMMA3_RULES = GEMMA2_RULES + QWEN3_RULES[len(LLAMA_RULES):]  # + q_norm / k_norm
# PACER's sample stages run the forward pass of runtime/blocks.py, which has none for these.
NO_BLOCKS = "the block-wise forward pass that PACER's samples run through does not cover it"


def _decoder(family: str, model_types: tuple[str, ...], rules=LLAMA_RULES,
             no_samples: str = "") -> ArchSpec:
    return ArchSpec(family, model_types, decoder_dims, DECODER_GROUPS, rules,
                    DECODER_PASSTHROUGH, has_rope=True, no_samples=no_samples)


def phi3_dims(config: dict) -> dict[str, int]:
    """decoder_dims, plus ``halves``: gate_up_proj stacks the gate rows over the up rows."""
    return {**decoder_dims(config), "halves": 2}


# Phi-3 fuses q/k/v into qkv_proj (rows: all query heads, then the KV heads' keys, then
# their values) and gate/up into gate_up_proj (rows: gate, then up). gate_up is a product
# layout, half-major, so its rows take the MLP permutation exactly ("halves.mlp"); qkv is a
# concatenation of three differently sized head layouts, which the factor system cannot
# express, so the heads stay fixed ("-") and alignment is refused (no_align) rather than
# done on the residual stream and MLP alone.
PHI3 = ArchSpec(
    "phi3", ("phi3",), phi3_dims, DECODER_GROUPS[:2],
    (
        R("model.embed_tokens.weight", "embed", ("-", "residual"), unit="embed"),
        R(_L + "input_layernorm.weight", "attn.norm", ("residual",)),
        R(_L + "self_attn.qkv_proj.weight", "attn.qkv", ("-", "residual")),
        R(_L + "self_attn.o_proj.weight", "attn.o", ("residual", "-")),
        R(_L + "post_attention_layernorm.weight", "mlp.norm", ("residual",)),
        R(_L + "mlp.gate_up_proj.weight", "mlp.gate_up", ("halves.mlp", "residual")),
        R(_L + "mlp.down_proj.weight", "mlp.down", ("residual", "mlp")),
        R("model.norm.weight", "final.norm", ("residual",), unit="head"),
        R("lm_head.weight", "lm_head", ("-", "residual"), unit="head", optional=True),
    ),
    DECODER_PASSTHROUGH, has_rope=True,
    no_align="fused qkv_proj has no exact permutation rule here", no_samples=NO_BLOCKS,
)


# MoE inputs (fine-tunes of one MoE model), in the per-expert names transformers 5.23
# writes on save (in memory it fuses them). They merge tensor by tensor as stored: expert e
# of the output from expert e of each input. The attention and residual rules are the
# dense ones; the experts' intermediate units and the expert order are permutation
# symmetries too, but the align stage matches one MLP per block, so they stay fixed ("-")
# and alignment is refused (no_align), as is PACER, which upcycles dense MLPs (no_pacer).
_X = _L + "block_sparse_moe."
_M = _L + "mlp."
NO_MOE_ALIGN = "its experts have no alignment rule here (the align stage matches dense MLPs)"
NO_MOE_PACER = "method pacer upcycles dense MLP blocks and an MoE input already has experts"
_ROUTER = "moe.router"  # not "mlp.*": PACER's MLP statistics must not take these for a dense MLP
MOE_EXPERTS = (
    R(_M + "gate.weight", _ROUTER, ("-", "residual")),
    R(_M + "experts.{e}.gate_proj.weight", "moe.gate", ("-", "residual")),
    R(_M + "experts.{e}.up_proj.weight", "moe.up", ("-", "residual")),
    R(_M + "experts.{e}.down_proj.weight", "moe.down", ("residual", "-")),
)
# qwen*_moe blocks listed in mlp_only_layers (or off decoder_sparse_step) keep a dense MLP.
DENSE_MLP = tuple(R(r.template, r.role, r.axes, optional=True) for r in LLAMA_RULES
                  if r.role in ("mlp.gate", "mlp.up", "mlp.down"))
# embeddings, attention, norms and head: the llama rules less the dense MLP's
_NOT_MLP = tuple(r for r in LLAMA_RULES if not r.role.startswith("mlp.") or r.role == "mlp.norm")
MIXTRAL_RULES = _NOT_MLP + (
    R(_X + "gate.weight", _ROUTER, ("-", "residual")),
    R(_X + "experts.{e}.w1.weight", "moe.gate", ("-", "residual")),  # w1: gate, w3: up
    R(_X + "experts.{e}.w3.weight", "moe.up", ("-", "residual")),
    R(_X + "experts.{e}.w2.weight", "moe.down", ("residual", "-")),
)
QWEN2_MOE_RULES = _NOT_MLP + tuple(R(r.template, r.role, r.axes, optional=True)
                                     for r in MOE_EXPERTS) + DENSE_MLP + (
    R(_M + "shared_expert.gate_proj.weight", "moe.shared.gate", ("-", "residual"), optional=True),
    R(_M + "shared_expert.up_proj.weight", "moe.shared.up", ("-", "residual"), optional=True),
    R(_M + "shared_expert.down_proj.weight", "moe.shared.down", ("residual", "-"),
      optional=True),
    R(_M + "shared_expert_gate.weight", "moe.shared.router", ("-", "residual"), optional=True),
)
QWEN3_MOE_RULES = _NOT_MLP + QWEN3_RULES[len(LLAMA_RULES):] + tuple(
    R(r.template, r.role, r.axes, optional=True) for r in MOE_EXPERTS) + DENSE_MLP


def _moe(family: str, rules: tuple[R, ...]) -> ArchSpec:
    return ArchSpec(family, (family,), decoder_dims, DECODER_GROUPS, rules, DECODER_PASSTHROUGH,
                    has_rope=True, no_align=NO_MOE_ALIGN, no_pacer=NO_MOE_PACER)


_B = "encoder.layer.{i}."
BERT = ArchSpec(
    "bert", ("bert",), encoder_dims, ENCODER_GROUPS,
    (
        R("embeddings.word_embeddings.weight", "embed", ("-", "residual"), unit="embed"),
        R("embeddings.position_embeddings.weight", "embed.position", ("-", "residual"), unit="embed"),
        R("embeddings.token_type_embeddings.weight", "embed.type", ("-", "residual"), unit="embed",
          optional=True),
        R("embeddings.LayerNorm.weight", "embed.norm", ("residual",), unit="embed"),
        R("embeddings.LayerNorm.bias", "embed.norm.bias", ("residual",), unit="embed"),
        R(_B + "attention.self.query.weight", "attn.q", ("heads.qk", "residual")),
        R(_B + "attention.self.query.bias", "attn.q.bias", ("heads.qk",)),
        R(_B + "attention.self.key.weight", "attn.k", ("heads.qk", "residual")),
        R(_B + "attention.self.key.bias", "attn.k.bias", ("heads.qk",)),
        R(_B + "attention.self.value.weight", "attn.v", ("heads.vo", "residual")),
        R(_B + "attention.self.value.bias", "attn.v.bias", ("heads.vo",)),
        R(_B + "attention.output.dense.weight", "attn.o", ("residual", "heads.vo")),
        R(_B + "attention.output.dense.bias", "attn.o.bias", ("residual",)),
        R(_B + "attention.output.LayerNorm.weight", "attn.norm", ("residual",)),
        R(_B + "attention.output.LayerNorm.bias", "attn.norm.bias", ("residual",)),
        R(_B + "intermediate.dense.weight", "mlp.up", ("mlp", "residual")),
        R(_B + "intermediate.dense.bias", "mlp.up.bias", ("mlp",)),
        R(_B + "output.dense.weight", "mlp.down", ("residual", "mlp")),
        R(_B + "output.dense.bias", "mlp.down.bias", ("residual",)),
        R(_B + "output.LayerNorm.weight", "mlp.norm", ("residual",)),
        R(_B + "output.LayerNorm.bias", "mlp.norm.bias", ("residual",)),
        # The pooler's output is a model output: rows fixed, inputs from the residual.
        R("pooler.dense.weight", "pooler", ("-", "residual"), unit="head", optional=True),
        R("pooler.dense.bias", "pooler.bias", ("-",), unit="head", optional=True),
        # Masked-LM head. Its hidden space is tied to the word embeddings' columns,
        # so it takes the residual permutation on both sides.
        R("cls.predictions.transform.dense.weight", "mlm.dense", ("residual", "residual"),
          unit="head", optional=True),
        R("cls.predictions.transform.dense.bias", "mlm.dense.bias", ("residual",), unit="head",
          optional=True),
        R("cls.predictions.transform.LayerNorm.weight", "mlm.norm", ("residual",), unit="head",
          optional=True),
        R("cls.predictions.transform.LayerNorm.bias", "mlm.norm.bias", ("residual",), unit="head",
          optional=True),
        R("cls.predictions.decoder.weight", "mlm.decoder", ("-", "residual"), unit="head",
          optional=True),
        R("cls.predictions.decoder.bias", "mlm.decoder.bias", ("-",), unit="head", optional=True),
        R("cls.predictions.bias", "mlm.bias", ("-",), unit="head", optional=True),
        # Sequence classifiers sit on the pooler: nothing of theirs permutes.
        R("classifier.weight", "classifier", ("-", "-"), unit="head", optional=True),
        R("classifier.bias", "classifier.bias", ("-",), unit="head", optional=True),
    ),
    passthrough=(
        R("embeddings.position_ids", "position_ids", ("-", "-"), unit="embed", optional=True),
        R("embeddings.token_type_ids", "token_type_ids", ("-", "-"), unit="embed", optional=True),
    ),
    prefix=r"(?:bert\.)?",
    no_samples=NO_BLOCKS,  # an encoder has no block-wise forward pass (RegMean, calibration)
)

# HF ViT, in the spelling transformers < 5 writes (and still writes on save) ...
_V = "encoder.layer.{i}."
# ... and the spelling transformers >= 5 uses in memory.
_W = "layers.{i}."
VIT = ArchSpec(
    "vit", ("vit",), encoder_dims, ENCODER_GROUPS,
    (
        R("embeddings.cls_token", "embed.cls", ("-", "-", "residual"), unit="embed"),
        R("embeddings.mask_token", "embed.mask", ("-", "-", "residual"), unit="embed",
          optional=True),
        R("embeddings.position_embeddings", "embed.position", ("-", "-", "residual"), unit="embed"),
        R("embeddings.patch_embeddings.projection.weight", "embed.patch",
          ("residual", "-", "-", "-"), unit="embed"),
        R("embeddings.patch_embeddings.projection.bias", "embed.patch.bias", ("residual",),
          unit="embed"),
        R(_V + "layernorm_before.weight", "attn.norm", ("residual",)),
        R(_V + "layernorm_before.bias", "attn.norm.bias", ("residual",)),
        R(_V + "attention.attention.query.weight", "attn.q", ("heads.qk", "residual")),
        R(_V + "attention.attention.query.bias", "attn.q.bias", ("heads.qk",)),
        R(_V + "attention.attention.key.weight", "attn.k", ("heads.qk", "residual")),
        R(_V + "attention.attention.key.bias", "attn.k.bias", ("heads.qk",)),
        R(_V + "attention.attention.value.weight", "attn.v", ("heads.vo", "residual")),
        R(_V + "attention.attention.value.bias", "attn.v.bias", ("heads.vo",)),
        R(_V + "attention.output.dense.weight", "attn.o", ("residual", "heads.vo")),
        R(_V + "attention.output.dense.bias", "attn.o.bias", ("residual",)),
        R(_V + "layernorm_after.weight", "mlp.norm", ("residual",)),
        R(_V + "layernorm_after.bias", "mlp.norm.bias", ("residual",)),
        R(_V + "intermediate.dense.weight", "mlp.up", ("mlp", "residual")),
        R(_V + "intermediate.dense.bias", "mlp.up.bias", ("mlp",)),
        R(_V + "output.dense.weight", "mlp.down", ("residual", "mlp")),
        R(_V + "output.dense.bias", "mlp.down.bias", ("residual",)),
        R(_W + "layernorm_before.weight", "attn.norm", ("residual",)),
        R(_W + "layernorm_before.bias", "attn.norm.bias", ("residual",)),
        R(_W + "attention.q_proj.weight", "attn.q", ("heads.qk", "residual")),
        R(_W + "attention.q_proj.bias", "attn.q.bias", ("heads.qk",)),
        R(_W + "attention.k_proj.weight", "attn.k", ("heads.qk", "residual")),
        R(_W + "attention.k_proj.bias", "attn.k.bias", ("heads.qk",)),
        R(_W + "attention.v_proj.weight", "attn.v", ("heads.vo", "residual")),
        R(_W + "attention.v_proj.bias", "attn.v.bias", ("heads.vo",)),
        R(_W + "attention.o_proj.weight", "attn.o", ("residual", "heads.vo")),
        R(_W + "attention.o_proj.bias", "attn.o.bias", ("residual",)),
        R(_W + "layernorm_after.weight", "mlp.norm", ("residual",)),
        R(_W + "layernorm_after.bias", "mlp.norm.bias", ("residual",)),
        R(_W + "mlp.fc1.weight", "mlp.up", ("mlp", "residual")),
        R(_W + "mlp.fc1.bias", "mlp.up.bias", ("mlp",)),
        R(_W + "mlp.fc2.weight", "mlp.down", ("residual", "mlp")),
        R(_W + "mlp.fc2.bias", "mlp.down.bias", ("residual",)),
        R("layernorm.weight", "final.norm", ("residual",), unit="head"),
        R("layernorm.bias", "final.norm.bias", ("residual",), unit="head"),
        R("pooler.dense.weight", "pooler", ("-", "residual"), unit="head", optional=True),
        R("pooler.dense.bias", "pooler.bias", ("-",), unit="head", optional=True),
        # The image classifier reads the final-norm CLS token: inputs are residual.
        R("classifier.weight", "classifier", ("-", "residual"), unit="head", optional=True),
        R("classifier.bias", "classifier.bias", ("-",), unit="head", optional=True),
    ),
    prefix=r"(?:vit\.)?",
)

FAMILIES: tuple[ArchSpec, ...] = (
    _decoder("llama", ("llama",)),
    _decoder("mistral", ("mistral",)),
    _decoder("qwen2", ("qwen2",)),
    _decoder("qwen3", ("qwen3",), QWEN3_RULES),
    _decoder("gemma", ("gemma",), no_samples=NO_BLOCKS),
    _decoder("gemma2", ("gemma2",), GEMMA2_RULES, no_samples=NO_BLOCKS),
    _decoder("gemma3_text", ("gemma3_text",), GEMMA3_RULES, no_samples=NO_BLOCKS),
    PHI3,
    _moe("mixtral", MIXTRAL_RULES),
    _moe("qwen2_moe", QWEN2_MOE_RULES),
    _moe("qwen3_moe", QWEN3_MOE_RULES),
    BERT,
    VIT,
)
