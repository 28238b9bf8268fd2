"""Merging ranked lists into one: the hybrid retriever's last step (pure Python, no torch).

    fuse([dense_hits, keyword_hits], "rrf")  # [(key, score), ...] best first

Each input list is `[(key, score), ...]`, best first, one entry per key. The rules:

- `rrf` (default): reciprocal-rank fusion, score = sum over lists of 1 / (k + rank), rank from 1,
  k = 60 (Cormack et al. 2009). Only ranks count, so lists whose scores live on different scales
  (cosine similarity in [-1, 1], BM25 in [0, 30+]) merge fairly.
- `sum`: the scores of each list min-max normalised to [0, 1] (best 1, worst 0; a list whose
  scores are all equal gives 1 to each), then added. The original system added the raw scores,
  which lets BM25's larger numbers decide alone; normalising first is the fix.
- `union`: every key of any list, ordered by its best rank in any list; score = 1 / best rank.
- `intersection`: only keys in every list, ordered by their worst rank; score = 1 / worst rank.

Ties keep the order in which keys were first met (the first list's order first), so the result is
deterministic.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

from dialogtune.errors import ConfigError

K = TypeVar("K", bound=Hashable)
Ranked = Sequence[tuple[K, float]]

FUSIONS = ("rrf", "sum", "union", "intersection")
RRF_K = 60


def reciprocal_rank(lists: Sequence[Ranked], k: int = RRF_K) -> list[tuple[K, float]]:
    scores: dict = {}
    for ranked in lists:
        for rank, (key, _) in enumerate(ranked, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return _best_first(scores)


def min_max(ranked: Ranked) -> list[tuple[K, float]]:
    if not ranked:
        return []
    values = [score for _, score in ranked]
    low, high = min(values), max(values)
    if high == low:
        return [(key, 1.0) for key, _ in ranked]
    return [(key, (score - low) / (high - low)) for key, score in ranked]


def score_sum(lists: Sequence[Ranked]) -> list[tuple[K, float]]:
    scores: dict = {}
    for ranked in lists:
        for key, score in min_max(ranked):
            scores[key] = scores.get(key, 0.0) + score
    return _best_first(scores)


def _ranks(lists: Sequence[Ranked]) -> dict:
    ranks: dict = {}
    for ranked in lists:
        for rank, (key, _) in enumerate(ranked, start=1):
            ranks.setdefault(key, []).append(rank)
    return ranks


def union(lists: Sequence[Ranked]) -> list[tuple[K, float]]:
    return _best_first({key: 1.0 / min(ranks) for key, ranks in _ranks(lists).items()})


def intersection(lists: Sequence[Ranked]) -> list[tuple[K, float]]:
    return _best_first({key: 1.0 / max(ranks) for key, ranks in _ranks(lists).items() if len(ranks) == len(lists)})


def _best_first(scores: dict) -> list[tuple[K, float]]:
    return sorted(scores.items(), key=lambda item: -item[1])  # stable: ties keep first-met order


def fuse(lists: Sequence[Ranked], method: str = "rrf") -> list[tuple[K, float]]:
    if method == "rrf":
        return reciprocal_rank(lists)
    if method == "sum":
        return score_sum(lists)
    if method == "union":
        return union(lists)
    if method == "intersection":
        return intersection(lists)
    raise ConfigError(f"unknown fusion {method!r} (expected one of {', '.join(FUSIONS)})")
