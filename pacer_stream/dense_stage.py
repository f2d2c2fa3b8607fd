"""The dense merge of one tensor (every method of methods/registry.py).

Every input's copy of the tensor is read as the budget allows (whole, read ahead, or in
row slices: tensor_reads.py), and each observation pass and then the merge go over row
chunks of what was read (accounting.compute_chunks), widened to fp32 there; merged rows
are cast and written as they come. The method's values are resolved per tensor first
(filters, layer gradients and slices: methods/schedule.py), every tensor's before
anything is written, so a combination that cannot work (weights summing to zero in one
block) stops the run up front.
"""

from __future__ import annotations

import torch

from . import accounting as acct
from .config_schema import PlanConfig
from .errors import PacerError
from .inputs import ModelSet
from .io.header import DTYPES
from .io.writer import ShardWriter
from .methods import schedule
from .methods.dense import MethodParams
from .methods.registry import listed_base, tensor_merge
from .slices import roles
from .tensor_reads import TensorReads, rows_of


class DenseStage:
    """Merges source tensors one at a time into a shard writer."""

    def __init__(self, config: PlanConfig, models: ModelSet, params: MethodParams,
                 reads: TensorReads) -> None:
        self.config, self.models, self.params, self.reads = config, models, params, reads
        self.tensor_params = self._tensor_params()

    def params_for(self, name: str) -> MethodParams:
        """The method's values for one tensor: the plan's filters and layer gradients
        resolved for its name and block (methods/schedule.py)."""
        return self.tensor_params.get(name, self.params)

    def _tensor_params(self) -> dict[str, MethodParams]:
        """Every merged tensor's values when the plan has filters, gradients or slices,
        resolved (and checked, e.g. weights that sum to zero) before anything is written."""
        config = self.config
        if not (config.slices or schedule.varies(config.parameters)
                or any(schedule.varies(e.parameters) for e in config.models)):
            return {}
        out = {}
        for unit in self.models.graph.units:
            models, plan, t = self._settings(unit)
            for name in unit.tensors:
                try:
                    out[name] = MethodParams.resolve(
                        self.params.method.name, [schedule.resolve(m, name, t) for m in models],
                        schedule.resolve(plan, name, t), config.seed)
                except PacerError as exc:
                    raise PacerError(f"{name}: {exc}") from None
        return out

    def _settings(self, unit) -> tuple[list[dict], dict, float]:
        """A unit's settings: each model's, the plan's, and the unit's t for gradients
        (block i of L at i / (L - 1); in a sliced plan, within its slice: slices.py)."""
        config, graph = self.config, self.models.graph
        if not config.slices:
            return ([e.parameters for e in config.models], config.parameters,
                    schedule.layer_position(unit.layer, graph.dims["layers"]))
        place = self.models.placements[unit.layer] if unit.layer is not None else None
        piece_index = place.piece if place else (0 if unit.kind == "embed" else -1)
        piece = config.slices[piece_index]
        merged, _ = roles(piece, config.base_model, f"slices[{piece_index}]")
        return ([piece.sources[i].entry.parameters for i in merged],
                schedule.first_then(piece.parameters, config.parameters),
                place.t if place else 0.0)

    def merge_tensor(self, name: str, raw: list[torch.Tensor] | None, writer: ShardWriter,
                     out_dtype: str, row_weights: torch.Tensor | None = None) -> int:
        """Merge one float tensor into ``writer`` as ``out_dtype``; ``raw``: its copies if
        they were read ahead (the list is emptied). Returns the bytes read."""
        info = self.reads.anchor.tensors[name]
        merge = tensor_merge(name, info.shape, self.params_for(name), row_weights,
                             listed_base(self.config))
        # Read in slices the budget allows (the whole tensor, or all of it read ahead);
        # compute on cache-sized row chunks of what was read: no method's result depends
        # on the slicing, and small buffers neither fault in fresh pages nor leave the cache.
        ranges = [(0, info.shape[0] if info.shape else 1)] if raw is not None \
            else self.reads.ranges(name)
        read = sum(c.numel() * c.element_size() for c in raw) if raw is not None else 0
        for pass_name in [*merge.passes, "merge"]:
            for rows in ranges:
                copies = raw
                if copies is None:
                    copies = self.reads.read(name, rows)
                    read += self.reads.nbytes(name, rows)
                for part in acct.compute_chunks(info.shape, rows):
                    x, base = self.reads.to_compute(name, rows_of(copies, part, rows[0]),
                                                    check=pass_name == "merge")
                    anchor, d = merge.split(x, base)
                    if pass_name != "merge":
                        merge.observe(pass_name, part, d)
                        continue
                    merged = merge.merge(part, anchor, d)
                    result = merged.to(DTYPES[out_dtype][0]).cpu()
                    writer.write(name, result.reshape(part[1] - part[0], *info.shape[1:])
                                 if info.shape else result.reshape(()), first_row=part[0])
                    del merged, result, x, d, anchor, base
                del copies  # not alive while the next slice is read
        if raw is not None:
            raw.clear()  # the caller's list too
        return read
