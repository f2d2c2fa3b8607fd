"""The inputs as the merge stages read them.

Every input's copy of a tensor, re-based onto the anchor once the run has aligned (the
permutations of align/stage.py applied while reading), whole or in the row slices the
budget allows (accounting.plan_tensor), and widened to fp32 on the compute device with
the NaN/Inf check. The merge, the statistics pass, the expert writer and Split-Merge's
passes all read through one :class:`TensorReads`.
"""

from __future__ import annotations

import torch

from . import accounting as acct
from .errors import PacerError
from .export.moe import OutRecipe
from .graph import source_index
from .inputs import ModelSet
from .io.header import DTYPES, FLOAT_DTYPES
from .io.reader import CheckpointIndex


class TensorReads:
    """Reads of one run's inputs (the models, then the base if there is one)."""

    def __init__(self, models: ModelSet, method: str, out_dtype: str | None, budget: int,
                 aligned: bool, device: torch.device, allow_nonfinite: bool) -> None:
        self.models, self.method, self.out_dtype, self.budget = models, method, out_dtype, budget
        self.aligned, self.device, self.allow_nonfinite = aligned, device, allow_nonfinite
        self.anchor = models.models[0]
        self.inputs: list[CheckpointIndex] = models.models + (
            [models.base] if models.base is not None else [])
        self.perms: dict[int, dict[str, torch.Tensor]] = {}  # by input index, once aligned

    def slices(self, name: str, copies: int | None = None,
               work: acct.Work | None = None) -> acct.SlicePlan:
        """Row slicing of a source tensor for ``work`` (default: merging it with the method;
        with ``copies``: a pass holding that many fp32 copies of each slice)."""
        info = self.anchor.tensors[name]
        if work is None:
            out_itemsize = DTYPES[out_dtype_of(info.dtype, self.out_dtype)][1]
            n, aligned = len(self.inputs), self.aligned
            width = self.models.widest_itemsize(name)
            work = acct.copies_work(copies, n, out_itemsize, width, aligned) if copies \
                else acct.merge_work(self.method, n, out_itemsize, width,
                                     aligned, acct.row_numel(info.shape or (1,)))
        return acct.plan_tensor(info.shape, work, self.budget)

    def ranges(self, name: str, copies: int | None = None,
               work: acct.Work | None = None) -> list[tuple[int, int]]:
        plan = self.slices(name, copies, work)
        return [(r, min(r + plan.rows, plan.total_rows)) for r in range(0, plan.total_rows, plan.rows)]

    def working_set(self, recipe: OutRecipe | None) -> int:
        """Bytes the accounting gives producing ``recipe`` (what a read-ahead must fit beside)."""
        if recipe is None or recipe.kind not in ("source", "expert"):
            return 0  # routers and zero tensors: a few rows
        info = self.anchor.tensors[recipe.source]
        if recipe.kind == "expert":
            return self.slices(recipe.source, work=self.expert_work(recipe.source)).bytes
        if recipe.source in self.models.graph.passthrough or not info.is_float:
            return acct.raw_bytes(info.numel, len(self.inputs),
                                  self.models.widest_itemsize(recipe.source),
                                  self.aligned)
        return self.slices(recipe.source).bytes

    def expert_work(self, name: str) -> acct.Work:
        info = self.anchor.tensors[name]
        out_itemsize = DTYPES[out_dtype_of(info.dtype, self.out_dtype)][1]
        return acct.expert_work(len(self.models.models), len(self.inputs), out_itemsize,
                                self.models.widest_itemsize(name), self.aligned)

    def may_read_ahead(self, current: OutRecipe | None, name: str) -> bool:
        """Read ``name`` while ``current`` is produced only into room the budget has left."""
        info = self.anchor.tensors[name]
        return acct.read_ahead_fits(self.working_set(current), info.numel, len(self.inputs),
                                    self.models.widest_itemsize(name), self.budget,
                                    self.aligned)

    def read_whole(self, name: str) -> list[torch.Tensor] | None:
        """Raw copies of a tensor from every input, if it is merged unsliced (read-ahead)."""
        if self.slices(name).sliced:
            return None
        return [self.read_model(k, name, None) for k in range(len(self.inputs))]

    def read(self, name: str, rows: tuple[int, int]) -> list[torch.Tensor]:
        """Rows of every input's copy (a scalar, which has no rows, whole)."""
        span = rows if self.anchor.tensors[name].shape else None
        return [self.read_model(k, name, span) for k in range(len(self.inputs))]

    def read_model(self, k: int, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Rows of one input's tensor, re-based onto the anchor when the run aligns."""
        index = self.inputs[k]
        node = self.models.graph.nodes.get(name)
        perms = self.perms.get(k)
        if perms is None or node is None:
            return index.read(name, rows)
        first = source_index(node.axes[0], perms) if node.axes else None
        if first is None:
            tensor = index.read(name, rows)
        else:  # output rows come from scattered input rows: read them in contiguous runs
            wanted = first if rows is None else first[rows[0]:rows[1]]
            tensor = _read_rows(index, name, wanted)
        for axis in range(1, len(node.axes)):
            moved = source_index(node.axes[axis], perms)
            if moved is not None:
                tensor = tensor.index_select(axis, moved)
        return tensor

    def nbytes(self, name: str, rows: tuple[int, int]) -> int:
        info = self.anchor.tensors[name]
        per_row = info.nbytes // info.shape[0] if info.shape else info.nbytes
        return per_row * (rows[1] - rows[0]) * len(self.inputs)

    def load(self, name: str, rows: tuple[int, int], check: bool):
        return self.to_compute(name, self.read(name, rows), check)

    def to_compute(self, name: str, raw: list[torch.Tensor], check: bool):
        """The models' copies as one fp32 [N, ...] tensor on the device; the base apart."""
        n = len(self.models.models)
        flat = [t.reshape(1, -1) if t.dim() == 0 else t for t in raw]
        x = torch.empty((n, *flat[0].shape), dtype=torch.float32, device=self.device)
        for k in range(n):
            x[k].copy_(flat[k])  # converts to fp32 in the copy, no intermediate
        base = flat[n].to(self.device, torch.float32) if len(flat) > n else None
        if check and not self.allow_nonfinite:
            for k, index in enumerate(self.inputs):
                values = x[k] if k < n else base
                if values.numel() == 0:
                    continue
                low, high = torch.aminmax(values)  # NaN propagates; Inf shows at an end
                if not (torch.isfinite(low) and torch.isfinite(high)):
                    raise PacerError(f"{index.label}: tensor {name!r} contains NaN or Inf; fix "
                                     "the checkpoint or pass --allow-nonfinite to merge it anyway")
        return x, base

    def check_equal(self, name: str, copies: list[torch.Tensor]) -> None:
        for index, tensor in zip(self.inputs[1:], copies[1:]):
            if not torch.equal(tensor, copies[0]):
                raise PacerError(f"{index.label}: tensor {name!r} differs from "
                                 f"{self.anchor.label}; non-float and passthrough tensors are "
                                 "copied and must be equal across models")


def rows_of(copies: list[torch.Tensor], part: tuple[int, int], first: int
            ) -> list[torch.Tensor]:
    """Rows ``part`` of each copy, which holds the rows from ``first`` on (views)."""
    if copies[0].dim() == 0:
        return copies
    return [c[part[0] - first:part[1] - first] for c in copies]


def _read_rows(index: CheckpointIndex, name: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (any order) of a tensor, read as few contiguous runs as possible."""
    if len(rows) == 0:
        return index.read(name, (0, 0))
    order = torch.argsort(rows)
    ranked = rows[order]
    breaks = (torch.nonzero(ranked[1:] != ranked[:-1] + 1).reshape(-1) + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, len(ranked)]
    parts = [index.read(name, (int(ranked[a]), int(ranked[b - 1]) + 1)) for a, b in zip(starts, ends)]
    sorted_rows = torch.cat(parts) if len(parts) > 1 else parts[0]
    return sorted_rows[torch.argsort(order)]


def out_dtype_of(in_dtype: str, out_dtype: str | None) -> str:
    """The output dtype of a tensor stored as ``in_dtype``: the plan's for float tensors."""
    return out_dtype if (out_dtype and in_dtype in FLOAT_DTYPES) else in_dtype
