"""How many candidates must retrieval hand on? Recall of the gold function for k = 1..K.

    dialogtune findk sgd-index --queries sgd/dev -o findk-base
    result = find_k(load_index(Path("sgd-index")), read_queries([Path("sgd/dev")]), max_k=16)

`k` is what `dialogtune retrieve -k` means: the functions each search hands on. Five lists are
scored: descriptions (dense), exemplars dense, exemplars keyword (BM25), exemplars (the two
fused) and hybrid (all three fused, the candidates `retrieve` gives: up to 3k functions, so their
mean count at each k is reported too). For each list: recall@k, the smallest k whose recall
reaches the target, and percentiles of the gold function's rank and score in the list at K (the
score percentiles say where a score threshold would cut). Queries are split by service: "seen"
when the index holds an exemplar of any function of the gold function's service, "unseen" when
the service is known only by its schema.

Each query is searched ONCE, at top_k=K; the list at k is the first k functions of each search,
fused again with the same rule. For descriptions this is exactly a search at top_k=k. An exemplar
search at top_k=k reads the best k * max_exemplars templates and keeps their first k owners; the
first k owners of the K search are the same functions whenever those templates name k distinct
owners (tests check equality on the fixture). Where one function's surplus templates crowd them
out, the search at k returns fewer than k functions and the list derived here is a superset: its
recall is what a search reading enough templates to find k functions would give.

Percentiles are nearest-rank (an observed value: the smallest value at or above p% of them) over
the queries whose gold function is in the list at K.

Queries must be new to the index: a query whose utterance is the utterance (or the template) of
an indexed exemplar is refused, or dropped and counted with `drop_seen`. Sources are not compared:
SGD dialogue ids restart in each split (dev `1_00000` is not train `1_00000`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dialogtune.errors import ConfigError, DataError
from dialogtune.files import write_json, write_jsonl, write_text
from dialogtune.readers._io import base_suffix, iter_jsonl
from dialogtune.retrieval.fusion import fuse
from dialogtune.retrieval.schemas import service_of

SEARCHES = ("descriptions", "exemplars_dense", "exemplars_keyword", "exemplars", "hybrid")
SHOWN = ("descriptions", "exemplars", "hybrid")  # in the Markdown and the plot; the JSON has all
GROUPS = ("all", "seen", "unseen")
RANK_PERCENTILES = (50, 90, 99)
SCORE_PERCENTILES = (1, 5)
MISS_CANDIDATES = 5


@dataclass(frozen=True)
class Query:
    utterance: str
    function: str
    source: tuple[str, int] = ("", 0)


def read_queries(paths: Iterable[Path]) -> list[Query]:
    """SGD split directories or dialogues files (their exemplars; negatives left out), or JSONL
    files of {"utterance", "function"}."""
    from dialogtune.retrieval.exemplars import extract_sgd_exemplars

    queries = []
    for path in map(Path, paths):
        if base_suffix(path) == ".jsonl":
            queries += _jsonl_queries(path)
        else:
            exemplars, _ = extract_sgd_exemplars(path)
            queries += [Query(e.utterance, e.function, tuple(e.source)) for e in exemplars
                        if e.function is not None and e.utterance]
    if not queries:
        raise DataError(f"no queries in {', '.join(map(str, paths))}")
    return queries


def _jsonl_queries(path: Path) -> list[Query]:
    queries = []
    for number, record, error in iter_jsonl(path):
        if error:
            raise DataError(f"{path}:{number}: {error}")
        if not (isinstance(record, dict) and isinstance(record.get("utterance"), str)
                and isinstance(record.get("function"), str)):
            raise DataError(f'{path}:{number}: expected {{"utterance": "...", "function": "..."}}')
        queries.append(Query(record["utterance"], record["function"], (str(path), number)))
    return queries


def seen_queries(index, queries: Sequence[Query]) -> list[Query]:
    """The queries whose utterance the index holds as an exemplar's utterance or template."""
    texts = {e.utterance for e in index.exemplars} | {e.template for e in index.exemplars}
    return [q for q in queries if q.utterance in texts]


def check_queries(index, queries: Sequence[Query], drop_seen: bool = False) -> tuple[list[Query], int]:
    """The queries to score and how many were dropped as seen; refuses seen queries (unless
    `drop_seen`) and gold functions the index lacks."""
    seen = seen_queries(index, queries)
    if seen and not drop_seen:
        first = seen[0]
        raise DataError(f"{len(seen)} of {len(queries)} queries are utterances the index already holds, e.g. "
                        f"{first.utterance!r} ({first.function}, from {first.source[0]}:{first.source[1]}): "
                        "query with data the index never saw, or pass --drop-seen to leave them out")
    unknown = [q for q in queries if q.function not in index.by_name]
    if unknown:
        raise DataError(f"{len(unknown)} queries name functions the index does not hold, e.g. "
                        f"{unknown[0].function!r}: index the schema that defines them too")
    seen_texts = {q.utterance for q in seen}
    return [q for q in queries if q.utterance not in seen_texts], len(seen)


def _lists(hits, k: int, fusion: str, with_exemplars: bool) -> dict[str, list[tuple[str, float]]]:
    """The five lists at k, from the searches at K."""
    descriptions, dense, keyword = hits.descriptions[:k], hits.exemplars_dense[:k], hits.exemplars_keyword[:k]
    return {"descriptions": descriptions, "exemplars_dense": dense, "exemplars_keyword": keyword,
            "exemplars": fuse([dense, keyword], fusion),
            "hybrid": fuse([descriptions, dense, keyword] if with_exemplars else [descriptions], fusion)}


def _gold(ranked: list[tuple[str, float]], gold: str) -> tuple[int | None, float | None]:
    for rank, (name, score) in enumerate(ranked, start=1):
        if name == gold:
            return rank, score
    return None, None


def score_query(index, query: Query, max_k: int, fusion: str, max_exemplars: int = 8) -> dict:
    """One query's outcome: for each list, whether the gold function is in it at each k, and its
    rank and score at K; the hybrid candidates at K; the search's latency."""
    started = time.perf_counter()
    hits = index.search(query.utterance, top_k=max_k, max_exemplars=max_exemplars)
    latency = time.perf_counter() - started
    with_exemplars = bool(index.exemplars)
    found = {name: [] for name in SEARCHES}
    counts = {name: [] for name in SEARCHES}
    for k in range(1, max_k + 1):
        for name, ranked in _lists(hits, k, fusion, with_exemplars).items():
            found[name].append(any(key == query.function for key, _ in ranked))
            counts[name].append(len(ranked))
    at_max = _lists(hits, max_k, fusion, with_exemplars)
    gold = {name: _gold(ranked, query.function) for name, ranked in at_max.items()}
    return {"found": found, "counts": counts, "rank": {name: rank for name, (rank, _) in gold.items()},
            "score": {name: score for name, (_, score) in gold.items()},
            "candidates": at_max["hybrid"][:MISS_CANDIDATES], "latency": latency}


def nearest_rank(values: Sequence[float], percent: float) -> float | None:
    """The smallest observed value at or above `percent`% of the values (None for none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(percent / 100 * len(ordered))) - 1]


def _summary(outcomes: list[dict], name: str, max_k: int, target: float) -> dict:
    n = len(outcomes)
    if n == 0:
        return {"queries": 0, "recall": [], "smallest_k": None, "best_recall": None}
    recall = [sum(o["found"][name][k] for o in outcomes) / n for k in range(max_k)]
    smallest = next((k + 1 for k, value in enumerate(recall) if value >= target), None)
    ranks = [o["rank"][name] for o in outcomes if o["rank"][name] is not None]
    scores = [o["score"][name] for o in outcomes if o["score"][name] is not None]
    return {"queries": n, "recall": recall, "smallest_k": smallest, "best_recall": max(recall),
            "found_at_max_k": len(ranks),
            "mean_candidates": [sum(o["counts"][name][k] for o in outcomes) / n for k in range(max_k)],
            "rank": {f"p{p}": nearest_rank(ranks, p) for p in RANK_PERCENTILES},
            "score": {f"p{p}": nearest_rank(scores, p) for p in SCORE_PERCENTILES}}


def find_k(index, queries: Sequence[Query], max_k: int = 16, target: float = 0.98, fusion: str = "rrf",
           max_exemplars: int = 8, drop_seen: bool = False, progress: bool = True) -> tuple[dict, list[dict]]:
    """(results, misses): the summary per group and list, and the queries whose gold function is
    not among the hybrid candidates at K, with the candidates they got."""
    from tqdm import tqdm

    if max_k < 1:
        raise ConfigError(f"K must be at least 1, got {max_k}")
    if not 0 < target <= 1:
        raise ConfigError(f"the target recall must be in (0, 1], got {target}")
    fuse([], fusion)  # an unknown rule fails here, before any search
    started = time.perf_counter()
    queries, dropped = check_queries(index, queries, drop_seen)
    seen_services = {service_of(e.function) for e in index.exemplars}
    outcomes, misses = [], []
    for query in tqdm(queries, desc="findk", unit="query", disable=not progress):
        outcome = score_query(index, query, max_k, fusion, max_exemplars)
        outcome["group"] = "seen" if service_of(query.function) in seen_services else "unseen"
        outcomes.append(outcome)
        if outcome["rank"]["hybrid"] is None:
            misses.append({"utterance": query.utterance, "function": query.function, "group": outcome["group"],
                           "source": list(query.source), "ranks": outcome["rank"],
                           "candidates": [{"function": name, "score": score} for name, score in outcome["candidates"]]})
    groups = {"all": outcomes, "seen": [o for o in outcomes if o["group"] == "seen"],
              "unseen": [o for o in outcomes if o["group"] == "unseen"]}
    latencies = [1000 * o["latency"] for o in outcomes]
    results = {
        "max_k": max_k, "target": target, "fusion": fusion, "max_exemplars": max_exemplars,
        "queries": len(queries), "dropped_seen": dropped,
        "index": {"functions": len(index.functions), "exemplars": len(index.exemplars),
                  "embedder": getattr(index, "embedder", None), "seen_services": len(seen_services)},
        "groups": {group: {name: _summary(members, name, max_k, target) for name in SEARCHES}
                   for group, members in groups.items()},
        "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95)),
                       "mean": float(np.mean(latencies))},
        "misses": len(misses),
        "seconds": time.perf_counter() - started,
    }
    return results, misses


# --- the report ----------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(results: dict) -> str:
    max_k, target = results["max_k"], results["target"]
    shown_k = [k for k in (1, 2, 4, 8, 16, 32) if k < max_k] + [max_k]
    lines = [f"# findk: recall of the gold function for k = 1..{max_k}", "",
             (f"{results['queries']} queries ({results['dropped_seen']} dropped as seen by the index); index: "
             f"{results['index']['functions']} functions, {results['index']['exemplars']} exemplars "
             f"({results['index']['embedder']}); fusion `{results['fusion']}`. k = functions taken from each search; "
             "hybrid candidates are their fused union (mean count in brackets)."), "",
             (f"| group | search | n | {' | '.join(f'R@{k}' for k in shown_k)} | k for {target} | "
             "rank p50/p90/p99 | score p1/p5 |"),
             "|" + "---|" * (len(shown_k) + 6)]
    for group in GROUPS:
        for name in SHOWN:
            s = results["groups"][group][name]
            if not s["queries"]:
                lines.append(f"| {group} | {name} | 0 |" + " |" * (len(shown_k) + 3))
                continue
            recalls = [_fmt(s["recall"][k - 1]) + (f" ({s['mean_candidates'][k - 1]:.1f})" if name == "hybrid" else "")
                       for k in shown_k]
            smallest = s["smallest_k"] if s["smallest_k"] else f"not reached (best {s['best_recall']:.3f})"
            ranks = "/".join(_fmt(s["rank"][f"p{p}"]) for p in RANK_PERCENTILES)
            scores = "/".join(_fmt(s["score"][f"p{p}"]) for p in SCORE_PERCENTILES)
            lines.append(f"| {group} | {name} | {s['queries']} | {' | '.join(recalls)} | {smallest} | {ranks} | {scores} |")
    latency = results["latency_ms"]
    lines += ["", (f"Query latency (embedding + three searches at K={max_k}): p50 {latency['p50']:.1f} ms, "
              f"p95 {latency['p95']:.1f} ms. Misses (gold not among the hybrid candidates at K): "
              f"{results['misses']}, listed in misses.jsonl. Total {results['seconds']:.1f}s."), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, results["max_k"] + 1))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for color, name in zip(("tab:blue", "tab:orange", "tab:green"), SHOWN, strict=True):
        for style, group in (("-", "seen"), ("--", "unseen")):
            summary = results["groups"][group][name]
            if summary["queries"]:
                axes.plot(ks, summary["recall"], style, color=color, marker=".",
                          label=f"{name}, {group} ({summary['queries']})")
    axes.axhline(results["target"], color="grey", linewidth=0.8, linestyle=":")
    axes.set(xlabel="k (functions from each search)", ylabel="recall of the gold function", ylim=(0, 1.02),
             title="findk")
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(results: dict, misses: list[dict], directory: Path) -> Path:
    """directory/: findk.json, findk.md, misses.jsonl, recall.png."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "findk.json", results)
    write_text(directory / "findk.md", markdown(results))
    write_jsonl(directory / "misses.jsonl", misses)
    plot(results, directory / "recall.png")
    return directory
