"""Failpoints: deterministic crash injection for the resume tests.

``PACER_STREAM_FAILPOINT=name:n[:signal]`` makes the n-th ``hit(name)`` send
``signal`` (default SIGKILL) to this process — a real, uncatchable kill at an
exact point of the run (after a unit is marked done, mid-shard, ...). Unset, a
hit is one dictionary lookup.

``PACER_STREAM_FAILPOINT_FILE=path`` arms the failpoint written in that file instead,
for processes that were started before the test chose it (a Ray cluster's workers):
the first process to reach its n-th hit renames the file away and fires, so it fires
once across all of them.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def hit(name: str) -> None:
    spec = os.environ.get("PACER_STREAM_FAILPOINT")
    armed = None
    if not spec:
        armed = os.environ.get("PACER_STREAM_FAILPOINT_FILE")
        if not armed:
            return
        try:
            with open(armed) as f:
                spec = f.read().strip()
        except OSError:
            return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, sig = rest.partition(":")
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(count or 1):
        if armed is not None:
            try:
                os.rename(armed, armed + ".fired")  # this process claims it
            except OSError:
                return  # another one did
        # raised in this thread, not sent to the process: the kernel could hand a
        # process-directed SIGINT to another thread, and under load the run could finish
        # before the main thread saw it (seen once in the full suite)
        signal.raise_signal(getattr(signal, sig or "SIGKILL"))
