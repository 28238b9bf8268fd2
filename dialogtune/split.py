"""Train/validation split by dialogue group (a dialogue, scene or episode), never by window:
windows of one conversation on both sides of the split would leak validation into training.

Validation holds the round(share * n) groups of lowest seeded rank. `prepare` streams: it keeps
only each group's rank (8 bytes) and decides at the end with `validation_cutoff`, which holds
exactly the groups `validation_groups` chooses."""

from __future__ import annotations

import hashlib

import numpy as np


def group_rank(seed: int, group: str) -> int:
    """A group's seeded rank, an unsigned 64-bit number."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{group}".encode(), digest_size=8).digest(), "big")


def _count(share: float, groups: int) -> int:
    if share <= 0 or groups < 2:
        return 0
    return min(groups - 1, max(1, round(share * groups)))


def validation_groups(groups: set[str], share: float, seed: int) -> set[str]:
    """The groups that go to validation: a seeded, order-independent choice of round(share * n),
    at least one when share > 0 and there are two or more groups."""
    return set(sorted(groups, key=lambda g: group_rank(seed, g))[:_count(share, len(groups))])


def validation_cutoff(ranks: np.ndarray, share: float) -> int | None:
    """The highest rank that goes to validation, given every group's rank (uint64, duplicates
    allowed); None when nothing does. A group is held out when its rank <= the cutoff."""
    distinct = np.unique(ranks)
    count = _count(share, len(distinct))
    return int(distinct[count - 1]) if count else None
