"""passthrough: one model's tensors, optionally scaled (mergekit's ``passthrough``).

out = scale * X (X itself when no ``scale`` is given). With slices this is mergekit's
frankenmerge tool; here it is only the method (one model, every tensor).
"""

from __future__ import annotations

import torch


class Passthrough:
    """The protocol of dense.TensorMerge, with no observation pass."""

    passes: list[str] = []

    def __init__(self, name: str, shape: tuple[int, ...], params, base_index=None) -> None:
        self.name, self.scale = name, params.scales[0] if params.scales else None

    def split(self, x: torch.Tensor, base: torch.Tensor | None):
        return None, x

    def observe(self, pass_name: str, rows: tuple[int, int], x: torch.Tensor) -> None:
        pass

    def merge(self, rows: tuple[int, int], offset, x: torch.Tensor) -> torch.Tensor:
        return x[0] if self.scale is None else x[0].mul_(float(self.scale))
