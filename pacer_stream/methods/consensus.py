"""Consensus and interference (PACER phase 2), streamed one slice at a time.

For one block part (its MLP: gate+up+down together; or its attention), with the
N aligned models' weights θ_k flattened into vectors, the consensus is their mean
θ_c and Δ_k = θ_k − θ_c. Everything the engine needs about the block follows from
a few sums that can be accumulated slice by slice, in fp64:

    C_ij = <Δ_i, Δ_j>      the centered Gram matrix (N × N)
    c2   = ‖θ_c‖²
    T_ij = <τ_i, τ_j>      with a base model, τ_k = θ_k − θ_base

Interference, base-free (the default, PACER has no base)::

    I = sqrt( mean_k ‖Δ_k‖² / mean_k ‖θ_k‖² ) = sqrt( tr(C)/N / (c2 + tr(C)/N) )

the share of the models' (RMS) weight norm that the consensus does not carry,
because mean_k ‖θ_k‖² = ‖θ_c‖² + mean_k ‖Δ_k‖². It is 0 when the models are
identical, 1 when they cancel out completely, and does not change when every
weight is scaled: a scale-free measure of disagreement around the consensus.
(The seed's 1 − ‖Σ Δ_k‖ / Σ ‖Δ_k‖ is always 1 because Σ Δ_k = 0.)

With a base model the seed's formula is meaningful on task vectors::

    I_base = 1 − ‖Σ_k τ_k‖ / Σ_k ‖τ_k‖ = 1 − sqrt(Σ_ij T_ij) / Σ_k sqrt(T_kk)

The cosine similarity of deviations, C_ij / sqrt(C_ii C_jj), drives the expert
clustering (:mod:`.upcycle`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GRAM_CHUNK = 1 << 20  # elements per model cast to fp64 at once (8 MiB each)


def part_of(role: str) -> str | None:
    """Which block part a tensor role belongs to: "mlp", "attn" or None (norms)."""
    if role.endswith("norm") or ".norm" in role:
        return None
    head = role.split(".")[0]
    return head if head in ("mlp", "attn") else None


@dataclass
class PartStats:
    """The accumulated sums of one block part over its tensors (JSON-friendly)."""

    n: int
    numel: int = 0
    consensus_sq: float = 0.0
    centered_gram: list[list[float]] = field(default_factory=list)
    consensus_dot: list[float] = field(default_factory=list)  # <θ_c, Δ_k>
    base_gram: list[list[float]] | None = None

    def __post_init__(self) -> None:
        if not self.centered_gram:
            self.centered_gram = [[0.0] * self.n for _ in range(self.n)]
            self.consensus_dot = [0.0] * self.n

    def add(self, x: torch.Tensor, base: torch.Tensor | None = None) -> None:
        """Accumulate one slice: ``x`` [N, ...] fp32 (left unchanged), ``base`` [...] or None."""
        n = x.shape[0]
        flat = x.reshape(n, -1)
        gram = torch.zeros(n, n, dtype=torch.float64)
        dot = torch.zeros(n, dtype=torch.float64)
        base_gram = torch.zeros(n, n, dtype=torch.float64) if base is not None else None
        csq = 0.0
        for start in range(0, flat.shape[1], GRAM_CHUNK):
            part = flat[:, start:start + GRAM_CHUNK].double()
            c = part.mean(0)  # in fp64: identical models give exactly zero deviations
            if base_gram is not None:
                tau = part - base.reshape(-1)[start:start + GRAM_CHUNK].double()
                base_gram += (tau @ tau.T).cpu()
            part -= c
            gram += (part @ part.T).cpu()
            dot += (part @ c).cpu()
            csq += float(c @ c)
        self.numel += flat.shape[1]
        self.consensus_sq += csq
        self.centered_gram = (torch.tensor(self.centered_gram, dtype=torch.float64) + gram).tolist()
        self.consensus_dot = (torch.tensor(self.consensus_dot, dtype=torch.float64) + dot).tolist()
        if base_gram is not None:
            old = torch.tensor(self.base_gram or [[0.0] * n] * n, dtype=torch.float64)
            self.base_gram = (old + base_gram).tolist()

    # -- what follows from the sums -----------------------------------------------------

    @property
    def spread(self) -> float:
        """RMS distance of the models to the consensus, sqrt(mean_k ‖Δ_k‖²)."""
        return math.sqrt(max(sum(self.centered_gram[k][k] for k in range(self.n)) / self.n, 0.0))

    @property
    def interference(self) -> float:
        """Base-free interference I (module docstring): 0 identical, 1 cancelling."""
        s2 = self.spread ** 2
        total = self.consensus_sq + s2
        return math.sqrt(s2 / total) if total > 0 else 0.0

    @property
    def base_interference(self) -> float | None:
        """The seed's formula on task vectors, when a base model was given."""
        if self.base_gram is None:
            return None
        norms = sum(math.sqrt(max(self.base_gram[k][k], 0.0)) for k in range(self.n))
        summed = math.sqrt(max(sum(map(sum, self.base_gram)), 0.0))
        return 1.0 - summed / norms if norms > 0 else 0.0

    def metric(self) -> float:
        """The interference the upcycling policy uses: base-relative if a base was given."""
        based = self.base_interference
        return based if based is not None else self.interference

    def distances(self) -> list[float]:
        """Each model's distance to the consensus, relative to ‖θ_c‖."""
        scale = math.sqrt(self.consensus_sq) or 1.0
        return [math.sqrt(max(self.centered_gram[k][k], 0.0)) / scale for k in range(self.n)]

    def deviation_cosines(self) -> list[list[float]]:
        """cos(Δ_i, Δ_j); a zero deviation has cosine 0 with everything but itself."""
        g = self.centered_gram
        out = []
        for i in range(self.n):
            row = []
            for j in range(self.n):
                denom = math.sqrt(max(g[i][i], 0.0) * max(g[j][j], 0.0))
                row.append(1.0 if i == j else (g[i][j] / denom if denom > 0 else 0.0))
            out.append(row)
        return out

    def model_gram(self) -> list[list[float]]:
        """<θ_i, θ_j> = ‖θ_c‖² + <θ_c, Δ_i> + <θ_c, Δ_j> + C_ij."""
        c2, d, g = self.consensus_sq, self.consensus_dot, self.centered_gram
        return [[c2 + d[i] + d[j] + g[i][j] for j in range(self.n)] for i in range(self.n)]

    def summary(self) -> dict:
        """The derived figures, for reports."""
        return {"interference": self.interference, "base_interference": self.base_interference,
                "distance_to_consensus": self.distances(), "numel": self.numel}

    def to_json(self) -> dict:
        return {"n": self.n, "numel": self.numel, "consensus_sq": self.consensus_sq,
                "centered_gram": self.centered_gram, "consensus_dot": self.consensus_dot,
                "base_gram": self.base_gram}

    @classmethod
    def from_json(cls, data: dict) -> "PartStats":
        return cls(**data)


def model_similarity(parts: list[PartStats]) -> list[list[float]]:
    """Cosine similarity between whole models, over all the given parts."""
    if not parts:
        return []
    n = parts[0].n
    total = [[0.0] * n for _ in range(n)]
    for part in parts:
        gram = part.model_gram()
        for i in range(n):
            for j in range(n):
                total[i][j] += gram[i][j]
    return [[total[i][j] / math.sqrt(total[i][i] * total[j][j])
             if total[i][i] > 0 and total[j][j] > 0 else 0.0 for j in range(n)] for i in range(n)]
