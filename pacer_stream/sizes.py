"""Byte sizes as people write them: ``16GB``, ``512MiB``, ``5e9``."""

from __future__ import annotations

import re

from .errors import PacerError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Parse a byte size.

    >>> parse_size("16GB")
    16000000000
    >>> parse_size("1.5 GiB")
    1610612736
    """
    if isinstance(text, bool):
        raise PacerError(f"{what}: expected a size like 16GB, got {text!r}")
    if isinstance(text, (int, float)):
        return _checked(float(text), text, what)
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise PacerError(f"{what}: expected a size like 16GB or 512MiB, got {text!r}")
    return _checked(float(match.group(1)) * _UNITS[unit], text, what)


MAX_SIZE = 2**60  # an exabyte: anything larger is a typo, and would overflow int64 offsets


def _checked(value: float, text, what: str) -> int:
    if value != value or value < 1:  # NaN compares unequal to itself
        raise PacerError(f"{what}: must be at least one byte, got {text!r}")
    if value > MAX_SIZE:
        raise PacerError(f"{what}: {text!r} is larger than any disk or memory (an exabyte "
                         "at most)")
    return int(value)


def format_size(n: float) -> str:
    """Human-readable decimal size: ``format_size(1.6e10) == '16.0 GB'``.

    A size is never negative: a deficit prints as ``0 B`` (say what is short instead).
    """
    n = n if n > 0 else 0  # also turns -0.0 into 0
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def at_least(budget: int) -> str:
    """How a refusal names the smallest budget that works, as a flag one can paste."""
    return f"needs at least {format_size(budget)}, e.g. --max-memory {-(-budget // 10**6)}MB"
