"""Architecture specs: which tensors a model family has and how each axis permutes."""

from .detect import detect_spec, SUPPORTED
from .spec import ArchSpec, GroupKind, TensorRule

__all__ = ["ArchSpec", "GroupKind", "TensorRule", "detect_spec", "SUPPORTED"]
