"""Failpoints: deterministic crash injection for the resume tests.

``PACER_STREAM_FAILPOINT=name:n[:signal]`` makes the n-th ``hit(name)`` send
``signal`` (default SIGKILL) to this process — a real, uncatchable kill at an
exact point of the run (after a unit is marked done, mid-shard, ...). Unset, a
hit is one dictionary lookup.

``PACER_STREAM_FAILPOINT_FILE=path`` arms the failpoint written in that file instead,
for processes that were started before the test chose it (a Ray cluster's workers):
the first process to reach its n-th hit renames the file away and fires, so it fires
once across all of them (``name:n always`` fires in every process, and stays armed).
"""

from __future__ import annotations

import os
import signal

_counts: dict = {}  # name (or name and arming) -> hits


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
                key = (name, os.fstat(f.fileno()).st_mtime_ns)  # hits count from arming
        except OSError:
            return
        spec, _, mode = spec.partition(" ")
        if mode == "always":
            armed = None
    else:
        key = name
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, sig = rest.partition(":")
    _counts[key] = _counts.get(key, 0) + 1
    n = int(count or 1)
    # a file-armed failpoint fires from the n-th hit on: a process that hit it before and
    # lived (another claimed it, or it stays armed) must not miss it
    if _counts[key] == n or (key != name and _counts[key] > n):
        if armed is not None:
            try:
                os.rename(armed, armed + ".fired")  # this process claims it
            except OSError:
                return  # another one did
        # raised in this thread, not sent to the process: the kernel could hand a
        # process-directed SIGINT to another thread, and under load the run could finish
        # before the main thread saw it (seen once in the full suite)
        signal.raise_signal(getattr(signal, sig or "SIGKILL"))
