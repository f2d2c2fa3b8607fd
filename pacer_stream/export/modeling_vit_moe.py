"""ViT with mixture-of-experts MLP blocks and token merging (ToMe); standalone.

pacer-stream copies this file verbatim next to an upcycled ViT's weights, together with
``configuration_vit_moe.py`` (the config class) and ``token_merging_vit_moe.py`` (ToMe),
which it imports relatively, so the folder loads with ``trust_remote_code=True``::

    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)

It imports only torch, transformers and those two files. Parameter names are those
transformers writes for ViT checkpoints
(``vit.encoder.layer.{i}.attention.attention.query.weight``, ...); a block listed in
``config.moe_layers`` has, instead of ``intermediate.dense`` and ``output.dense``, M
experts and a router::

    vit.encoder.layer.{i}.moe.experts.{e}.fc1.{weight,bias}   # d -> I, a copy of intermediate.dense
    vit.encoder.layer.{i}.moe.experts.{e}.fc2.{weight,bias}   # I -> d, a copy of output.dense
    vit.encoder.layer.{i}.moe.gate.weight                     # router [M, d], no bias

Routing: softmax over the M router logits, keep the top k, renormalise them to sum 1,
output = sum of weight * expert(x).

Token merging (ToMe, ``token_merging_vit_moe.py``) is on when ``config.tome_r > 0``.
``apply_tome(model, r)`` adds the same to a plain transformers ``ViTModel`` /
``ViTForImageClassification``.

With ``tome_r == 0`` every block computes exactly the eager attention of transformers'
ViT (same operations in the same order), so a top-1 ViT-MoE whose experts all equal the
dense MLP reproduces the dense model.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTLayer, ViTModel, ViTPooler

from .configuration_vit_moe import ViTMoeConfig
from .token_merging_vit_moe import ToMeState, proportional_attention, tome_block


# -- ToMe for a plain transformers ViT ---------------------------------------------


def _vit_backbone(model: nn.Module) -> nn.Module:
    """The ViTModel / ViTMoeModel inside ``model`` (or ``model`` itself)."""
    backbone = getattr(model, "vit", model)
    if not isinstance(backbone, (ViTModel, ViTMoeModel)):
        raise ValueError(f"apply_tome: expected a transformers ViTModel or "
                         f"ViTForImageClassification (or a ViT-MoE), got {type(model).__name__}")
    return backbone


class ToMeViTLayer(ViTLayer):
    """transformers' ViTLayer with ToMe; :func:`apply_tome` switches layers to this class.

    A class switch rather than a patched ``forward`` closure, so patched models still
    deepcopy and pickle. ``tome_state`` is shared by all layers of one model.
    """

    tome_state: ToMeState
    tome_index: int  # place in the stack: the first layer starts a fresh state
    tome_last: bool  # the last layer unmerges, when asked

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        state = self.tome_state
        if state.r == 0:  # bit-identical to the unpatched model, whatever its attention backend
            return super().forward(hidden_states, attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError("apply_tome: attention_mask is not supported with token merging "
                             "(merged tokens have no mask row); pass attention_mask=None")
        if self.tome_index == 0:
            state.reset()
        x = tome_block(hidden_states, self.layernorm_before, self.attend, self.layernorm_after,
                       self.mlp, self.dropout, state)
        return state.finish(x) if self.tome_last else x

    def attend(self, h: torch.Tensor,
               size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Proportional attention with this layer's projections; (output, keys)."""
        a = self.attention
        p = a.attention_dropout if a.training else 0.0
        context, keys = proportional_attention(h, a.q_proj, a.k_proj, a.v_proj, a.head_dim,
                                               size, p)
        return a.o_proj(context), keys


def apply_tome(model: nn.Module, r: int, unmerge: bool = False) -> nn.Module:
    """Turn on token merging, r tokens per block, in a ViT; returns ``model``.

    A transformers ``ViTModel`` / ``ViTForImageClassification`` has its layers switched
    to :class:`ToMeViTLayer` (call again to change r; :func:`remove_tome` undoes it); a
    ViT-MoE just gets its config updated. ``unmerge`` gathers the last hidden states back
    to the input length. r = 0 leaves the outputs bit-identical to the unpatched model.
    """
    if r < 0:
        raise ValueError(f"apply_tome: r must be >= 0 (0 turns merging off), got {r}")
    backbone = _vit_backbone(model)
    if isinstance(backbone, ViTMoeModel):
        backbone.config.tome_r, backbone.config.tome_unmerge = r, unmerge
        return model
    state = ToMeState(r, unmerge)
    for i, layer in enumerate(backbone.layers):
        if type(layer) not in (ViTLayer, ToMeViTLayer):
            raise ValueError(f"apply_tome: layer {i} is a {type(layer).__name__}, not a "
                             f"transformers ViTLayer; ToMe needs the stock ViT block")
        layer.__class__ = ToMeViTLayer
        layer.tome_state, layer.tome_index = state, i
        layer.tome_last = i == len(backbone.layers) - 1
    model.tome_state = state
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome` on a transformers ViT (a ViT-MoE: set tome_r to 0)."""
    backbone = _vit_backbone(model)
    if isinstance(backbone, ViTMoeModel):
        backbone.config.tome_r = 0
        return model
    for layer in backbone.layers:
        if isinstance(layer, ToMeViTLayer):
            layer.__class__ = ViTLayer
            for name in ("tome_state", "tome_index", "tome_last"):
                layer.__dict__.pop(name, None)
    model.__dict__.pop("tome_state", None)
    return model


# -- modules -----------------------------------------------------------------------


class ViTMoeDense(nn.Module):
    """A Linear under ``.dense``: the nesting of transformers' ViT checkpoint names."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class ViTMoeSelfAttention(nn.Module):
    """The query/key/value projections (``attention.attention.{query,key,value}``)."""

    def __init__(self, config: ViTMoeConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.head_dim = config.hidden_size // config.num_attention_heads
        d = config.hidden_size
        self.query = nn.Linear(d, d, bias=config.qkv_bias)
        self.key = nn.Linear(d, d, bias=config.qkv_bias)
        self.value = nn.Linear(d, d, bias=config.qkv_bias)
        self.dropout_prob = config.attention_probs_dropout_prob


class ViTMoeAttention(nn.Module):
    """Multi-head self-attention, proportional when token sizes are given."""

    def __init__(self, config: ViTMoeConfig):
        super().__init__()
        self.attention = ViTMoeSelfAttention(config)
        self.output = ViTMoeDense(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor,
                size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attention
        p = a.dropout_prob if self.training else 0.0
        context, keys = proportional_attention(x, a.query, a.key, a.value, a.head_dim, size, p)
        return self.output(context), keys


class ViTMoeExpert(nn.Module):
    """One expert: a whole copy of the ViT MLP (fc1, activation, fc2)."""

    def __init__(self, config: ViTMoeConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTMoeSparseMlp(nn.Module):
    """Top-k routed experts: softmax router, top k kept and renormalised to sum 1."""

    def __init__(self, config: ViTMoeConfig, layer: int = 0):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(ViTMoeExpert(config) for _ in range(config.num_experts))
        self.mode = config.router_mode
        self.temperature = config.router_temperature
        # a plain list, not a buffer: from_pretrained builds modules on the meta device and
        # would leave a non-persistent buffer uninitialised
        self.expert_sizes = list((config.expert_sizes or {}).get(str(layer))
                                 or [1] * config.num_experts)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [tokens, M]: the gate, or ||Delta_m x|| / temperature (see config).

        The deviation router costs one fc1-sized matmul per expert and token: as much as
        running every expert's first layer.
        """
        if self.mode == "linear":
            return self.gate(x)
        fc1 = torch.stack([e.fc1.weight for e in self.experts])  # [M, I, d]
        sizes = torch.tensor(self.expert_sizes, dtype=fc1.dtype, device=fc1.device)
        consensus = torch.einsum("m,mid->id", sizes / sizes.sum(), fc1)
        scores = [torch.linalg.vector_norm(x @ (w - consensus).T, dim=-1) for w in fc1]
        return torch.stack(scores, dim=-1) / self.temperature

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), both [tokens, top_k], for flat tokens ``x`` [tokens, d]."""
        probs = nn.functional.softmax(self.logits(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        # renormalised: top-1 weights are exactly 1 (p / p), so identical experts give
        # exactly the dense output
        return (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():  # each expert runs only on the tokens routed to it
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return out.view_as(x)


class ViTMoeLayer(nn.Module):
    """A pre-norm ViT block whose MLP is dense or a routed MoE."""

    def __init__(self, config: ViTMoeConfig, moe: bool, index: int = 0):
        super().__init__()
        self.attention = ViTMoeAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if moe:
            self.moe = ViTMoeSparseMlp(config, index)
        else:  # the dense MLP under its checkpoint names
            self.intermediate = ViTMoeDense(config.hidden_size, config.intermediate_size)
            self.output = ViTMoeDense(config.intermediate_size, config.hidden_size)
            self.act = ACT2FN[config.hidden_act]

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "moe"):
            return self.moe(x)
        return self.output(self.act(self.intermediate(x)))

    def forward(self, x: torch.Tensor, state: ToMeState | None = None) -> torch.Tensor:
        return tome_block(x, self.layernorm_before, self.attention, self.layernorm_after,
                          self.mlp, self.dropout, state)


class ViTMoeEncoder(nn.Module):
    def __init__(self, config: ViTMoeConfig):
        super().__init__()
        moe = set(config.moe_layers)
        self.layer = nn.ModuleList(ViTMoeLayer(config, i in moe, i)
                                   for i in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, state: ToMeState | None = None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple | None]:
        hidden = (x,) if output_hidden_states else None
        for layer in self.layer:
            x = layer(x, state)
            if hidden is not None:
                hidden += (x,)  # lengths shrink block by block when merging
        return x, hidden


# -- models ------------------------------------------------------------------------


class ViTMoePreTrainedModel(PreTrainedModel):
    config_class = ViTMoeConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ViTEmbeddings", "ViTMoeLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ViTEmbeddings):  # as transformers' ViT does
            std = self.config.initializer_range
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)


class ViTMoeModel(ViTMoePreTrainedModel):
    """The ViT-MoE backbone; names as transformers' ViTModel checkpoints (no ``vit.``)."""

    def __init__(self, config: ViTMoeConfig, add_pooling_layer: bool | None = None):
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = config.add_pooling_layer
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTMoeEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutputWithPooling | tuple:
        expected = self.embeddings.patch_embeddings.projection.weight.dtype
        x = self.embeddings(pixel_values.to(expected),
                            interpolate_pos_encoding=bool(interpolate_pos_encoding))
        state = ToMeState(self.config.tome_r, self.config.tome_unmerge) \
            if self.config.tome_r > 0 else None
        x, hidden = self.encoder(x, state, bool(output_hidden_states))
        if state is not None:
            x = state.finish(x)
        x = self.layernorm(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                         hidden_states=hidden)
        return out if return_dict is not False else out.to_tuple()


class ViTMoeForImageClassification(ViTMoePreTrainedModel):
    """ViT-MoE with a linear classifier on the final CLS token (always index 0)."""

    def __init__(self, config: ViTMoeConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTMoeModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) \
            if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                interpolate_pos_encoding: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> ImageClassifierOutput | tuple:
        out = self.vit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                       output_hidden_states=output_hidden_states)
        logits = self.classifier(out.last_hidden_state[:, 0, :])
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        result = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()


__all__ = [
    "ViTMoeModel", "ViTMoeForImageClassification", "ViTMoePreTrainedModel", "ToMeViTLayer",
    "apply_tome", "remove_tome",
]
