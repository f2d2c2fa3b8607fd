"""Interference-aware upcycling (PACER phase 3): which MLP blocks become experts, and how.

The policy ranks the MLP blocks by interference (:mod:`.consensus`) and upcycles:

* threshold mode (default): every block whose interference exceeds γ
  (``interference_threshold``);
* budget mode: the most conflicting blocks first, either the top
  ``round(upcycle_fraction · L)`` of them, or, with ``max_param_growth``, as many
  blocks as fit at the largest expert count M that buys at least one
  (:func:`_best_within_budget`). γ is not used then;
  a block whose models are identical (interference 0) is never upcycled.

Experts. In each upcycled block the N aligned MLP blocks are clustered by the
cosine similarity of their deviations from the consensus (average linkage), and
each cluster's mean MLP is one expert. The export format needs one expert count
M for the whole model, so M is decided globally: every upcycled block is cut at
``expert_distance`` (clusters whose average cosine distance 1 − cos is below it
are joined), M is the largest cluster count found (at most ``max_experts``), and
then every upcycled block is clustered into exactly M clusters. If M comes out
as 1 (the models agree on the direction of their differences) nothing is
upcycled. Clusters are numbered by their lowest model index, so expert 0 always
holds the first model.

Router. The gate rows are fitted by the calibration stage (pacer_stream/calibration.py,
methods/gate.py): to sample lines of each model (few-shot) or to the sequences each model
generates (data-free, pacer_stream/self_samples.py). Where neither can run (a ViT without
samples, the ViT-MoE's per-input router) the fallback is the
first, weight-only prototype router: for expert m with mean MLP E_m and consensus θ_c,
p_m = normalize(Σ_rows |E_m − θ_c| over gate_proj and up_proj) ∈ R^d, row m = p_m / τ.
It hardly routes (p_m is a positive vector, so x·p_m barely depends on what x is
about); the report names the router used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .consensus import PartStats


@dataclass(frozen=True)
class UpcyclePolicy:
    """The plan's ``pacer`` upcycling options."""

    threshold: float = 0.35
    max_param_growth: float | None = None
    upcycle_fraction: float | None = None
    max_experts: int | None = None
    expert_distance: float = 1.0
    top_k: int = 2

    @classmethod
    def from_pacer(cls, pacer: dict) -> "UpcyclePolicy":
        return cls(pacer["interference_threshold"], pacer["max_param_growth"],
                   pacer["upcycle_fraction"], pacer["max_experts"], pacer["expert_distance"],
                   pacer["top_k_experts"])

    @property
    def mode(self) -> str:
        if self.max_param_growth is not None:
            return "max_param_growth"
        return "upcycle_fraction" if self.upcycle_fraction is not None else "threshold"


@dataclass
class Decision:
    """The outcome: which blocks, how many experts, which model goes to which expert."""

    mode: str
    ranking: list[int]  # layers, most conflicting first
    blocks: list[int] = field(default_factory=list)
    num_experts: int = 1
    top_k: int = 1
    clusters: dict[int, list[int]] = field(default_factory=dict)  # layer -> expert per model
    note: str = ""

    @property
    def upcycles(self) -> bool:
        return bool(self.blocks) and self.num_experts > 1

    def to_json(self) -> dict:
        return {"mode": self.mode, "ranking": self.ranking, "blocks": self.blocks,
                "num_experts": self.num_experts, "top_k": self.top_k,
                "clusters": {str(k): v for k, v in self.clusters.items()}, "note": self.note}

    @classmethod
    def from_json(cls, data: dict) -> "Decision":
        data = dict(data)
        data["clusters"] = {int(k): list(v) for k, v in data["clusters"].items()}
        return cls(**data)


def cluster(cosines: list[list[float]], count: int | None = None,
            distance: float | None = None) -> list[int]:
    """Average-linkage agglomerative clustering on 1 − cos; a cluster label per model.

    Joins the closest pair of clusters (ties: the pair with the lowest indices)
    until ``count`` clusters remain or the closest pair is at least ``distance``
    apart. Labels are numbered by each cluster's lowest member.
    """
    n = len(cosines)
    groups = [[i] for i in range(n)]

    def gap(a: list[int], b: list[int]) -> float:
        return sum(1.0 - cosines[i][j] for i in a for j in b) / (len(a) * len(b))

    while len(groups) > max(count or 1, 1):
        pairs = [(gap(groups[a], groups[b]), a, b)
                 for a in range(len(groups)) for b in range(a + 1, len(groups))]
        best, a, b = min(pairs)
        if count is None and distance is not None and best >= distance:
            break
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    groups.sort(key=min)
    labels = [0] * n
    for label, members in enumerate(groups):
        for i in members:
            labels[i] = label
    return labels


def decide(mlp: dict[int, PartStats], policy: UpcyclePolicy,
           growth_of: Callable[[list[int], int], float]) -> Decision:
    """Choose the blocks to upcycle and the experts of each.

    ``mlp`` maps a layer to its MLP statistics; ``growth_of(blocks, M)`` gives the
    output's parameter count over the source's for that choice (from the export
    layout, so the cap is checked against exactly what would be written).
    """
    ranking = sorted(mlp, key=lambda layer: (-mlp[layer].metric(), layer))
    decision = Decision(policy.mode, ranking, top_k=policy.top_k)
    conflicting = [layer for layer in ranking if mlp[layer].metric() > 0]
    if policy.mode == "threshold":
        chosen = [layer for layer in ranking if mlp[layer].metric() > policy.threshold]
    elif policy.mode == "upcycle_fraction":
        chosen = conflicting[:round(policy.upcycle_fraction * len(mlp))]
    else:
        chosen, m = _best_within_budget(conflicting, mlp, policy, growth_of)
    if not chosen:
        decision.note = f"no MLP block selected ({policy.mode})"
        return decision
    if policy.mode != "max_param_growth":
        m = _experts(chosen, mlp, policy)
    if m < 2:
        decision.note = ("the selected blocks' models fall into one cluster at expert_distance "
                         f"{policy.expert_distance}; merged dense")
        return decision
    decision.blocks = sorted(chosen)
    decision.num_experts = m
    decision.top_k = min(policy.top_k, m)
    decision.clusters = {layer: cluster(mlp[layer].deviation_cosines(), count=m)
                         for layer in decision.blocks}
    return decision


def _best_within_budget(ranking: list[int], mlp: dict[int, PartStats], policy: UpcyclePolicy,
                        growth_of: Callable[[list[int], int], float]) -> tuple[list[int], int]:
    """Budget mode: the largest expert count M, from the natural count down to 2, at which
    the most conflicting block fits ``max_param_growth``; then as many blocks, most
    conflicting first, as fit at that M. A budget too small for one block at M = N buys one
    at a smaller M, not nothing.

    More experts per block before more blocks, because merging two domains' MLPs into one
    expert loses most of both: on benchmarks/quality set B at 1.32x, one block with M = 3
    kept 0.193 mean retention, two blocks with M = 2 0.146 (the dense path alone 0.141);
    with every MLP upcycled on set A, M = 2 / 3 / 4 kept -0.165 / -0.094 / -0.047. (The
    first rule here maximised the deviation energy the experts restore, which prefers the
    two blocks at M = 2.)"""
    if not ranking:
        return [], 1
    for m in range(_experts(ranking, mlp, policy), 1, -1):
        chosen: list[int] = []
        for layer in ranking:  # growth only rises with more blocks, so stop at the cap
            if growth_of(sorted(chosen + [layer]), m) > policy.max_param_growth:
                break
            chosen.append(layer)
        if chosen:
            return chosen, m
    return [], 1


def _experts(blocks: list[int], mlp: dict[int, PartStats], policy: UpcyclePolicy) -> int:
    """The global expert count M for these blocks (module docstring)."""
    natural = max(len(set(cluster(mlp[b].deviation_cosines(), distance=policy.expert_distance)))
                  for b in blocks)
    cap = policy.max_experts or natural
    return min(natural, cap)


def expert_means(x: torch.Tensor, labels: list[int], m: int) -> list[torch.Tensor]:
    """The mean of each cluster's copies; ``x`` is [N, ...] fp32."""
    out = []
    for e in range(m):
        members = [k for k, label in enumerate(labels) if label == e]
        mean = x[members[0]].clone()  # summed one copy at a time: no [members, ...] temporary
        for k in members[1:]:
            mean += x[k]
        out.append(mean.div_(len(members)))
    return out


def router_rows(prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Router weight [M, d] from the accumulated Σ_rows |E_m − θ_c| (fp64)."""
    norms = prototypes.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (prototypes / norms / temperature).float()
