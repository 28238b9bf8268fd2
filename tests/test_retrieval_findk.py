"""findk: recall@k, smallest k, percentiles and the seen/unseen split exact on fixed rankings;
one search at K equals separate searches at each k; seen queries refused; the report written."""

from __future__ import annotations

import json

import pytest
from helpers import FIXTURES

from dialogtune.cli import main
from dialogtune.errors import DataError
from dialogtune.retrieval.embedder import load_embedder
from dialogtune.retrieval.exemplars import Exemplar, extract_sgd_exemplars
from dialogtune.retrieval.findk import Query, find_k, nearest_rank, read_queries, write_report
from dialogtune.retrieval.fusion import fuse
from dialogtune.retrieval.index import Hits, build_index, save_index
from dialogtune.retrieval.schemas import Function, read_functions

SGD_FIXTURE = FIXTURES / "retrieval" / "sgd"


class FixedIndex:
    """An index whose searches return fixed rankings, cut to top_k like the real one."""

    def __init__(self, rankings: dict[str, tuple[list, list, list]]):
        self.functions = [Function(name, name) for name in ("A__Find", "A__Book", "B__Get", "C__Show")]
        self.by_name = {f.name: f for f in self.functions}
        # services A and C have exemplars (A__Book has none, but its service does); B has only its schema
        self.exemplars = [Exemplar("A__Find", "find one", "find <x>", {}, ("train", 0)),
                          Exemplar("C__Show", "show it", "show it", {}, ("train", 1))]
        self.embedder = "fixed"
        self.rankings = rankings

    def search(self, utterance, top_k=8, max_exemplars=8):
        descriptions, dense, keyword = self.rankings[utterance]
        return Hits(descriptions[:top_k], dense[:top_k], keyword[:top_k])


RANKINGS = {  # utterance: (descriptions, exemplars dense, exemplars keyword)
    "q1": ([("A__Find", 0.9), ("B__Get", 0.5), ("C__Show", 0.1)], [("A__Find", 0.8)],
           [("C__Show", 5.0), ("A__Find", 2.0)]),
    "q2": ([("B__Get", 0.7), ("A__Book", 0.6), ("A__Find", 0.4)], [("A__Find", 0.7), ("C__Show", 0.3)], []),
    "q3": ([("A__Find", 0.5), ("C__Show", 0.4), ("B__Get", 0.3)], [("A__Find", 0.6), ("C__Show", 0.2)],
           [("A__Find", 1.0)]),
    "q4": ([("A__Find", 0.5), ("A__Book", 0.45), ("C__Show", 0.2)], [("C__Show", 0.9)], []),
}
QUERIES = [Query("q1", "A__Find", ("dev", 1)), Query("q2", "A__Book", ("dev", 2)),
           Query("q3", "B__Get", ("dev", 3)), Query("q4", "B__Get", ("dev", 4))]
RRF = [1 / 61, 1 / 62, 1 / 63]


@pytest.fixture(scope="module")
def fixed_result():
    return find_k(FixedIndex(RANKINGS), QUERIES, max_k=3, target=0.98, progress=False)


def test_recall_at_each_k_per_search_and_group(fixed_result):
    groups = fixed_result[0]["groups"]
    recall = {(group, name): groups[group][name]["recall"] for group in groups for name in groups[group]}
    assert recall["all", "descriptions"] == [0.25, 0.5, 0.75]
    assert recall["seen", "descriptions"] == [0.5, 1.0, 1.0]  # q1 (A__Find), q2 (A__Book: service A is seen)
    assert recall["unseen", "descriptions"] == [0.0, 0.0, 0.5]  # q3, q4 (B__Get: schema only)
    assert recall["all", "exemplars_dense"] == [0.25, 0.25, 0.25]
    assert recall["all", "exemplars_keyword"] == [0.0, 0.25, 0.25]  # q1's A__Find is second by keyword
    assert recall["all", "exemplars"] == [0.25, 0.25, 0.25]  # dense[:1] already holds q1's gold
    assert recall["seen", "exemplars"] == [0.5, 0.5, 0.5] and recall["unseen", "exemplars"] == [0.0, 0.0, 0.0]
    assert recall["all", "hybrid"] == [0.25, 0.5, 0.75]
    assert recall["seen", "hybrid"] == [0.5, 1.0, 1.0] and recall["unseen", "hybrid"] == [0.0, 0.0, 0.5]
    assert [groups[g]["hybrid"]["queries"] for g in ("all", "seen", "unseen")] == [4, 2, 2]
    # hybrid candidates at k=1: q1 {A__Find, C__Show}, q2 {B__Get, A__Find}, q3 {A__Find}, q4 {A__Find, C__Show}
    assert groups["all"]["hybrid"]["mean_candidates"][0] == 7 / 4


def test_smallest_k_or_best_recall(fixed_result):
    groups = fixed_result[0]["groups"]
    assert (groups["seen"]["hybrid"]["smallest_k"], groups["seen"]["descriptions"]["smallest_k"]) == (2, 2)
    assert (groups["unseen"]["hybrid"]["smallest_k"], groups["unseen"]["hybrid"]["best_recall"]) == (None, 0.5)
    assert (groups["all"]["exemplars"]["smallest_k"], groups["all"]["exemplars"]["best_recall"]) == (None, 0.25)
    lower = find_k(FixedIndex(RANKINGS), QUERIES, max_k=3, target=0.5, progress=False)[0]["groups"]
    assert lower["all"]["descriptions"]["smallest_k"] == 2 and lower["unseen"]["descriptions"]["smallest_k"] == 3


def test_rank_and_score_percentiles_of_the_first_correct_hit(fixed_result):
    groups = fixed_result[0]["groups"]
    descriptions = groups["all"]["descriptions"]  # gold ranks 1, 2, 3 with scores 0.9, 0.6, 0.3; q4 missed
    assert descriptions["found_at_max_k"] == 3
    assert descriptions["rank"] == {"p50": 2, "p90": 3, "p99": 3}
    assert descriptions["score"] == {"p1": 0.3, "p5": 0.3}
    # hybrid at K=3 (RRF): q1 A__Find first; q2 [A__Find, B__Get, A__Book, C__Show] (A__Book met before C__Show);
    # q3 [A__Find, C__Show, B__Get]
    hybrid = groups["all"]["hybrid"]
    assert hybrid["rank"] == {"p50": 3, "p90": 3, "p99": 3}
    assert hybrid["score"] == {"p1": pytest.approx(RRF[2]), "p5": pytest.approx(RRF[2])}
    assert groups["seen"]["hybrid"]["rank"] == {"p50": 1, "p90": 3, "p99": 3}
    assert groups["seen"]["exemplars"]["score"]["p1"] == pytest.approx(RRF[0] + RRF[1])
    assert groups["unseen"]["exemplars"]["rank"] == {"p50": None, "p90": None, "p99": None}
    assert nearest_rank([5, 1, 4, 2, 3], 50) == 3 and nearest_rank([5, 1, 4, 2, 3], 1) == 1
    assert nearest_rank([5, 1, 4, 2, 3], 90) == 5 and nearest_rank([], 50) is None


def test_misses_list_their_candidates(fixed_result):
    results, misses = fixed_result
    assert results["misses"] == 1 and results["queries"] == 4 and results["dropped_seen"] == 0
    assert misses == [{
        "utterance": "q4", "function": "B__Get", "group": "unseen", "source": ["dev", 4],
        "ranks": dict.fromkeys(("descriptions", "exemplars_dense", "exemplars_keyword", "exemplars", "hybrid")),
        "candidates": [{"function": name, "score": score} for name, score in
                       fuse([RANKINGS["q4"][0], RANKINGS["q4"][1], []])],
    }]
    assert [c["function"] for c in misses[0]["candidates"]] == ["C__Show", "A__Find", "A__Book"]
    assert set(results["latency_ms"]) == {"p50", "p95", "mean"} and results["latency_ms"]["p50"] >= 0


def test_queries_the_index_has_seen_are_refused_or_dropped():
    index = FixedIndex({**RANKINGS, "show it": RANKINGS["q1"], "find one": RANKINGS["q1"]})
    queries = [*QUERIES, Query("show it", "C__Show", ("dev", 9)), Query("find one", "A__Find", ("dev", 10))]
    with pytest.raises(DataError, match=r"2 of 6 queries are utterances the index already holds, e.g. 'show it' "
                                        r"\(C__Show, from dev:9\).*--drop-seen"):
        find_k(index, queries, max_k=3, progress=False)
    results, _ = find_k(index, queries, max_k=3, drop_seen=True, progress=False)
    assert (results["queries"], results["dropped_seen"]) == (4, 2)
    assert results["groups"]["all"]["descriptions"]["recall"] == [0.25, 0.5, 0.75]
    # a template without slots is text the index holds too; the same source with new text is not
    with pytest.raises(DataError, match="1 of 1 queries"):
        find_k(FixedIndex({"show it": RANKINGS["q1"]}), [Query("show it", "C__Show", ("x", 0))], progress=False)
    find_k(FixedIndex(RANKINGS), [Query("q1", "A__Find", ("train", 0))], max_k=3, progress=False)
    with pytest.raises(DataError, match="1 queries name functions the index does not hold, e.g. 'Z__Nope'"):
        find_k(FixedIndex(RANKINGS), [Query("q1", "Z__Nope")], max_k=3, progress=False)


def test_report_files(fixed_result, tmp_path):
    results, misses = fixed_result
    write_report(results, misses, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "findk.json").read_text())
    assert written["groups"]["seen"]["hybrid"]["recall"] == [0.5, 1.0, 1.0]
    assert written["groups"]["unseen"]["hybrid"]["smallest_k"] is None
    assert written == json.loads(json.dumps(results))
    lines = (tmp_path / "out" / "misses.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == misses
    markdown = (tmp_path / "out" / "findk.md").read_text()
    # mean hybrid candidates: seen q1 {A__Find, C__Show} then + B__Get, q2 {B__Get, A__Find} then + A__Book, C__Show
    assert "| seen | hybrid | 2 | 0.500 (2.0) | 1.000 (3.5) | 1.000 (3.5) | 2 | 1/3/3 | 0.016/0.016 |" in markdown
    assert "| unseen | hybrid | 2 | 0.000 (1.5) | 0.000 (2.5) | 0.500 (3.0) | not reached (best 0.500) | 3/3/3 |" in markdown
    assert "| unseen | exemplars | 2 | 0.000 | 0.000 | 0.000 | not reached (best 0.000) | –/–/– | –/– |" in markdown
    png = (tmp_path / "out" / "recall.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


@pytest.fixture(scope="module")
def tiny_index(tiny_embedder_dir):
    functions = read_functions(SGD_FIXTURE)
    handwritten = [Exemplar("Weather_1__GetWeather", None, "Will it rain in <city>?", {}, ("hand", 0)),
                   Exemplar("Restaurants_1__FindRestaurants", None, "Find me a <cuisine> restaurant.", {}, ("hand", 1)),
                   Exemplar("Music_1__PlaySong", None, "Play some music by <artist>.", {}, ("hand", 2))]
    return build_index(functions, handwritten, embedder=str(tiny_embedder_dir),
                       model=load_embedder(str(tiny_embedder_dir)))


@pytest.mark.parametrize("fusion", ["rrf", "intersection"])
def test_one_search_at_max_k_equals_separate_searches_at_each_k(tiny_index, fusion):
    queries = read_queries([SGD_FIXTURE])  # the fixture's dialogues; the index holds only hand-written templates
    max_k = len(tiny_index.functions) + 1
    results, _ = find_k(tiny_index, queries, max_k=max_k, fusion=fusion, progress=False)
    for k in range(1, max_k + 1):
        found = {"descriptions": 0, "hybrid": 0}
        for query in queries:
            hits = tiny_index.search(query.utterance, top_k=k)
            found["descriptions"] += query.function in [name for name, _ in hits.descriptions]
            found["hybrid"] += query.function in [c.function.name for c in tiny_index.candidates(hits, fusion)]
        for name, count in found.items():
            assert results["groups"]["all"][name]["recall"][k - 1] == count / len(queries), (name, k)


def test_read_queries_from_sgd_and_jsonl(tmp_path):
    queries = read_queries([SGD_FIXTURE])
    exemplars, _ = extract_sgd_exemplars(SGD_FIXTURE)
    assert [q.function for q in queries] == [e.function for e in exemplars if e.function]  # negatives left out
    path = tmp_path / "q.jsonl"
    path.write_text('{"utterance": "Will it rain?", "function": "Weather_1__GetWeather"}\n\n{"utterance": 3}\n')
    with pytest.raises(DataError, match=r"q.jsonl:3: expected"):
        read_queries([path])
    path.write_text('{"utterance": "Will it rain?", "function": "Weather_1__GetWeather"}\n')
    assert read_queries([path]) == [Query("Will it rain?", "Weather_1__GetWeather", (str(path), 1))]


def test_cli_findk(tiny_index, tmp_path, capsys):
    save_index(tiny_index, tmp_path / "index")
    code = main(["findk", str(tmp_path / "index"), "--queries", str(SGD_FIXTURE), "-K", "4", "-o", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "findk.json").read_text())
    assert results["max_k"] == 4 and results["queries"] == len(read_queries([SGD_FIXTURE]))
    assert f"{results['queries']} queries (0 dropped as seen)" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"findk.json", "findk.md", "misses.jsonl", "recall.png"}
    # an index holding the fixture's own exemplars has seen these queries
    functions = read_functions(SGD_FIXTURE)
    seen = build_index(functions, extract_sgd_exemplars(SGD_FIXTURE)[0], embedder=tiny_index.embedder,
                       model=tiny_index.model)
    save_index(seen, tmp_path / "seen-index")
    code = main(["findk", str(tmp_path / "seen-index"), "--queries", str(SGD_FIXTURE), "-o", str(tmp_path / "x")])
    assert code == 2 and "queries are utterances the index already holds" in capsys.readouterr().err
