"""Each merge rule on a constructed case with known ranks: exact order and scores."""

from __future__ import annotations

import pytest

from dialogtune.errors import ConfigError
from dialogtune.retrieval.fusion import fuse, min_max

# Dense cosines and BM25 scores: different scales, as in the hybrid retriever.
DENSE = [("a", 0.9), ("b", 0.8), ("c", 0.1)]
KEYWORD = [("c", 12.0), ("a", 3.0), ("d", 1.0)]


def test_reciprocal_rank_fusion():
    fused = fuse([DENSE, KEYWORD], "rrf")
    assert [key for key, _ in fused] == ["a", "c", "b", "d"]
    assert dict(fused) == pytest.approx({"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62, "d": 1 / 63})


def test_score_sum_normalises_each_list_first():
    fused = fuse([DENSE, KEYWORD], "sum")
    assert [key for key, _ in fused] == ["a", "c", "b", "d"]
    assert dict(fused) == pytest.approx({"a": 1 + 2 / 11, "c": 0 + 1, "b": 0.875, "d": 0.0})
    # adding the raw scores (the original system's rule) lets BM25's scale decide alone: c first
    raw = {key: sum(score for k, score in DENSE + KEYWORD if k == key) for key in "abcd"}
    assert max(raw, key=raw.get) == "c"


def test_union_by_best_rank():
    fused = fuse([DENSE, KEYWORD], "union")
    # a and c are both first somewhere: the tie keeps first-met order (the first list's)
    assert fused == [("a", 1.0), ("c", 1.0), ("b", 0.5), ("d", pytest.approx(1 / 3))]


def test_intersection_by_worst_rank():
    assert fuse([DENSE, KEYWORD], "intersection") == [("a", 0.5), ("c", pytest.approx(1 / 3))]
    assert fuse([DENSE, []], "intersection") == []


def test_min_max_edge_cases():
    assert min_max([]) == []
    assert min_max([("x", 2.0), ("y", 2.0)]) == [("x", 1.0), ("y", 1.0)]
    assert min_max([("x", -1.0), ("y", -3.0)]) == [("x", 1.0), ("y", 0.0)]


def test_one_list_keeps_its_order_under_every_rule():
    for method in ("rrf", "sum", "union", "intersection"):
        assert [key for key, _ in fuse([DENSE], method)] == ["a", "b", "c"]


def test_unknown_rule_is_refused():
    with pytest.raises(ConfigError, match="unknown fusion 'max'.*rrf, sum, union, intersection"):
        fuse([DENSE], "max")
