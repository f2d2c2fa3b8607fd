"""η of Split-Merge: its layout (per tensor sparse or dense, from the Gram pass's
counts), the writer the eta pass fills, and its finish with ``split_merge.json``."""

from __future__ import annotations

import json

import torch

from .. import accounting as acct
from .. import failpoints
from ..io.writer import OutTensor, ShardWriter, plan_shards, write_atomic
from ..job import MergeContext
from ..methods.split_merge import (ETA_FILE, ETA_FORMAT, INFO_FILE, Components,
                                   sparse_is_smaller, twin_merge_params)
from ..state import PassCheckpoint


class EtaWriter:
    """Writes η's values; laid out from the checkpoint's record once the Gram pass ran."""

    def __init__(self, ctx: MergeContext, ckpt: PassCheckpoint) -> None:
        self.ctx, self.ckpt = ctx, ckpt
        self._writer: ShardWriter | None = None

    @property
    def writer(self) -> ShardWriter:
        self._lay_out()
        return self._writer

    @property
    def shards(self) -> list:
        self._lay_out()
        return self._shards

    def _lay_out(self) -> None:
        if self._writer is None:
            record = self.ckpt.load()[1]
            self.parts = Components(record["eigenvalue"], record["combination"],
                                    record["coefficients"])
            layout = self._layout(record)
            self._shards = plan_shards(layout, 1 << 62, stem="eta",
                                       metadata={"format": ETA_FORMAT})
            self._writer = ShardWriter(self.ctx.out_dir, self._shards)
            self.dense = {t.name for t in layout if "::" not in t.name}
            self.nnz = dict(record["nnz"])

    def _layout(self, record: dict) -> list[OutTensor]:
        order, anchor = self.ctx.order, self.ctx.anchor
        out = []
        for name, nnz in sorted(record["nnz"].items(), key=lambda kv: order.index(kv[0])):
            info = anchor.tensors[name]
            if nnz == 0:
                continue
            if sparse_is_smaller(nnz, info.numel):
                out += [OutTensor(f"{name}::indices", "I64", (nnz,)),
                        OutTensor(f"{name}::values", "F32", (nnz,))]
            else:
                out.append(OutTensor(name, "F32", tuple(info.shape)))
        return out

    def write(self, name: str, selected: torch.Tensor, where: torch.Tensor, offset: int) -> int:
        """η's values at flat positions ``where`` of ``name``; returns the next sparse offset."""
        if selected.shape[1] == 0:
            return offset
        writer = self.writer
        values = self.parts.eta(selected).cpu()
        if name in self.dense:  # whole tensor dense: scatter this slice's values
            info = self.ctx.anchor.tensors[name]
            row_numel = acct.row_numel(info.shape)
            first = int(where[0]) // row_numel
            last = int(where[-1]) // row_numel + 1
            block = torch.zeros((last - first) * row_numel, dtype=torch.float32)
            block[where.cpu() - first * row_numel] = values
            writer.write(name, block.reshape(last - first, *info.shape[1:]) if info.shape
                         else block.reshape(()), first_row=first)
            return offset
        writer.write(f"{name}::indices", where.cpu().to(torch.int64), first_row=offset)
        writer.write(f"{name}::values", values, first_row=offset)
        return offset + len(values)

    def check_count(self, name: str, written: int) -> None:
        """A sparse η tensor must get exactly the entries the Gram pass counted."""
        if f"{name}::values" in self.writer.where and written != self.nnz[name]:
            raise AssertionError(f"{name}: wrote {written} η entries, the Gram pass counted "
                                 f"{self.nnz[name]}")


def finish_eta(ctx: MergeContext, run, record: dict) -> None:
    """η renamed into place and checked, then split_merge.json (both can be repeated)."""
    eta = run.eta
    writer = eta.writer
    writer.sync()
    writer.finish_all()
    writer.close()
    shapes = [tuple(ctx.anchor.tensors[t].shape) for t in run.float_names]
    n = len(ctx.models.models)
    split_params = run.numel + run.k + n
    info = {
        "method": "split_merge", "density": run.density, "k": run.k, "numel": run.numel,
        "models": [m.label for m in ctx.models.models],
        "coefficients": record["coefficients"], "eigenvalue": record["eigenvalue"],
        "sign_convention": "the largest |c_t| is positive (ties: lowest t)",
        "eta": ETA_FILE,
        "eta_bytes": sum(s.size for s in eta.shards),
        "mu_bytes": sum(s.size for s in ctx.shards),
        "memory": {
            "split_merge_params": split_params,
            "extra_over_one_model": (split_params - run.numel) / run.numel,
            "extra_bytes_on_disk": sum(s.size for s in eta.shards),
            "twin_merge_params": {str(r): twin_merge_params(shapes, n, r) for r in (2, 16)},
            "efficiency_ratio": {str(r): split_params / twin_merge_params(shapes, n, r)
                                 for r in (2, 16)},
        },
    }
    write_atomic(ctx.out_dir / INFO_FILE, json.dumps(info, indent=1) + "\n")
    failpoints.hit("split-finish")
