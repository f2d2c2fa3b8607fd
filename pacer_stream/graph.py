"""The merge graph: symmetry groups, the tensor axes they touch, and execution units.

Built from one model's :class:`~pacer_stream.io.reader.CheckpointIndex` and its
:class:`~pacer_stream.arch.ArchSpec`. Every tensor is either a :class:`TensorNode`
(with each axis decomposed into :class:`Factor` s, some of them permuted by a
:class:`SymmetryGroup`) or a passthrough tensor; a tensor the spec does not
describe is an error.

Permutations are stored destination-indexed. For a group of size n with parent
slots ``batch`` (e.g. query heads: one permutation per KV head), ``perm`` has
shape ``(*batch, n)`` and output slot ``j`` under destination parent ``g`` takes
input slot ``perm[g, j]``. For an axis labelled ``kv.q.vo`` that reads::

    out[g, j, t] = in[kv[g], q[g, j], vo[g, t]]

which is exactly "KV head g of the output is KV head kv[g] of the input, with its
query heads and value dims reordered".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .arch.spec import ArchSpec
from .errors import PacerError
from .io.header import TensorInfo

if TYPE_CHECKING:  # torch is imported where permutations are made, not to build a graph
    import torch

GLOBAL = "residual"


@dataclass(frozen=True)
class Factor:
    """One factor of an axis: a named dim of ``size``, permuted by ``group`` if set."""

    dim: str
    size: int
    group: str | None = None  # SymmetryGroup id, e.g. "block.3/kv"
    parent: int | None = None  # position of the parent group's factor in the same axis


@dataclass(frozen=True)
class TensorNode:
    name: str
    role: str
    unit: str
    info: TensorInfo
    axes: tuple[tuple[Factor, ...], ...]

    @property
    def groups(self) -> set[str]:
        return {f.group for axis in self.axes for f in axis if f.group}


@dataclass
class SymmetryGroup:
    """One permutation problem family: ``kind`` of ``size`` per parent slot in ``batch``."""

    id: str
    kind: str
    size: int
    unit: str | None  # None for the global residual stream
    batch: tuple[int, ...] = ()
    members: list[tuple[str, int]] = field(default_factory=list)  # (tensor, axis)

    @property
    def problems(self) -> int:
        """How many independent assignment problems this group poses."""
        count = 1
        for b in self.batch:
            count *= b
        return count


@dataclass
class Unit:
    """The grain of execution: embeddings, one block, or the head, in file order."""

    name: str
    kind: str
    layer: int | None
    tensors: list[str] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)


class MergeGraph:
    """Symmetry groups and units of one architecture instance."""

    def __init__(self, spec: ArchSpec, dims: dict[str, int]) -> None:
        self.spec = spec
        self.dims = dims
        self.nodes: dict[str, TensorNode] = {}
        self.passthrough: dict[str, TensorInfo] = {}
        self.groups: dict[str, SymmetryGroup] = {}
        self.units: list[Unit] = []

    @classmethod
    def build(cls, spec: ArchSpec, config: dict, tensors: dict[str, TensorInfo],
              label: str = "model") -> "MergeGraph":
        graph = cls(spec, spec.dims(config))
        layers = graph.dims["layers"]
        units = {"embed": Unit("embed", "embed", None)}
        units.update({f"block.{i}": Unit(f"block.{i}", "block", i) for i in range(layers)})
        units["head"] = Unit("head", "head", None)
        seen_rules: dict[str, set] = {}
        for name, info in tensors.items():
            found = spec.match(name)
            if found is None:
                raise PacerError(
                    f"{label}: tensor {name!r} is not covered by the {spec.family} spec; "
                    "pacer-stream will not drop or blindly copy it (is this a different "
                    "architecture or an adapter checkpoint?)"
                )
            rule, block, passthrough = found
            if block is not None and block >= layers:
                raise PacerError(f"{label}: tensor {name!r} is in block {block} but config.json "
                                 f"says num_hidden_layers={layers}")
            unit = units[f"block.{block}" if block is not None else rule.unit]
            seen_rules.setdefault(unit.name, set()).add(rule.role)
            if passthrough:
                graph.passthrough[name] = info
                unit.passthrough.append(name)
                continue
            node = graph._node(name, rule, unit.name, info, label)
            graph.nodes[name] = node
            unit.tensors.append(name)
        graph._check_complete(units, seen_rules, label)
        graph.units = [u for u in units.values() if u.tensors or u.passthrough]
        for unit in graph.units:  # file order inside a unit: by name is stable and readable
            unit.tensors.sort()
            unit.passthrough.sort()
        return graph

    def _node(self, name: str, rule, unit: str, info: TensorInfo, label: str) -> TensorNode:
        if len(rule.axes) != len(info.shape):
            raise PacerError(f"{label}: tensor {name!r} has shape {list(info.shape)} but the "
                             f"{self.spec.family} spec expects {len(rule.axes)} axes")
        axes = []
        for axis, (label_text, length) in enumerate(zip(rule.axes, info.shape)):
            factors: list[Factor] = []
            for dim in label_text.split("."):
                kind = self.spec.group_kind(dim)
                size = length if dim == "-" else self.dims[dim]
                group = parent = None
                if kind is not None:
                    group = self._group(kind, unit).id
                    if kind.parent is not None:
                        parent = next(k for k, f in enumerate(factors) if f.dim == kind.parent)
                factors.append(Factor(dim, size, group, parent))
            expected = 1
            for f in factors:
                expected *= f.size
            if expected != length:
                parts = " × ".join(f"{f.dim}={f.size}" for f in factors)
                raise PacerError(f"{label}: tensor {name!r} axis {axis} has size {length} but "
                                 f"config.json implies {expected} ({parts})")
            for f in factors:
                if f.group:
                    self.groups[f.group].members.append((name, axis))
            axes.append(tuple(factors))
        return TensorNode(name, rule.role, unit, info, tuple(axes))

    def _group(self, kind, unit: str) -> SymmetryGroup:
        gid = kind.name if kind.scope == "global" else f"{unit}/{kind.name}"
        if gid not in self.groups:
            batch: tuple[int, ...] = ()
            parent = kind.parent
            while parent is not None:  # nested parents: outermost first
                pkind = self.spec.group_kind(parent)
                batch = (self.dims[pkind.size_dim], *batch)
                parent = pkind.parent
            self.groups[gid] = SymmetryGroup(
                gid, kind.name, self.dims[kind.size_dim],
                None if kind.scope == "global" else unit, batch)
        return self.groups[gid]

    def _check_complete(self, units: dict[str, Unit], seen: dict[str, set], label: str) -> None:
        for rule in self.spec.rules:
            if rule.optional:
                continue
            names = [f"block.{i}" for i in range(self.dims["layers"])] if rule.unit == "block" \
                else [rule.unit]
            for unit in names:
                if rule.role not in seen.get(unit, set()):
                    shown = rule.template.replace("{i}", unit.partition(".")[2] or "i")
                    raise PacerError(f"{label}: missing tensor {shown!r} ({self.spec.family} "
                                     f"{unit} needs it)")

    # -- permutations -------------------------------------------------------------

    def identity_perms(self) -> dict[str, torch.Tensor]:
        import torch

        return {gid: torch.arange(g.size).expand(*g.batch, g.size).clone()
                for gid, g in self.groups.items()}

    def random_perms(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A random permutation for every group (used by tests and fixture variants)."""
        import torch

        perms = {}
        for gid, g in sorted(self.groups.items()):
            flat = [torch.randperm(g.size, generator=generator) for _ in range(g.problems)]
            perms[gid] = torch.stack(flat).reshape(*g.batch, g.size)
        return perms

    def permute(self, name: str, tensor: torch.Tensor,
                perms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply the groups' permutations to every axis of one tensor."""
        node = self.nodes[name]
        for axis, factors in enumerate(node.axes):
            index = source_index(factors, perms)
            if index is not None:
                tensor = tensor.index_select(axis, index)
        return tensor


def source_index(factors: tuple[Factor, ...], perms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Flat input index for each output position of one axis (None if nothing moves)."""
    if not any(f.group and f.group in perms for f in factors):
        return None
    import torch

    k = len(factors)
    sizes = [f.size for f in factors]
    # dest[i]: the output index of factor i, shaped to broadcast over the axis grid
    dest = [torch.arange(s).reshape([s if j == i else 1 for j in range(k)]) for i, s in enumerate(sizes)]
    flat = torch.zeros(sizes, dtype=torch.long)
    stride = 1
    for i in reversed(range(k)):
        f = factors[i]
        src = dest[i]
        if f.group and f.group in perms:
            perm = perms[f.group]
            src = perm[dest[f.parent], dest[i]] if f.parent is not None else perm[dest[i]]
        flat = flat + src * stride
        stride *= sizes[i]
    return flat.reshape(-1)
