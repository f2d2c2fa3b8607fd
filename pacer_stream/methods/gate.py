"""The MoE router's gate rows, from the activations of sample tokens.

Every router pacer-stream writes is a stock linear gate: W [M, d], logits = W u for the
MLP input u of a token (the normed hidden state), softmax, top-k. What differs is where
the rows come from; this module holds the math, :mod:`pacer_stream.calibration` the
stage that produces the activations.

Fitted gate (a linear discriminant). The calibration tokens' MLP inputs u_t come with a
label y_t, the expert that holds the model whose sample the token belongs to. With the
tokens weighted so that every expert counts equally::

    μ_e = weighted mean of u_t over y_t = e              class means
    μ̄  = mean_e μ_e
    S   = (1 − α) Σ_w + α (tr Σ_w / d) I,  α = 0.1       pooled within-class covariance, shrunk
    W_e = c · S⁻¹ (μ_e − μ̄)

and the scale c > 0 minimises the balanced cross-entropy of softmax(W u) on the
calibration tokens (a golden-section search over log c, fixed steps).

A stock gate has no bias, but the discriminant has one, b_e = −½ μ_eᵀS⁻¹μ_e (with
W_e = S⁻¹μ_e): without it the boundary between two experts passes through the origin
instead of between their means. Hidden states usually have a direction along which
every token has almost the same value (massive activations, the norm's weights), so the
bias is folded into the rows through it: with a the least-squares solution of aᵀu_t ≈ 1
over the tokens (ridge 1e-6 · tr), W_e ← W_e + b_e a. The fit keeps whichever of the
folded and the centred rows W_e = S⁻¹(μ_e − μ̄) has the lower cross-entropy after
scaling. Class means alone (S = I) are the alternative it was measured against
(``fit_gate(..., whiten=False)``).

Everything runs in float64 on the CPU with fixed step counts, so the rows are the same
bits on every run, budget and device.
"""

from __future__ import annotations

import math

import torch

SHRINKAGE = 0.1
RIDGE = 1e-6
SCALE_STEPS = 40  # golden-section steps over log c
LOG_SCALE_RANGE = (-12.0, 6.0)  # c from ~6e-6 to ~400 (u has norm ~sqrt(d) after RMSNorm)


def class_weights(labels: torch.Tensor, m: int) -> torch.Tensor:
    """Per-token weights that give every expert the same total weight (1/M)."""
    counts = torch.bincount(labels, minlength=m).double()
    if (counts == 0).any():
        missing = [e for e in range(m) if counts[e] == 0]
        raise ValueError(f"no calibration tokens for expert(s) {missing}")
    return (1.0 / (counts[labels] * m))


def discriminant(u: torch.Tensor, labels: torch.Tensor, m: int,
                 whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The centred rows S⁻¹(μ_e − μ̄) [M, d] and the discriminant's bias b_e [M], which
    belongs to the uncentred rows S⁻¹μ_e (module docstring)."""
    u = u.double()
    w = class_weights(labels, m)
    means = torch.stack([(u[labels == e] * w[labels == e, None]).sum(0) * m for e in range(m)])
    solve = lambda v: v  # noqa: E731  (class means alone: S = I)
    if whiten:
        centred = u - means[labels]
        cov = (centred * w[:, None]).T @ centred  # the weights sum to 1
        d = u.shape[1]
        if torch.trace(cov) > 0:  # else every token of a class is the same: nothing to whiten
            shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * (torch.trace(cov) / d) * torch.eye(
                d, dtype=cov.dtype)
            solve = lambda v: torch.linalg.solve(shrunk, v.T).T  # noqa: E731
    rows = solve(means)
    bias = -0.5 * (rows * means).sum(1)
    return rows - rows.mean(0), bias


def constant_direction(u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """a with aᵀu_t ≈ 1 for every token (weighted least squares, a tiny ridge)."""
    u = u.double()
    gram = (u * weights[:, None]).T @ u
    ridge = RIDGE * torch.trace(gram) / u.shape[1] + 1e-300
    return torch.linalg.solve(gram + ridge * torch.eye(u.shape[1], dtype=u.dtype),
                              (u * weights[:, None]).sum(0))


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Σ_t w_t · (−log softmax(logits_t)[y_t])."""
    logp = torch.log_softmax(logits, dim=1)
    return float(-(weights * logp[torch.arange(len(labels)), labels]).sum())


def fit_scale(raw: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """The c minimising the balanced cross-entropy of c · raw (golden section on log c)."""
    lo, hi = LOG_SCALE_RANGE
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_c: float) -> float:
        return balanced_cross_entropy(raw * math.exp(log_c), labels, weights)

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(SCALE_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def fit_gate(u: torch.Tensor, labels: torch.Tensor, m: int, whiten: bool = True) -> torch.Tensor:
    """Gate rows W [M, d] (float64) from MLP inputs ``u`` [n, d] and expert ``labels`` [n]."""
    weights = class_weights(labels, m)
    centred, bias = discriminant(u, labels, m, whiten)
    u = u.double()
    best, best_loss = centred, math.inf
    # the uncentred rows with the bias folded in (equal up to what all experts share)
    folded = centred + (bias - bias.mean())[:, None] * constant_direction(u, weights)[None, :]
    for rows in (centred, folded):
        raw = u @ rows.T
        scale = fit_scale(raw, labels, weights)
        loss = balanced_cross_entropy(raw * scale, labels, weights)
        if loss < best_loss - 1e-12:
            best, best_loss = rows * scale, loss
    return best


def routing_accuracy(gate: torch.Tensor, u: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of tokens whose highest gate logit is their own expert, experts weighted equally."""
    if len(labels) == 0:
        return float("nan")
    m = gate.shape[0]
    hit = ((u.double() @ gate.double().T).argmax(1) == labels).double()
    present = [e for e in range(m) if (labels == e).any()]
    return float(sum(hit[labels == e].mean() for e in present) / len(present))
