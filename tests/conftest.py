"""Shared test fixtures: the tiny checkpoint families, made once per checkout."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

import pytest

# pytest-xdist runs two workers on this machine's two cores (pyproject.toml): one compute
# thread each, for them and the merges they start, instead of two threads fighting over
# each core (the output bytes do not depend on the thread count).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_fixtures  # noqa: E402

FIXTURES = ROOT / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``fixtures/`` with every family, regenerated when the maker script changed (under a
    lock: with pytest-xdist every worker process asks at once)."""
    FIXTURES.parent.joinpath(".fixtures.lock").touch()
    with open(FIXTURES.parent / ".fixtures.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = FIXTURES / "FIXTURES.json"
        current = stamp.is_file() and json.loads(stamp.read_text()).get("script") == \
            make_fixtures.script_digest() and \
            sorted(json.loads(stamp.read_text())["families"]) == sorted(make_fixtures.FAMILIES)
        if not current:
            make_fixtures.main(["--out", str(FIXTURES)])
    return FIXTURES
