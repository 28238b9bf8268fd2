"""The hybrid index: one normalisation on both paths, keyword and dense searches deduplicated to
functions, save/reload identical, another embedder refused; and the real MiniLM on the fixture."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from helpers import FIXTURES

from dialogtune.errors import DataError, ModelError
from dialogtune.retrieval.embedder import embed, load_embedder, normalize
from dialogtune.retrieval.exemplars import Exemplar, extract_sgd_exemplars
from dialogtune.retrieval.index import build_index, keyword_text, load_index, save_index, template_text
from dialogtune.retrieval.schemas import Function, read_functions

SGD_FIXTURE = FIXTURES / "retrieval" / "sgd"
HANDWRITTEN = [
    Exemplar("Weather_1__GetWeather", None, "What's the weather like in <city> on <date>?", {}, ("hand", 0)),
    Exemplar("Weather_1__GetWeather", None, "Will it rain in <city>?", {}, ("hand", 1)),
    Exemplar("Restaurants_1__FindRestaurants", None, "Find me a <cuisine> restaurant in <city>.", {}, ("hand", 2)),
    Exemplar("Music_1__PlaySong", None, "Play some music by <artist>.", {}, ("hand", 3)),
]
QUERIES = ["Will it rain in Paris tomorrow?", "hail a cab to the airport", "play a song", "the the the"]


@pytest.fixture(scope="module")
def corpus():
    extracted, _ = extract_sgd_exemplars(SGD_FIXTURE)
    return read_functions(SGD_FIXTURE), extracted + HANDWRITTEN


@pytest.fixture(scope="module")
def tiny_embedder(tiny_embedder_dir):
    return load_embedder(str(tiny_embedder_dir))


@pytest.fixture(scope="module")
def index(corpus, tiny_embedder_dir, tiny_embedder):
    functions, exemplars = corpus
    return build_index(functions, exemplars, embedder=str(tiny_embedder_dir), model=tiny_embedder)


def test_texts_for_embedding_and_keywords():
    assert template_text("Book at <restaurant_name> in <city>.") == "Book at restaurant name in city."
    assert keyword_text("Restaurants_1__ReserveRestaurant getWeather") == "Restaurants 1  Reserve Restaurant get Weather"


def test_normalisation_is_identical_on_the_index_and_query_paths(index, tiny_embedder):
    # the tiny model has no Normalize module: its raw vectors are not unit length
    assert not np.allclose(np.linalg.norm(tiny_embedder.encode(["Will it rain in Paris?"]), axis=1), 1.0)
    templates = [template_text(e.template) for e in index.exemplars]
    for row, text in enumerate(templates):  # the index embedded them in one batch, the query alone
        np.testing.assert_allclose(embed(tiny_embedder, [text])[0], index.exemplar_vectors[row], atol=1e-6)
    np.testing.assert_allclose(embed(tiny_embedder, [index.functions[2].description])[0], index.description_vectors[2],
                               atol=1e-6)
    for vectors in (index.exemplar_vectors, index.description_vectors):
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(normalize(np.array([[3.0, 4.0], [0.0, 0.0]])),
                                  np.array([[0.6, 0.8], [0.0, 0.0]], dtype=np.float32))


def test_only_templated_owned_exemplars_are_indexed(index, corpus):
    assert [e.template for e in index.exemplars] == [e.template for e in corpus[1] if e.template and e.function]
    assert len(index.exemplars) == 4 + len(HANDWRITTEN)


def test_keyword_search_finds_the_functions_sharing_a_word(index):
    hits = index.search("hail a cab to the airport")
    # "cab" occurs only in the ride template; "a", "to", "the" are stop words, the rest unknown
    assert [name for name, _ in hits.exemplars_keyword] == ["RideSharing_2__GetRide"]
    assert hits.exemplars_keyword[0][1] > 0
    assert index.search("the the the").exemplars_keyword == []  # stop words only: no keyword hit


def test_searches_give_top_k_functions_each_with_at_most_max_exemplars(index):
    hits = index.search("Will it rain in Paris tomorrow?", top_k=2, max_exemplars=1)
    assert len(hits.descriptions) == 2 and len(hits.exemplars_dense) == 2
    assert len({name for name, _ in hits.exemplars_dense}) == 2
    assert all(len(rows) == 1 for rows in hits.exemplar_rows.values())
    all_hits = index.search("Will it rain in Paris tomorrow?", top_k=8)
    assert len(all_hits.descriptions) == len(index.functions)  # top_k larger than the corpus
    weather = [index.exemplars[row].template for row in all_hits.exemplar_rows["Weather_1__GetWeather"]]
    assert sorted(weather) == sorted(["Play Yellow Submarine and tell me the weather in <city>.",
                                      "What's the weather like in <city> on <date>?", "Will it rain in <city>?"])


def test_candidates_per_fusion_rule(index):
    hits = index.search("Will it rain in Paris tomorrow?", top_k=3)
    by_rule = {rule: index.candidates(hits, rule) for rule in ("rrf", "sum", "union", "intersection")}
    names = {rule: [c.function.name for c in candidates] for rule, candidates in by_rule.items()}
    found = {name for hits_list in (hits.descriptions, hits.exemplars_dense, hits.exemplars_keyword)
             for name, _ in hits_list}
    assert set(names["rrf"]) == set(names["sum"]) == set(names["union"]) == found
    assert set(names["intersection"]) <= found
    for candidate in by_rule["rrf"]:
        assert [e.function for e in candidate.exemplars] == [candidate.function.name] * len(candidate.exemplars)
    scores = [c.score for c in by_rule["rrf"]]
    assert scores == sorted(scores, reverse=True)


def test_save_and_reload_give_identical_results(index, tmp_path, tiny_embedder_dir):
    save_index(index, tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["embedder"] == str(tiny_embedder_dir.resolve()) and manifest["dimension"] == 32
    assert (manifest["normalisation"], manifest["query_instruction"], manifest["exemplars"]) == ("l2-float32", "", 8)
    reloaded = load_index(tmp_path / "index")  # loads its own embedder from the manifest
    assert reloaded.functions == index.functions and reloaded.exemplars == index.exemplars
    np.testing.assert_array_equal(reloaded.exemplar_vectors, index.exemplar_vectors)
    for query in QUERIES:
        for rule in ("rrf", "sum", "union", "intersection"):
            assert reloaded.retrieve(query, fusion=rule) == index.retrieve(query, fusion=rule)
    save_index(reloaded, tmp_path / "index")  # an index directory may be replaced


def test_the_vector_index_path_finds_what_exact_search_finds_and_reloads(corpus, index, tmp_path, tiny_embedder_dir,
                                                                        tiny_embedder):
    functions, exemplars = corpus
    approximate = build_index(functions, exemplars, embedder=str(tiny_embedder_dir), model=tiny_embedder,
                              vector_index_from=1)
    assert approximate.vectors is not None and index.vectors is None
    assert len(approximate.vectors) == len(approximate.exemplars) == 8
    excluded = approximate.exemplars[0].source[0]
    for query in QUERIES:  # 8 templates: the HNSW search reads them all, so it must agree exactly
        assert approximate.retrieve(query, top_k=2, max_exemplars=1) == index.retrieve(query, top_k=2, max_exemplars=1)
        assert approximate.retrieve(query, exclude_group=excluded) == index.retrieve(query, exclude_group=excluded)
    save_index(approximate, tmp_path / "ann")
    assert json.loads((tmp_path / "ann" / "manifest.json").read_text())["dense_search"] == "usearch"
    reloaded = load_index(tmp_path / "ann", model=tiny_embedder)
    assert reloaded.vectors is not None
    assert [reloaded.retrieve(q) for q in QUERIES] == [index.retrieve(q) for q in QUERIES]
    (tmp_path / "ann" / "exemplars.usearch").unlink()
    with pytest.raises(DataError, match="exemplars.usearch is missing"):
        load_index(tmp_path / "ann", model=tiny_embedder)


def test_another_embedder_is_refused(index, tmp_path):
    save_index(index, tmp_path / "index")
    with pytest.raises(ModelError, match="built with the embedder .*tiny-embedder.*not 'minilm-l6-v2'"):
        load_index(tmp_path / "index", embedder="minilm-l6-v2")


def test_an_edited_corpus_or_a_foreign_directory_is_refused(index, tmp_path, tiny_embedder):
    save_index(index, tmp_path / "index")
    tools = tmp_path / "index" / "tools.json"
    tools.write_text(tools.read_text().replace("Find a restaurant", "Find a bar"))
    with pytest.raises(DataError, match="changed since the index was built"):
        load_index(tmp_path / "index", model=tiny_embedder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a retrieval index"):
        save_index(index, tmp_path / "other")
    with pytest.raises(DataError, match="not a retrieval index"):
        load_index(tmp_path / "other")


def test_exemplars_of_unknown_functions_are_refused(tiny_embedder):
    functions = [Function("Weather_1__GetWeather", "Get the weather")]
    with pytest.raises(DataError, match="missing from the schemas given.*'Music_1__PlaySong'"):
        build_index(functions, [Exemplar("Music_1__PlaySong", None, "Play <song_name>")], model=tiny_embedder)


def test_schema_only_index(tiny_embedder, tiny_embedder_dir, tmp_path):
    functions = read_functions(SGD_FIXTURE)
    index = build_index(functions, [], embedder=str(tiny_embedder_dir), model=tiny_embedder)
    candidates = index.retrieve("Will it rain?", top_k=3)
    assert len(candidates) == 3 and all(c.exemplars == () for c in candidates)
    save_index(index, tmp_path / "index")
    assert load_index(tmp_path / "index", model=tiny_embedder).retrieve("Will it rain?", top_k=3) == candidates


def test_real_minilm_finds_the_matching_function_first(corpus):
    functions, exemplars = corpus
    started = time.perf_counter()
    index = build_index(functions, exemplars)  # the embedded default, offline
    built = time.perf_counter() - started
    queries = {"Is it going to be sunny in Berlin this weekend?": "Weather_1__GetWeather",
               "Please call me a taxi to the train station.": "RideSharing_2__GetRide",
               "Reserve a table for two at Nopa tonight.": "Restaurants_1__ReserveRestaurant",
               "I want to hear something by the Beatles.": "Music_1__PlaySong"}
    timings = []
    for query, expected in queries.items():
        started = time.perf_counter()
        candidates = index.retrieve(query)
        timings.append(time.perf_counter() - started)
        assert candidates[0].function.name == expected, (query, [c.function.name for c in candidates])
    print(f"\nMiniLM: load + build {built:.2f}s, query {1000 * min(timings):.1f}-{1000 * max(timings):.1f} ms")


def test_a_search_restricted_to_some_functions_finds_only_those(index):
    allowed = {"Music_1__PlaySong", "Weather_1__GetWeather"}
    for query in QUERIES:
        hits = index.search(query, top_k=5, allowed=allowed)
        found = {name for name, _ in hits.descriptions + hits.exemplars_dense + hits.exemplars_keyword}
        assert found <= allowed and {name for name, _ in hits.descriptions} == allowed
        assert all(index.exemplars[row].function in allowed for rows in hits.exemplar_rows.values() for row in rows)
        assert {c.function.name for c in index.retrieve(query, allowed=allowed)} == allowed
