"""Deterministic randomness: every generator is seeded by what it is for, never by global state.

A DARE mask or a group order depends only on (seed, what, where), so results do not
change with processing order, slicing, resume or device (DESIGN.md invariant 3).
"""

from __future__ import annotations

import hashlib

import torch


def seed_of(*parts: object) -> int:
    """A 63-bit seed from the parts, e.g. ``seed_of(0, "model.layers.3.mlp.up_proj.weight", 1)``."""
    text = "\0".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by :func:`seed_of` the parts."""
    return torch.Generator().manual_seed(seed_of(*parts))
