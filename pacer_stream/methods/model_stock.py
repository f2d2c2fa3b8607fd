"""Model Stock (Jang et al. 2024, arXiv:2403.19522), with mergekit 0.1.5's semantics.

With the base W_0 and N >= 2 fine-tunes W_k, task vectors d_k = W_k - W_0::

    cos = mean over pairs i < j of  <d_i, d_j> / max(|d_i| |d_j|, 1e-6)  (clamped to [-1, 1])
    t   = N cos / (1 + (N - 1) cos)       (t = 0 where |1 + (N - 1) cos| < 1e-6)
    out = t * mean_k W_k + (1 - t) * W_0  = W_0 + t * mean_k d_k

over the whole tensor, or with ``filter_wise`` per vector along the last axis (a
matrix's rows; a vector is one). The cosines come from the task vectors' Gram matrix
(gram.py), observed over the row slices first when it spans them.
"""

from __future__ import annotations

import torch

from ..errors import PacerError
from .gram import GramMerge, pairs, task_vectors

NORM_FLOOR = 1e-6  # mergekit's clamp of |d_i| |d_j|
SINGULAR = 1e-6  # |denominator| below this keeps the base


class ModelStock(GramMerge):
    """The protocol of dense.TensorMerge (gram.GramMerge): t from the cosines, then
    W_0 + t * mean_k d_k, rounded in fp32 like mergekit's t * mean + (1 - t) * W_0 to a
    few ulp."""

    def mode_for(self, params):
        return "rows" if params.switch("filter_wise") else "whole"

    def point_count(self) -> int:
        return self.n - (self.base_index is not None)

    def points(self, x, base):
        if base is None:
            raise PacerError(f"{self.name}: model_stock needs base_model")
        return base, task_vectors(x, base, self.base_index)

    def coefficients(self, gram):
        n = gram.shape[1]
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # [groups, N]
        cosines = [(gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp_min(NORM_FLOOR))
                   .clamp(-1, 1) for i, j in pairs(n) if i < j]
        cos = torch.stack(cosines).mean(0)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < SINGULAR
        t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
        return (t / n).unsqueeze(1).expand(-1, n)

