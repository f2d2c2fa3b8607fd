"""pacer-stream: stream-merge fine-tuned checkpoints of one architecture into one model."""

from .errors import PacerError

__version__ = "0.1.0"
__all__ = ["PacerError", "__version__"]
