"""Spherical merges: slerp, nuslerp, multislerp, karcher (mergekit 0.1.5's semantics).

Each result is a combination sum_k c_k v_k of its vectors (models, or task vectors
v_k = X_k - B around a base), so the coefficients come from the vectors' Gram matrix
G, accumulated over the row slices first (gram.py) — the same bytes at any budget.
With n_k = sqrt(G_kk), cos = G_01 / (n_0 n_1), theta = arccos(cos):

* slerp (two models, one the base B, the other X; ``t``, t = 0 gives B)::

      out = sin((1 - t) theta) / sin(theta) * B + sin(t theta) / sin(theta) * X

  on the raw models, whole tensors; |cos| > 0.9995 (mergekit's DOT_THRESHOLD) falls
  back to (1 - t) B + t X; a norm <= 1e-8 counts as 1.
* nuslerp (two models, base optional; ``weight``s w_0, w_1, t = w_1 / (w_0 + w_1), 0.5
  when the sum is 0; on task vectors around a base, added back)::

      out = (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta)

  norms clamped at 1e-7; (1 - cos^2) <= 1e-16 falls back to (1 - t) v_0 + t v_1. One
  angle for the whole tensor (``nuslerp_flatten``, the default), else one per row
  (vectors along the last axis), or one per column with ``nuslerp_row_wise``
  (mergekit's dim 0).
* multislerp (N models, base optional; ``weight``, ``normalize_weights``, ``eps``)::

      u_k = v_k / (n_k + eps),  m = sum_k w_k u_k,  out = (sum_k w_k n_k) m / |m|

  mergekit also projects onto the tangent space at m / |m| and maps back, but the
  weighted tangent vectors sum to zero by construction (sum_k w_k (u_k - (u_k.m̂) m̂) =
  m - |m| m̂ = 0), so that step is the identity; it is left out. |m| < eps: for two
  models the linear w_0 v_0 + w_1 v_1, else an error.
* karcher (N models, no base; ``max_iter``, ``tol``): the Fréchet mean on the unit
  sphere of the u_k = X_k / n_k with equal weights a_k = 1/N, scaled by sum_k a_k n_k;
  mergekit's Riemannian gradient iteration, run on the coefficients: every iterate lies
  in the span of the u_k, so with mu = sum_k c_k u_k every dot product is c^T H from
  H_jk = G_jk / (n_j n_k).
"""

from __future__ import annotations

import math

import torch

from ..errors import PacerError
from .gram import GramMerge, task_vectors

DOT_THRESHOLD = 0.9995  # mergekit's slerp: nearly parallel, interpolate linearly
SLERP_EPS = 1e-8  # a norm at most this counts as 1 (mergekit's slerp)
NUSLERP_NORM_EPS = 1e-7  # norms clamped here (mergekit's nuslerp _normalize)
NUSLERP_EPS = 1e-8  # colinear when 1 - cos^2 <= eps^2


def fp32(value: float) -> float:
    """``value`` rounded to float32, as mergekit holds ``t`` (fp64 from there is exact)."""
    return torch.tensor(value, dtype=torch.float32).item()


class Slerp(GramMerge):
    """slerp: the base and one other model, on the raw weights, one angle per tensor."""

    def point_count(self) -> int:
        return 2

    @property
    def order(self) -> tuple[int, int]:
        """Where the base and the other model sit among the points."""
        return (0, 1) if self.base_index is None else (self.base_index, 1 - self.base_index)

    def points(self, x, base):
        if base is None:
            raise PacerError(f"{self.name}: slerp needs base_model")
        if self.base_index is None:  # models: [other], base_model: B
            return None, torch.stack([base, x[0]])
        return None, x  # models: [B, other] (either order), base_model: B

    def coefficients(self, gram):
        b, o = self.order
        if self.p.t is None:
            raise PacerError(f"{self.name}: slerp has no value of parameters.t for this "
                             "tensor; give t a default ({value: ...}) after its filters")
        t = fp32(self.p.t)
        norm_b, norm_o = gram[:, b, b].sqrt(), gram[:, o, o].sqrt()
        norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1.0)
        norm_o = torch.where(norm_o > SLERP_EPS, norm_o, 1.0)
        dot = (gram[:, b, o] / (norm_b * norm_o)).clamp(-1, 1)
        linear = dot.abs() > DOT_THRESHOLD
        theta = torch.acos(torch.where(linear, 0.0, dot))
        sin = torch.sin(theta)
        coef_b = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin)
        coef_o = torch.where(linear, t, torch.sin(t * theta) / sin)
        out = torch.empty(gram.shape[0], 2, dtype=torch.float64)
        out[:, b], out[:, o] = coef_b, coef_o
        return out


class NuSlerp(GramMerge):
    """nuslerp: two models (task vectors with a base), one angle per tensor/row/column."""

    def mode_for(self, params):
        if params.switch("nuslerp_flatten"):
            return "whole"
        return "columns" if params.switch("nuslerp_row_wise") else "rows"

    def point_count(self) -> int:
        return 2

    def points(self, x, base):
        return base, task_vectors(x, base, self.base_index)

    def coefficients(self, gram):
        w = [w for k, w in enumerate(self.p.weights) if k != self.base_index]
        total = w[0] + w[1]
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        n0 = gram[:, 0, 0].sqrt().clamp_min(NUSLERP_NORM_EPS)
        n1 = gram[:, 1, 1].sqrt().clamp_min(NUSLERP_NORM_EPS)
        cos = (gram[:, 0, 1] / (n0 * n1)).clamp(-1, 1)
        colinear = (1 - cos.square()) <= NUSLERP_EPS ** 2
        theta = torch.acos(torch.where(colinear, 0.0, cos))
        out = torch.empty(gram.shape[0], 3, dtype=torch.float64)
        out[:, 0] = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta))
        out[:, 1] = torch.where(colinear, t, torch.sin(t * theta))
        out[:, 2] = torch.where(colinear, 1.0, torch.sin(theta))  # divides the sum
        return out


class MultiSlerp(GramMerge):
    """multislerp: N models (task vectors with a base), one mean direction per tensor."""

    def point_count(self) -> int:
        return self.n - (self.base_index is not None)

    def points(self, x, base):
        if self.point_count() == 1:  # mergekit returns the one model itself
            keep = 1 if self.base_index == 0 else 0
            return None, x[keep:keep + 1]
        return base, task_vectors(x, base, self.base_index)

    def coefficients(self, gram):
        m = gram.shape[1]
        if m == 1:
            return torch.ones(1, 1, dtype=torch.float64)
        w = torch.tensor([w for k, w in enumerate(self.p.weights) if k != self.base_index],
                         dtype=torch.float64)
        if self.p.switch("normalize_weights"):
            w = w / w.sum()
        eps = float(self.p.switch("eps"))
        g = gram[0]
        norms = g.diagonal().sqrt()
        a = w / (norms + eps)  # mean m = sum_k a_k v_k
        mean_norm = float((a @ g @ a).clamp_min(0).sqrt())
        if mean_norm < eps:
            if m == 2:
                return w.reshape(1, -1)  # mergekit's linear fallback
            raise PacerError(f"{self.name}: multislerp's weighted mean of the unit vectors "
                             "is zero (antipodal models with balancing weights); change the "
                             "weights")
        avg_norm = float((norms * w).sum())
        return (a * (avg_norm / mean_norm)).reshape(1, -1)


class Karcher(GramMerge):
    """karcher: the Fréchet mean on the unit sphere, equal weights, no base."""

    def points(self, x, base):
        return None, x

    def coefficients(self, gram):
        n = gram.shape[1]
        if n == 1:
            return torch.ones(1, 1, dtype=torch.float64)
        max_iter, tol = int(self.p.switch("max_iter")), float(self.p.switch("tol"))
        c = karcher_coefficients(gram[0], max_iter, tol)
        return c.reshape(1, -1)


def karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients c of sum_k c_k X_k = (sum_k n_k / N) * mu, mu the Karcher mean of the
    unit vectors X_k / n_k, from the Gram matrix ``g`` [N, N] (fp64), as mergekit's
    karcher_merge_tensors iterates: start at the normalized weighted mean; each step
    moves along the tangent sum_k a_k theta_k / sin(theta_k) (u_k - cos_k mu) by its
    length (the exponential map), skipping points within ``tol`` of mu, until the
    tangent is shorter than ``tol`` or ``max_iter`` steps."""
    n = g.shape[0]
    norms = g.diagonal().clamp_min(0).sqrt()
    scale = float(norms.sum()) / n  # sum_k a_k n_k over every model, a_k = 1/N
    valid = [k for k in range(n) if float(norms[k]) > tol]
    if not valid:
        return torch.zeros(n, dtype=torch.float64)
    idx = torch.tensor(valid)
    h = g[idx][:, idx] / torch.outer(norms[idx], norms[idx])  # Gram of the unit vectors
    alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

    def length(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ h @ c), 0.0))

    mu = alpha.clone()  # coefficients of mu over the unit vectors
    norm = length(mu)
    mu = torch.eye(len(valid), dtype=torch.float64)[0] if norm < tol else mu / norm
    for _ in range(max_iter):
        dots = (h @ mu).clamp(-1, 1)
        tangent = torch.zeros_like(mu)
        for j in range(len(valid)):
            theta = math.acos(float(dots[j]))
            if theta < tol:
                continue
            step = float(alpha[j]) * theta / math.sin(theta)
            tangent -= step * float(dots[j]) * mu
            tangent[j] += step
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            break
        mu = math.cos(tangent_norm) * mu + math.sin(tangent_norm) * tangent / tangent_norm
        unit = length(mu)
        if unit > tol:
            mu = mu / unit
    out = torch.zeros(n, dtype=torch.float64)
    out[idx] = scale * mu / norms[idx]
    return out
