"""Failpoints: deterministic crash injection for the resume tests.

``PACER_STREAM_FAILPOINT=name:n[:signal]`` makes the n-th ``hit(name)`` send
``signal`` (default SIGKILL) to this process — a real, uncatchable kill at an
exact point of the run (after a unit is marked done, mid-shard, ...). Unset, a
hit is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def hit(name: str) -> None:
    spec = os.environ.get("PACER_STREAM_FAILPOINT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, sig = rest.partition(":")
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(count or 1):
        # raised in this thread, not sent to the process: the kernel could hand a
        # process-directed SIGINT to another thread, and under load the run could finish
        # before the main thread saw it (seen once in the full suite)
        signal.raise_signal(getattr(signal, sig or "SIGKILL"))
