"""Train/validation split by dialogue group (a dialogue, scene or episode), never by window:
windows of one conversation on both sides of the split would leak validation into training."""

from __future__ import annotations

import hashlib


def _rank(seed: int, group: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{group}".encode(), digest_size=8).digest()


def validation_groups(groups: set[str], share: float, seed: int) -> set[str]:
    """The groups that go to validation: a seeded, order-independent choice of round(share * n),
    at least one when share > 0 and there are two or more groups."""
    if share <= 0 or len(groups) < 2:
        return set()
    count = min(len(groups) - 1, max(1, round(share * len(groups))))
    return set(sorted(groups, key=lambda g: _rank(seed, g))[:count])
