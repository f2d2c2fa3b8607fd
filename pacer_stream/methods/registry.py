"""Which class merges a tensor for each method: one factory the executor calls.

Every class has dense.TensorMerge's protocol (``passes``, ``split``, ``observe``,
``merge``); the method table itself is dense.METHODS (its
``family`` names the module here).
"""

from __future__ import annotations

import torch

from .dense import MethodParams, TensorMerge
from .model_stock import ModelStock
from .passthrough import Passthrough
from .spherical import Karcher, MultiSlerp, NuSlerp, Slerp

CLASSES = {"slerp": Slerp, "nuslerp": NuSlerp, "multislerp": MultiSlerp, "karcher": Karcher,
           "model_stock": ModelStock, "passthrough": Passthrough}


def tensor_merge(name: str, shape: tuple[int, ...], params: MethodParams,
                 row_weights: torch.Tensor | None = None, base_index: int | None = None):
    """The merge of one tensor. ``base_index``: where the base model also sits among the
    models (mergekit lets a plan list it there), None when it is not listed."""
    method = params.method
    if method.family == "dense":
        return TensorMerge(name, shape, params, row_weights)
    return CLASSES[method.name](name, shape, params, base_index)


def listed_base(config) -> int | None:
    """The position of the plan's base_model among its models, if it is listed there."""
    base = config.base_model
    if base is None:
        return None
    key = (base.path, base.repo_id, base.revision)
    return next((i for i, e in enumerate(config.models)
                 if (e.ref.path, e.ref.repo_id, e.ref.revision) == key), None)
