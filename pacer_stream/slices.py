"""Slices: an output model assembled from layer ranges of the inputs (mergekit's ``slices``).

A plan with ``slices`` instead of ``models`` lists, in output order, pieces of the output's
stack of blocks::

    slices:
      - sources: [{model: A, layer_range: [0, 24]}]                  # passthrough: A's 0..23
      - sources: [{model: A, layer_range: [16, 32]}]                 # then A's 16..31 again
    method: passthrough

Every slice has the same number K of sources, all covering the same number of layers; its
output blocks are the method's merge of its sources' blocks at the same offset. The
embeddings come from the first slice's sources, the final norm and head from the last's.
With a ``base_model``, each slice lists it among its sources (mergekit's convention), and
the base's blocks are the base of that slice's merge.

How it runs: source position k of the slices becomes one *virtual input model*, whose
block i is the block of the slice's k-th source that lands at output block i. A virtual
model is a :class:`CheckpointIndex` of the real files: each tensor keeps its real file and
byte range and only its name changes, so every stage of the engine (reading row slices in
budget, resuming, fingerprinting, the methods) runs on it unchanged, and nothing is copied.
Gradients run within each slice (t = offset / (length − 1)), as in mergekit.

Alignment and PACER refuse slices (their statistics need whole models).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import PacerError
from .io.header import TensorInfo
from .io.sources import ModelFiles, ModelRef

if TYPE_CHECKING:
    from .config_schema import ModelEntry, PlanConfig
    from .inputs import ModelSet
    from .io.reader import CheckpointIndex

LAYER_NAME = re.compile(r"((?:^|\.)layers?\.)(\d+)(\.)")
PER_LAYER_LISTS = ("layer_types",)  # config.json lists with one entry per block: remapped


@dataclass(frozen=True)
class SliceSource:
    """Layers [start, end) of one model, with that model's own parameter settings."""

    entry: "ModelEntry"
    start: int
    end: int

    @property
    def ref(self) -> ModelRef:
        return self.entry.ref


@dataclass(frozen=True)
class SliceSpec:
    sources: tuple[SliceSource, ...]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass(frozen=True)
class Placement:
    """Where output block ``layer`` comes from: slice ``piece``, ``offset`` blocks into it."""

    piece: int
    offset: int
    length: int

    @property
    def t(self) -> float:
        """The block's position for gradients, within its slice (mergekit's t)."""
        return self.offset / (self.length - 1) if self.length > 1 else 1.0


def slice_models(slices: tuple[SliceSpec, ...]) -> list[ModelRef]:
    """Every model the slices read, once each, in order of first use (the order of the
    virtual inputs' files, CompositeFiles.members)."""
    refs: list[ModelRef] = []
    for piece in slices:
        for source in piece.sources:
            if source.ref not in refs:
                refs.append(source.ref)
    return refs


def placements(slices: tuple[SliceSpec, ...]) -> list[Placement]:
    """One per output block, in output order."""
    return [Placement(p, o, s.length) for p, s in enumerate(slices) for o in range(s.length)]


def roles(piece: SliceSpec, base: ModelRef | None, where: str) -> tuple[list[int], int | None]:
    """The positions of a slice's merged sources, and of its base source (if a base is set)."""
    if base is None:
        return list(range(len(piece.sources))), None
    at = [i for i, s in enumerate(piece.sources) if s.ref == base]
    if len(at) != 1:
        raise PacerError(f"{where}: with a base_model, every slice lists it exactly once among "
                         f"its sources (found {len(at)} times)")
    return [i for i in range(len(piece.sources)) if i != at[0]], at[0]


class CompositeFiles(ModelFiles):
    """The files of several models as one: ``"<m>/<file>"`` is file ``<file>`` of model m;
    any other name (config, tokenizer) is the first model's."""

    def __init__(self, label: str, members: list[ModelFiles]) -> None:
        self.label = label
        self.members = members

    def _split(self, name: str) -> tuple[ModelFiles, str]:
        head, _, rest = name.partition("/")
        if rest and head.isdigit() and int(head) < len(self.members):
            return self.members[int(head)], rest
        return self.members[0], name

    def has(self, name: str) -> bool:
        files, rest = self._split(name)
        return files.has(rest)

    def list(self) -> list[str]:
        return self.members[0].list()

    def open(self, name: str):
        files, rest = self._split(name)
        return files.open(rest)

    def local_path(self, name: str):
        files, rest = self._split(name)
        return files.local_path(rest)


def sliced_models(plan: "PlanConfig") -> "ModelSet":
    """The virtual input models of a sliced plan (module docstring), checked."""
    from .graph import MergeGraph
    from .inputs import ModelSet
    from .io.reader import CheckpointIndex

    slices, base = plan.slices, plan.base_model
    refs = slice_models(slices)
    real = ModelSet.open(refs, None, plan.accept_config_differences)  # one family, shape, function
    depth = real.graph.dims["layers"]
    for p, piece in enumerate(slices):
        for i, source in enumerate(piece.sources):
            if not 0 <= source.start < source.end <= depth:
                raise PacerError(f"slices[{p}].sources[{i}]: layer_range [{source.start}, "
                                 f"{source.end}] is outside the model's {depth} layers")
    _check_config(real.models[0].config)
    merged = [roles(piece, base, f"slices[{p}]") for p, piece in enumerate(slices)]
    k = {len(m) for m, _ in merged}
    if len(k) > 1:
        raise PacerError(f"slices: every slice must merge the same number of sources (found "
                         f"{sorted(k)}); split the plan into runs with one count each")
    index = {ref: real.models[refs.index(ref)] for ref in refs}
    where = placements(slices)
    config = _out_config(real.models[0].config, slices, where)

    def virtual(position: int | None) -> "CheckpointIndex":
        """Merged source ``position`` of every slice (None: every slice's base source)."""
        picked = [piece.sources[b if position is None else m[position]]
                  for piece, (m, b) in zip(slices, merged)]
        return _virtual_index(index, refs, real.graph.units, picked, where, config)

    models = [virtual(position) for position in range(k.pop())]
    base_index = virtual(None) if base is not None else None
    spec = real.spec
    graph = MergeGraph.build(spec, config, models[0].tensors, models[0].label)
    return ModelSet(models, base_index, spec, graph, placements=where)


def _virtual_index(index: dict, refs: list[ModelRef], units, picked: list[SliceSource],
                   where: list[Placement], config: dict) -> "CheckpointIndex":
    """Source position's model: output block i = block (start + offset) of its slice's pick."""
    from .io.reader import CheckpointIndex

    members = [index[ref].files for ref in refs]
    label = "slices[" + ", ".join(f"{s.ref.text}[{s.start}:{s.end}]" for s in picked) + "]"
    tensors: dict[str, TensorInfo] = {}
    layer_of = {t: u.layer for u in units for t in (*u.tensors, *u.passthrough)}
    kind_of = {t: u.kind for u in units for t in (*u.tensors, *u.passthrough)}

    def add(name: str, source: SliceSource, out_name: str) -> None:
        info = index[source.ref].tensors[name]
        m = refs.index(source.ref)
        tensors[out_name] = TensorInfo(out_name, f"{m}/{info.file}", info.dtype, info.shape,
                                       info.begin, info.end)

    first, last = picked[0], picked[-1]
    for name in index[first.ref].tensors:
        if kind_of.get(name) == "embed":
            add(name, first, name)
        elif kind_of.get(name) == "head":
            add(name, last, name)
    for out_layer, place in enumerate(where):
        source = picked[place.piece]
        src_layer = source.start + place.offset
        for name in index[source.ref].tensors:
            if layer_of.get(name) == src_layer and kind_of.get(name) == "block":
                add(name, source, _renamed(name, src_layer, out_layer))
    files = CompositeFiles(label, members)
    return CheckpointIndex(files, dict(sorted(tensors.items(), key=lambda kv: _order(kv[1]))),
                           config)


def _order(info: TensorInfo) -> tuple:
    match = LAYER_NAME.search(info.name)
    return (int(match.group(2)) if match else -1, info.name)


def _renamed(name: str, old: int, new: int) -> str:
    """``name`` with its block index ``old`` replaced by ``new``."""
    def swap(match: re.Match) -> str:
        return f"{match.group(1)}{new}{match.group(3)}" if int(match.group(2)) == old \
            else match.group(0)
    return LAYER_NAME.sub(swap, name, count=1)


def _check_config(config: dict) -> None:
    depth = config.get("num_hidden_layers")
    for key, value in config.items():
        if key in PER_LAYER_LISTS:
            continue
        if isinstance(value, list) and len(value) == depth and depth not in (None, 0, 1):
            raise PacerError(f"slices: config.json's {key!r} has one entry per layer, which "
                             "pacer-stream cannot reassemble; merge without slices")
    if config.get("mlp_only_layers") or config.get("use_sliding_window") and \
            config.get("max_window_layers") not in (None, depth):
        raise PacerError("slices: this model's layers differ by index (mlp_only_layers, "
                         "max_window_layers), which slices would scramble; merge without slices")


def _out_config(config: dict, slices: tuple[SliceSpec, ...], where: list[Placement]) -> dict:
    """The output's config.json: the first model's, with the new depth and per-layer lists."""
    out = {**config, "num_hidden_layers": len(where)}
    for key in PER_LAYER_LISTS:
        if isinstance(config.get(key), list):
            out[key] = [config[key][slices[p.piece].sources[0].start + p.offset] for p in where]
    return out
