"""pacer-stream: stream-merge fine-tuned checkpoints of one architecture into one model."""

from .errors import PacerError

__version__ = "0.1.0"
__all__ = ["PACERMerger", "PacerError", "__version__"]


def __getattr__(name: str):
    if name == "PACERMerger":  # imported on first use: it pulls in torch
        from .api import PACERMerger

        return PACERMerger
    raise AttributeError(f"module 'pacer_stream' has no attribute {name!r}")
