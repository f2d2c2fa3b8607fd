"""Export of a partially upcycled ViT as a ViT-MoE checkpoint with its own modeling code.

No stock transformers class is a ViT with MoE blocks, so the output folder carries its
own code, copied verbatim from this package (:func:`write_modeling`) in transformers'
layout: ``modeling_vit_moe.py`` (the model), which imports ``configuration_vit_moe.py``
(the config class) and ``token_merging_vit_moe.py`` (ToMe) relatively, and a config.json
whose ``auto_map`` points at the config and model classes; it loads with
``AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)``.

An upcycled block's MLP (``intermediate.dense`` = fc1, ``output.dense`` = fc2, both with
biases) becomes M experts, each a whole copy of it, plus a router without bias::

    vit.encoder.layer.{i}.moe.experts.{e}.fc1.{weight,bias}
    vit.encoder.layer.{i}.moe.experts.{e}.fc2.{weight,bias}
    vit.encoder.layer.{i}.moe.gate.weight                      # router, [M, hidden]

Every other tensor keeps the name transformers writes for ViT checkpoints (the
``encoder.layer.{i}.attention.attention.query`` spelling, ``vit.`` prefixed under a
classifier), whichever of the two spellings the engine read it in.

Like :mod:`.moe`, this module only computes names, shapes and the config; the executor
fills in the tensors. It never imports transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PacerError
from ..io.writer import write_atomic
from .moe import DENSE_HINT, OutRecipe, check_layout

# The code a ViT-MoE output carries. modeling_vit_moe.py imports the other two relatively;
# transformers copies such imports along when it loads the folder, so all three must be there.
MODELING_FILES = ("configuration_vit_moe.py", "token_merging_vit_moe.py", "modeling_vit_moe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_vit_moe.ViTMoeConfig",
    "AutoModel": "modeling_vit_moe.ViTMoeModel",
    "AutoModelForImageClassification": "modeling_vit_moe.ViTMoeForImageClassification",
}
# Keys of the source config.json that describe the source file, not the model.
DROPPED_KEYS = ("architectures", "model_type", "auto_map", "transformers_version", "_name_or_path")

# Block tensors: transformers >= 5 in-memory spelling -> saved spelling (module part).
MEMORY_TO_SAVED = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
}
SAVED_BLOCK_MODULES = frozenset(MEMORY_TO_SAVED.values())
MLP_MODULES = {"intermediate.dense": "fc1", "output.dense": "fc2"}  # saved name -> expert name
# Tensors outside the blocks, the same in both spellings (before the optional vit. prefix).
BACKBONE_TENSORS = frozenset({
    "embeddings.cls_token", "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
    "layernorm.weight", "layernorm.bias",
})
POOLER_TENSORS = frozenset({"pooler.dense.weight", "pooler.dense.bias"})
CLASSIFIER_TENSORS = frozenset({"classifier.weight", "classifier.bias"})

_BLOCK = re.compile(r"(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)")


@dataclass(frozen=True)
class VitMoeLayout:
    """Which ViT blocks become MoE, the expert count and routing, and token merging."""

    num_layers: int
    upcycled: tuple[int, ...]  # sorted block indices that become MoE
    num_experts: int  # M >= 2
    top_k: int  # 1 <= top_k <= M
    tome_r: int = 0  # tokens merged per block at inference (ToMe); 0 = off

    def __post_init__(self) -> None:
        check_layout("ViT-MoE export", self.num_layers, self.upcycled, self.num_experts,
                     self.top_k)
        if self.tome_r < 0:
            raise PacerError(f"ViT-MoE export: tome_r must be 0 (off) or more, got {self.tome_r}")

    @property
    def dense(self) -> list[int]:
        """The blocks that keep a dense MLP."""
        chosen = set(self.upcycled)
        return [i for i in range(self.num_layers) if i not in chosen]


# -- config.json -------------------------------------------------------------------


def vit_moe_config(source_config: dict, layout: VitMoeLayout, classifier: bool | None = None,
                   pooler: bool = True) -> dict:
    """The config.json of the ViT-MoE output: the source ViT config plus the MoE keys.

    ``classifier`` says whether the source is a ViTForImageClassification (True) or a bare
    ViTModel (False); None reads it from the source ``architectures``. ``pooler`` says
    whether a bare ViTModel source has pooler weights (ViTMoeModel then builds one).
    """
    if source_config.get("model_type") != "vit":
        raise PacerError(f"ViT-MoE export: source model_type is "
                         f"{source_config.get('model_type')!r}, expected 'vit'; {DENSE_HINT}")
    layers = source_config.get("num_hidden_layers", 12)  # ViTConfig's default
    if layers != layout.num_layers:
        raise PacerError(f"ViT-MoE export: config.json num_hidden_layers {layers!r} differs "
                         f"from the layout's {layout.num_layers}")
    if classifier is None:
        classifier = _has_classifier(source_config.get("architectures") or [])
    config = {k: v for k, v in source_config.items() if k not in DROPPED_KEYS}
    config.update({
        "architectures": ["ViTMoeForImageClassification" if classifier else "ViTMoeModel"],
        "model_type": "vit_moe",
        "auto_map": dict(AUTO_MAP),
        "moe_layers": list(layout.upcycled),
        "num_experts": layout.num_experts,
        "num_experts_per_tok": layout.top_k,
        "tome_r": layout.tome_r,
        "tome_unmerge": False,
    })
    if not classifier:
        config["add_pooling_layer"] = pooler
    return config


def _has_classifier(architectures: list[str]) -> bool:
    """True for ViTForImageClassification, False for ViTModel; refuse anything else."""
    if architectures and all(a.endswith("ForImageClassification") for a in architectures):
        return True
    if architectures and all(a == "ViTModel" for a in architectures):
        return False
    raise PacerError(f"ViT-MoE export: source architectures {architectures} are neither "
                     f"ViTForImageClassification nor ViTModel; pass classifier=True/False "
                     f"if the weights are one of them, else {DENSE_HINT}")


def write_modeling(out_dir: Path) -> None:
    """Copy the standalone ViT-MoE code (config, token merging, model) into the output folder."""
    for name in MODELING_FILES:
        write_atomic(Path(out_dir) / name, Path(__file__).with_name(name).read_bytes())


# -- output tensors --------------------------------------------------------------


def vit_moe_recipes(layout: VitMoeLayout, tensors: dict[str, tuple[str, tuple[int, ...]]],
                    classifier: bool | None = None) -> list[OutRecipe]:
    """Output tensors in the order given by ``tensors`` (source name -> (dtype, shape),
    insertion order = file order).

    Source names may use either ViT spelling (saved ``encoder.layer.{i}....`` or in-memory
    ``layers.{i}....``, with or without ``vit.``); output names are always the saved
    spelling, ``vit.``-prefixed when there is a classifier (``classifier`` None: when a
    ``classifier.*`` tensor is among the sources). An upcycled block's fc1/fc2 weight and
    bias are each replaced, at their position, by M expert copies (kind "expert", same
    dtype/shape); the block's router (kind "router", dtype of its fc1 weight, [M, hidden])
    comes right after its last MLP tensor; every other tensor is kind "source".
    """
    if classifier is None:
        classifier = any(_strip_vit(n) in CLASSIFIER_TENSORS for n in tensors)
    prefix = "vit." if classifier else ""
    parsed = {name: _parse(name, prefix, classifier) for name in tensors}
    _check_tensors(layout, parsed)
    last_mlp = {layer: name for name, (layer, module, _, _) in parsed.items()
                if layer in layout.upcycled and module in MLP_MODULES}
    out: list[OutRecipe] = []
    for name, (dtype, shape) in tensors.items():
        layer, module, param, out_name = parsed[name]
        if layer in layout.upcycled and module in MLP_MODULES:
            block = f"{prefix}encoder.layer.{layer}.moe."
            out += [OutRecipe(f"{block}experts.{e}.{MLP_MODULES[module]}.{param}", dtype, shape,
                              "expert", name, layer, e) for e in range(layout.num_experts)]
        else:
            out.append(OutRecipe(out_name, dtype, shape, "source", name))
        if last_mlp.get(layer) == name:
            out.append(_router(layout, layer, tensors, parsed, prefix))
    return out


def _strip_vit(name: str) -> str:
    return name[len("vit."):] if name.startswith("vit.") else name


def _parse(name: str, prefix: str,
           classifier: bool) -> tuple[int | None, str | None, str | None, str]:
    """(block, saved module name, weight/bias, output name); blocks None outside them."""
    found = _BLOCK.fullmatch(name)
    if found:
        layer, module, param = int(found.group(1)), found.group(2), found.group(3)
        module = MEMORY_TO_SAVED.get(module, module)
        if module not in SAVED_BLOCK_MODULES:
            raise PacerError(f"ViT-MoE export: unknown ViT block tensor {name!r}; only "
                             f"standard ViT blocks can be upcycled; {DENSE_HINT}")
        return layer, module, param, f"{prefix}encoder.layer.{layer}.{module}.{param}"
    bare = _strip_vit(name)
    if bare in CLASSIFIER_TENSORS:
        return None, None, None, bare
    if bare in POOLER_TENSORS and classifier:
        raise PacerError(f"ViT-MoE export: tensor {name!r} is a pooler, which "
                         f"ViTMoeForImageClassification does not have (neither has "
                         f"ViTForImageClassification); {DENSE_HINT}")
    if bare in BACKBONE_TENSORS | POOLER_TENSORS:
        return None, None, None, prefix + bare
    raise PacerError(f"ViT-MoE export: tensor {name!r} has no place in a ViT-MoE (not a "
                     f"ViTModel / ViTForImageClassification weight); {DENSE_HINT}")


def _check_tensors(layout: VitMoeLayout, parsed: dict[str, tuple]) -> None:
    """Refuse duplicate outputs and upcycled blocks without a whole MLP."""
    seen: dict[str, str] = {}
    for name, (_, _, _, out_name) in parsed.items():
        if out_name in seen:
            raise PacerError(f"ViT-MoE export: tensors {seen[out_name]!r} and {name!r} are the "
                             f"same weight in two spellings; keep one")
        seen[out_name] = name
    wanted = {(m, p) for m in MLP_MODULES for p in ("weight", "bias")}
    for layer in layout.upcycled:
        found = {(m, p) for (i, m, p, _) in parsed.values() if i == layer}
        missing = sorted(f"{m}.{p}" for m, p in wanted - found)
        if missing:
            raise PacerError(f"ViT-MoE export: block {layer} lacks MLP tensors {missing}; "
                             f"cannot upcycle it")


def _router(layout: VitMoeLayout, layer: int, tensors: dict, parsed: dict,
            prefix: str) -> OutRecipe:
    """The router [M, hidden] of an upcycled block, in the dtype of its fc1 weight."""
    fc1 = next(n for n, (i, m, p, _) in parsed.items()
               if i == layer and m == "intermediate.dense" and p == "weight")
    dtype, (_, hidden) = tensors[fc1]
    return OutRecipe(f"{prefix}encoder.layer.{layer}.moe.gate.weight", dtype,
                     (layout.num_experts, hidden), "router", layer=layer)
