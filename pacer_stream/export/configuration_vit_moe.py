"""The ViT-MoE configuration: a ViTConfig plus the upcycled blocks, routing and ToMe.

One of the three files pacer-stream copies verbatim into an upcycled ViT's output folder
(with ``modeling_vit_moe.py`` and ``token_merging_vit_moe.py``); config.json's
``auto_map`` names this class for AutoConfig. It imports only transformers.
"""

from transformers import ViTConfig


class ViTMoeConfig(ViTConfig):
    """A ViTConfig plus the upcycled blocks, their routing, and token merging."""

    model_type = "vit_moe"
    moe_layers: list[int] | tuple[int, ...] = ()  # block indices whose MLP is an MoE
    num_experts: int = 2  # M, experts per MoE block
    num_experts_per_tok: int = 1  # top_k
    tome_r: int = 0  # tokens merged away per block; 0 = no merging
    tome_unmerge: bool = False  # gather the final tokens back to the input length
    add_pooling_layer: bool = True  # ViTMoeModel only: build the pooler (as ViTModel does)
    # "linear": the gate matrix (PACER's prototype router). "deviation_norm": the seed's
    # per-input router R_m(x) = ||Delta_m x||, Delta_m = fc1 of expert m minus the consensus
    # fc1 (the size-weighted mean of the experts); logits R_m(x) / router_temperature.
    router_mode: str = "linear"
    router_temperature: float = 1.0
    expert_sizes: dict | None = None  # str(block) -> models per expert (the consensus weights)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.moe_layers = [int(i) for i in self.moe_layers]
        layers = self.moe_layers
        out_of_range = any(not 0 <= i < self.num_hidden_layers for i in layers)
        if layers != sorted(set(layers)) or out_of_range:
            raise ValueError(f"moe_layers must be sorted unique block indices below "
                             f"num_hidden_layers={self.num_hidden_layers}, got {layers}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be between 1 and num_experts "
                             f"({self.num_experts}), got {self.num_experts_per_tok}")
        if self.tome_r < 0:
            raise ValueError(f"tome_r must be >= 0 (0 turns merging off), got {self.tome_r}")
        if self.router_mode not in ("linear", "deviation_norm"):
            raise ValueError(f"router_mode must be 'linear' or 'deviation_norm', got "
                             f"{self.router_mode!r}")
        if self.router_temperature <= 0:
            raise ValueError(f"router_temperature must be positive, got {self.router_temperature}")


__all__ = ["ViTMoeConfig"]
