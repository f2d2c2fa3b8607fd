"""The N input models of a merge, opened and checked against each other.

All models must be the same architecture with the same tensors of the same
shapes; the first model is the reference for the graph. Checks run on headers
and configs only, before any tensor data is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arch import ArchSpec, detect_spec
from .config_schema import PlanConfig
from .errors import PacerError
from .graph import MergeGraph
from .io.header import FLOAT_DTYPES
from .io.reader import CheckpointIndex
from .io.sources import ModelRef

# config.json keys that must agree for tensors to line up one to one
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")
# config.json keys that do not change the function a model computes: bookkeeping, the
# stored dtype, runtime switches, initialisation, token ids the tokenizer files carry.
# Every other key must agree (or be listed in the plan's accept_config_differences):
# a merge of models with different rope_theta, rms_norm_eps, hidden_act, ... is none of them.
NEUTRAL_KEYS = frozenset({
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures",
    "torch_dtype", "dtype", "use_cache", "attn_implementation", "_attn_implementation",
    "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict",
    "torchscript", "initializer_range", "finetuning_task", "task_specific_params",
    "bos_token_id", "eos_token_id", "pad_token_id", "id2label", "label2id", "problem_type",
})


@dataclass
class ModelSet:
    """Indexes of the models (and optional base), their spec and merge graph."""

    models: list[CheckpointIndex]
    base: CheckpointIndex | None
    spec: ArchSpec
    graph: MergeGraph
    # a sliced plan's output blocks: where each comes from (slices.py); None otherwise
    placements: list | None = None

    @property
    def all(self) -> list[CheckpointIndex]:
        return self.models + ([self.base] if self.base is not None else [])

    @classmethod
    def open(cls, refs: list[ModelRef], base: ModelRef | None = None,
             accept_config_differences: tuple[str, ...] = ()) -> "ModelSet":
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
        _check_same_function(first, others, set(accept_config_differences))
        graph = MergeGraph.build(spec, first.config, first.tensors, first.label)
        return cls(models, base_index, spec, graph)

    def widest_itemsize(self, name: str) -> int:
        """Bytes per element of tensor ``name`` in the input that stores it widest (float
        dtypes may differ between models: the memory accounting must take the largest)."""
        return max(index.tensors[name].itemsize for index in self.all)

    def file_identities(self, with_hash: bool = False) -> dict[str, dict]:
        """Every local file the merge reads (shards, configs), by '<model>/<file>'.

        Files still on the hub (not in the local cache) are identified by their
        headers, which the plan's fingerprint already covers.
        """
        from .state import file_identity  # the run state (zarr) is not needed to plan

        identities = {}
        for index in self.all:
            for file in sorted({info.file for info in index.tensors.values()} | {"config.json"}):
                path = index.files.local_path(file)
                if path is not None and path.exists():
                    identities[f"{index.label}/{file}"] = file_identity(path.resolve(), with_hash)
        return identities

    @classmethod
    def from_plan(cls, plan: PlanConfig) -> "ModelSet":
        if plan.slices:
            from .slices import sliced_models

            return sliced_models(plan)
        return cls.open([m.ref for m in plan.models], plan.base_model,
                        plan.accept_config_differences)


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
        both_float = info.dtype in FLOAT_DTYPES and other.dtype in FLOAT_DTYPES
        if other.dtype != info.dtype and not both_float:
            # bf16 vs fp32 of one weight is a fair merge (computed in fp32); integers of
            # another width, or integers against floats, are different data
            raise PacerError(f"tensor {name!r} is {other.dtype} in {b.label} but {info.dtype} "
                             f"in {a.label}; only floating-point dtypes may differ between "
                             "models")


def _check_same_function(first: CheckpointIndex, others: list[CheckpointIndex],
                         accepted: set[str]) -> None:
    """Refuse models whose configs differ in a key that changes what they compute."""
    differences: dict[str, list[str]] = {}
    for other in others:
        for key in sorted(set(first.config) | set(other.config)):
            if key in NEUTRAL_KEYS or key in SHAPE_KEYS or key in accepted:
                continue
            mine, theirs = first.config.get(key, "<unset>"), other.config.get(key, "<unset>")
            if mine != theirs:
                differences.setdefault(key, []).append(f"{other.label}: {theirs!r}")
    if differences:
        listed = "; ".join(f"{key} = {first.config.get(key, '<unset>')!r} in {first.label}, "
                           + ", ".join(values) for key, values in differences.items())
        raise PacerError(f"the models' configs differ in keys that change what they compute: "
                         f"{listed}. Merge models of one configuration, or add "
                         f"accept_config_differences: [{', '.join(differences)}] to the plan "
                         f"to merge anyway ({first.label}'s values are written)")


def _labels(id2label: dict) -> dict[int, str]:
    return {int(k): str(v) for k, v in id2label.items()}
