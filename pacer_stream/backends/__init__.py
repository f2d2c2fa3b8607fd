"""Where a unit stage's units run: ``local`` (this process, in order) or ``ray`` (one task a
unit on a Ray cluster whose machines share the input and output storage)."""

from __future__ import annotations

from ..errors import PacerError
from ..job import MergeContext, RunOptions
from .local import LocalBackend

BACKENDS = ("local", "ray")


def open_backend(ctx: MergeContext):
    """The backend the options ask for (Ray is an optional extra, imported only here)."""
    options: RunOptions = ctx.options
    if options.backend == "local":
        if options.address is not None:
            raise PacerError("--address names a Ray cluster: give it with --backend ray")
        return LocalBackend()
    if options.backend == "ray":
        from .ray_cluster import RayBackend
        return RayBackend(ctx.config, options)
    raise PacerError(f"--backend {options.backend}: use one of {', '.join(BACKENDS)}")
