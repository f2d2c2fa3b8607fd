"""The process's memory: its peak RSS (measured, for the budget checks and the report) and
the glibc allocator settings that keep the RSS at what accounting.py plans for."""

from __future__ import annotations

import ctypes
import resource
import threading

import psutil


class RssMonitor:
    """Samples this process's RSS in the background; ``peak`` is the highest seen."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(interval)

    def __enter__(self) -> "RssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, peak_rss())


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return None


LIBC = _libc()
MMAP_THRESHOLD = 1 << 23  # 8 MiB: larger blocks (slices) are mmapped, returned to the OS on free


def steady_allocator() -> None:
    """Fix glibc's mmap threshold at 8 MiB so freed slices leave the RSS at once.

    Every run's slices are cut to fill the budget, so heap slack is budget overrun:
    measured on three 618 MB Llamas (pacer, 978 MB budget) 942 MB peak with glibc's
    default, 782 MB with this. Split-Merge: 350 MB against 376 MB with trimming alone
    (three 450 MB models, 420 MB budget). Its time cost on dense merges is unsettled: an
    earlier measurement put it at +14 %, the latest within the noise of this 2-core
    machine (linear 6.1-10.0 s with it, 7.6-7.7 s without); the speed benchmark decides.
    """
    if LIBC is not None:
        LIBC.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; also stops its dynamic growth


def return_freed_memory() -> None:
    """Give the heap's free blocks back to the OS (glibc ``malloc_trim``), once per unit.

    Blocks under the 8 MiB mmap threshold (see :func:`steady_allocator`) still come
    from the heap, and freed ones would stay in the RSS (measured before the fixed
    threshold: +120 MB over a Split-Merge of three 450 MB models). Trimming at unit
    boundaries keeps the RSS at what the accounting plans for.
    """
    if LIBC is not None:
        LIBC.malloc_trim(0)


def peak_rss() -> int:
    """The kernel's high-water mark of this process's RSS (catches spikes between samples).

    VmHWM belongs to the current address space, so unlike ``ru_maxrss`` it does not
    inherit the RSS of the parent that forked this process.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
