"""Token merging (ToMe, Bolya et al. 2023) for ViTs at inference time.

    from transformers import ViTForImageClassification
    from pacer_stream.runtime.tome import apply_tome, remove_tome

    model = ViTForImageClassification.from_pretrained(path).eval()
    apply_tome(model, r=16)           # merge 16 tokens per block: 197 -> 5 tokens after 12
    logits = model(pixel_values).logits
    apply_tome(model, r=0)            # off again: bit-identical to the unpatched model

Every block merges its r most similar token pairs (bipartite soft matching on the
attention keys, CLS protected) between attention and MLP, and attention becomes
proportional (log token size added to the logits). A ViT-MoE written by pacer-stream
(``modeling_vit_moe.py``) does the same through ``config.tome_r``; ``apply_tome`` on it
sets that field.

The implementation lives in the standalone files that pacer-stream copies into ViT-MoE
output folders (token_merging_vit_moe.py, and modeling_vit_moe.py for ``apply_tome``), so
exported models and plain ViTs share one code path; this module only re-exports it.
"""

from __future__ import annotations

from ..export.modeling_vit_moe import ToMeViTLayer, apply_tome, remove_tome
from ..export.token_merging_vit_moe import (
    ToMeState,
    bipartite_soft_matching,
    max_merges,
    merge_source,
    merge_wavg,
    proportional_attention,
    tome_block,
    unmerge_tokens,
)

__all__ = [
    "ToMeState", "ToMeViTLayer", "apply_tome", "bipartite_soft_matching", "max_merges",
    "merge_source", "merge_wavg", "proportional_attention", "remove_tome", "tome_block",
    "unmerge_tokens",
]
