"""Pick the ArchSpec for a model from its ``config.json``."""

from __future__ import annotations

from ..errors import PacerError
from .families import FAMILIES
from .spec import ArchSpec

SUPPORTED: tuple[str, ...] = tuple(t for spec in FAMILIES for t in spec.model_types)


def detect_spec(config: dict, label: str = "model") -> ArchSpec:
    """The spec for ``config["model_type"]``; a clear error for anything else."""
    model_type = config.get("model_type")
    for spec in FAMILIES:
        if model_type in spec.model_types:
            return spec
    shown = model_type if model_type else "missing model_type"
    raise PacerError(
        f"{label}: unsupported architecture {shown!r} in config.json "
        f"(supported: {', '.join(SUPPORTED)})"
    )
