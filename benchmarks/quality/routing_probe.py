"""How well a PACER MoE output routes: measured here, on the held-out eval data.

In an upcycled block, expert m is the mean of a cluster of source models, and
`pacer_report.json` says which cluster each model went to (`decision.clusters`: layer ->
expert per model). A token of domain d is routed right in that layer when the gate's top-1
expert is the cluster holding d's expert model. The gate is read where the MoE layer reads it:
a pre-hook on each `...mlp.gate` (qwen2_moe) or `...moe.gate` (ViT-MoE) captures its input x,
and the top-1 expert is argmax(x Wᵀ + b) — softmax and top-k do not move the argmax.

This is independent of the engine's own report (which measures on held-out router samples):
the eval items were never shown to the router.
"""

from __future__ import annotations

import re

import torch

GATE_NAME = re.compile(r"(?:layers|layer)\.(\d+)\.(?:mlp|moe)\.gate$")


def gates(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> its MoE gate module (a [M, d] weight)."""
    found = {}
    for name, module in model.named_modules():
        match = GATE_NAME.search(name)
        weight = getattr(module, "weight", None)
        if match and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            found[int(match.group(1))] = module
    return found


@torch.no_grad()
def top1_experts(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                 mask: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Layer -> the gate's top-1 expert for every real token of one forward pass."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for layer, gate in gates(model).items():
        def grab(module, args, layer=layer):
            captured[layer] = args[0].detach()
        hooks.append(gate.register_forward_pre_hook(grab))
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for layer, x in captured.items():
        gate = gates(model)[layer]
        x = x.reshape(-1, x.shape[-1]).float()
        logits = x @ gate.weight.float().T
        if getattr(gate, "bias", None) is not None:
            logits = logits + gate.bias.float()
        choice = logits.argmax(-1)
        if mask is not None:  # drop padding (hidden states are [B, T, d] or [B*T, d])
            choice = choice[mask.reshape(-1).bool()]
        out[layer] = choice
    return out


def routing_accuracy(model: torch.nn.Module, task, clusters: dict[str, list[int]]
                     ) -> dict[str, float]:
    """Per upcycled layer: the share of eval tokens sent to their domain's expert.

    Domains count equally (the mean over domains of each domain's token share).
    """
    if not gates(model) or not clusters:
        return {}
    per_layer: dict[int, list[float]] = {}
    for k, domain in enumerate(task.domains):
        right: dict[int, int] = {}
        total: dict[int, int] = {}
        for inputs, mask in task.probe_batches(domain):
            for layer, choice in top1_experts(model, inputs, mask).items():
                target = clusters[str(layer)][k]
                right[layer] = right.get(layer, 0) + int((choice == target).sum())
                total[layer] = total.get(layer, 0) + choice.numel()
        for layer in right:
            per_layer.setdefault(layer, []).append(right[layer] / max(total[layer], 1))
    return {str(layer): sum(v) / len(v) for layer, v in sorted(per_layer.items())}
