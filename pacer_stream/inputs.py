"""The N input models of a merge, opened and checked against each other.

All models must be the same architecture with the same tensors of the same
shapes; the first model is the reference for the graph. Checks run on headers
and configs only, before any tensor data is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arch import ArchSpec, detect_spec
from .config import PlanConfig
from .errors import PacerError
from .graph import MergeGraph
from .io.reader import CheckpointIndex
from .io.sources import ModelRef

# config.json keys that must agree for tensors to line up one to one
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")


@dataclass
class ModelSet:
    """Indexes of the models (and optional base), their spec and merge graph."""

    models: list[CheckpointIndex]
    base: CheckpointIndex | None
    spec: ArchSpec
    graph: MergeGraph

    @property
    def all(self) -> list[CheckpointIndex]:
        return self.models + ([self.base] if self.base is not None else [])

    @classmethod
    def open(cls, refs: list[ModelRef], base: ModelRef | None = None) -> "ModelSet":
        models = [CheckpointIndex.open(ref) for ref in refs]
        base_index = CheckpointIndex.open(base) if base is not None else None
        first = models[0]
        spec = detect_spec(first.config, first.label)
        others = models[1:] + ([base_index] if base_index is not None else [])
        for other in others:
            other_spec = detect_spec(other.config, other.label)
            if other_spec.family != spec.family:
                raise PacerError(f"models are different architectures: {first.label} is "
                                 f"{spec.family}, {other.label} is {other_spec.family}")
            _check_same_shapes(first, other)
        graph = MergeGraph.build(spec, first.config, first.tensors, first.label)
        return cls(models, base_index, spec, graph)

    @classmethod
    def from_plan(cls, plan: PlanConfig) -> "ModelSet":
        return cls.open([m.ref for m in plan.models], plan.base_model)


def _check_same_shapes(a: CheckpointIndex, b: CheckpointIndex) -> None:
    for key in SHAPE_KEYS:
        if a.config.get(key) != b.config.get(key):
            raise PacerError(f"{b.label}: config {key}={b.config.get(key)!r} differs from "
                             f"{a.label} ({a.config.get(key)!r}); models must share one shape")
    labels_a, labels_b = a.config.get("id2label"), b.config.get("id2label")
    if labels_a and labels_b and _labels(labels_a) != _labels(labels_b) and any(
            "classifier" in name for name in a.tensors):
        raise PacerError(f"{b.label}: its classifier's labels (id2label) differ from "
                         f"{a.label}'s; heads with different label sets are outputs, not "
                         "mergeable weights: merge the backbones (ViTModel / BertModel "
                         "checkpoints) or give the models the same label set")
    only_a = sorted(set(a.tensors) - set(b.tensors))
    only_b = sorted(set(b.tensors) - set(a.tensors))
    if only_a or only_b:
        name, owner, other = (only_a[0], a, b) if only_a else (only_b[0], b, a)
        raise PacerError(f"tensor {name!r} is in {owner.label} but not in {other.label}")
    for name, info in a.tensors.items():
        other = b.tensors[name]
        if other.shape != info.shape:
            raise PacerError(f"tensor {name!r} has shape {list(other.shape)} in {b.label} but "
                             f"{list(info.shape)} in {a.label}")


def _labels(id2label: dict) -> dict[int, str]:
    return {int(k): str(v) for k, v in id2label.items()}
