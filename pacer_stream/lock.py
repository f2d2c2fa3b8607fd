"""The output folder's lock: one run at a time per output folder.

Two runs of one plan would both merge every unit into the same partial files and
race on the run state. A run therefore holds an exclusive ``flock`` on
``<output>/.pacer-lock`` from before it touches anything until it ends. The
kernel drops the lock when the process dies, however it dies, so a stale lock
never blocks a resume. While held, the file names its holder (pid, host, start
time) so the second run can say who has it; a run that ends empties it again,
so a finished output folder is byte-identical however often it was resumed.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import PacerError

LOCK_FILE = ".pacer-lock"


class OutputLock:
    """``with OutputLock(folder):`` — creates ``folder`` if needed and locks it, or refuses."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise PacerError(f"{self.folder} is in use by another pacer-stream run ({holder}); "
                             "wait for it to finish, or stop it and re-run to resume") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # holder info is only true while held
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"
