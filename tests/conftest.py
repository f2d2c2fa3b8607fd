"""Shared test fixtures: the tiny checkpoint families, made once per checkout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_fixtures  # noqa: E402

FIXTURES = ROOT / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``fixtures/`` with every family, regenerated when the maker script changed."""
    stamp = FIXTURES / "FIXTURES.json"
    current = stamp.is_file() and json.loads(stamp.read_text()).get("script") == \
        make_fixtures.script_digest() and \
        sorted(json.loads(stamp.read_text())["families"]) == sorted(make_fixtures.FAMILIES)
    if not current:
        make_fixtures.main(["--out", str(FIXTURES)])
    return FIXTURES
