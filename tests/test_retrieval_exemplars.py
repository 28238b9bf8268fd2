"""Exemplars from SGD turns (spans -> template and arguments, skipped templates counted) and
hand-written exemplar files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import FIXTURES, SHARED_DATA

from dialogtune.errors import DataError
from dialogtune.retrieval.exemplars import Exemplar, build_template, extract_sgd_exemplars, load_exemplars
from dialogtune.retrieval.schemas import read_functions

SGD_FIXTURE = FIXTURES / "retrieval" / "sgd"


def test_fixture_exemplars_exactly():
    exemplars, stats = extract_sgd_exemplars(SGD_FIXTURE)
    assert exemplars == [
        Exemplar(None, "Hi there.", None, {}, ("2_00000", 0)),
        # party_size has no span (SGD never spans categorical values): an argument, not a placeholder
        Exemplar("Restaurants_1__ReserveRestaurant", "Book me a table for 4 at Sushi Ran in Sausalito.",
                 "Book me a table for 4 at <restaurant_name> in <city>.",
                 {"restaurant_name": "Sushi Ran", "city": "Sausalito", "party_size": "4"}, ("2_00000", 2)),
        # turn 4 changes party_size under the same intent: not an activation. Turn 6 changes the
        # intent; "Oakland" occurs twice, so no template, but the arguments stand (restaurant_name
        # and party_size are carried over in the state, not said here)
        Exemplar("Restaurants_1__FindRestaurants", "Now find Thai food in Oakland, any Thai place in Oakland.", None,
                 {"cuisine": "Thai", "city": "Oakland"}, ("2_00000", 6)),
        Exemplar(None, "That's all, thanks.", None, {}, ("2_00000", 8)),
        # two frames becoming active in one turn: one exemplar each, each with its own spans
        Exemplar("Music_1__PlaySong", "Play Yellow Submarine and tell me the weather in Paris.",
                 "Play <song_name> and tell me the weather in Paris.", {"song_name": "Yellow Submarine"}, ("2_00001", 0)),
        Exemplar("Weather_1__GetWeather", "Play Yellow Submarine and tell me the weather in Paris.",
                 "Play Yellow Submarine and tell me the weather in <city>.", {"city": "Paris"}, ("2_00001", 0)),
        # Music_1 went back to NONE at turn 2 (not a negative: Weather_1 stayed active), so PlaySong
        # is active anew; its span runs past the utterance
        Exemplar("Music_1__PlaySong", "Play Hey Jude now.", None, {}, ("2_00001", 4)),
        # the raw utterance has leading spaces: spans index it, the template is on the cleaned text
        Exemplar("RideSharing_2__GetRide", "Get me a cab to Union Square for 2.", "Get me a cab to <destination> for 2.",
                 {"destination": "Union Square", "number_of_riders": "2"}, ("2_00001", 6)),
    ]
    assert (stats.user_turns, stats.activations, stats.templates, stats.negatives, stats.rejects) == (9, 6, 4, 2, 0)
    assert stats.templates_skipped == Counter({"value occurs more than once": 1, "span out of range": 1})


def test_original_sgd_fixture_and_its_rejected_turn():
    exemplars, stats = extract_sgd_exemplars(FIXTURES / "sgd")
    assert [(e.function, e.template, e.arguments) for e in exemplars] == [
        ("Restaurants_1__FindRestaurants", "I'd like to find a restaurant in <city> for dinner.", {"city": "San Jose"}),
        # restaurant_name entered the state from the system's offer, not from this utterance
        ("Restaurants_1__ReserveRestaurant", "Great, book a table for 2 there.", {"party_size": "2"}),
        ("Weather_1__GetWeather", "Is it going to rain in <city> <date>?", {"city": "Portland", "date": "tomorrow"}),
        ("RideSharing_2__GetRide", "Thanks, then get me a cab to the <destination>.", {"destination": "Rose Garden"}),
    ]
    assert (stats.user_turns, stats.activations, stats.templates, stats.negatives, stats.rejects) == (5, 4, 4, 0, 1)


@pytest.mark.parametrize(("utterance", "spans", "expected"), [
    ("fly to Rome at 5", [("city", "Rome"), ("time", "5")], ("fly to <city> at <time>", None)),
    ("fly to Rome at 5", [("time", "5"), ("city", "Rome")], ("fly to <city> at <time>", None)),
    ("a table for two", [], ("a table for two", None)),
    ("fly to Rome", [("city", "Paris")], (None, "value not found")),
    ("2 tickets at 2 pm", [("count", "2")], (None, "value occurs more than once")),
    ("stay at New York Hotel", [("city", "New York"), ("hotel", "York Hotel")], (None, "values overlap")),
])
def test_build_template(utterance, spans, expected):
    assert build_template(utterance, spans) == expected


def test_hand_written_exemplars_json_and_yaml(tmp_path):
    functions = read_functions(SGD_FIXTURE)
    (tmp_path / "ex.yaml").write_text(
        "Restaurants_1__ReserveRestaurant:\n"
        "  - template: Can I reserve a table at <restaurant_name> for <party_size>?\n"
        "  - template: book <restaurant_name> please\n"
        "    utterance: book Chez Panisse please\n"
        "    arguments: {restaurant_name: Chez Panisse}\n")
    (tmp_path / "ex.json").write_text(json.dumps({"Music_1__PlaySong": [{"template": "put on <song_name>"}]}))
    yaml_path = str(tmp_path / "ex.yaml")
    assert load_exemplars(tmp_path / "ex.yaml", functions) == [
        Exemplar("Restaurants_1__ReserveRestaurant", None, "Can I reserve a table at <restaurant_name> for <party_size>?",
                 {}, (yaml_path, 0)),
        Exemplar("Restaurants_1__ReserveRestaurant", "book Chez Panisse please", "book <restaurant_name> please",
                 {"restaurant_name": "Chez Panisse"}, (yaml_path, 1)),
    ]
    assert load_exemplars(tmp_path / "ex.json", functions) == [
        Exemplar("Music_1__PlaySong", None, "put on <song_name>", {}, (str(tmp_path / "ex.json"), 0))]


@pytest.mark.parametrize(("text", "message"), [
    ("Restaurants_1.ReserveRestaurant:\n  - template: hi\n", "function 'Restaurants_1.ReserveRestaurant' is not in the schemas"),
    ("Music_1__PlaySong:\n  - template: play <artist>\n",
     "Music_1__PlaySong[0]: template placeholder <artist> is not a parameter of Music_1__PlaySong (expected one of song_name)"),
    ("Music_1__PlaySong:\n  - utterance: play it\n", "Music_1__PlaySong[0]: expected a mapping with a string field 'template'"),
    ("Music_1__PlaySong: [\n", "ex.yaml:2:1: not valid YAML"),
])
def test_hand_written_exemplar_errors_name_file_and_function(tmp_path, text, message):
    (tmp_path / "ex.yaml").write_text(text)
    with pytest.raises(DataError, match=r"ex\.yaml") as err:
        load_exemplars(tmp_path / "ex.yaml", read_functions(SGD_FIXTURE))
    assert message in str(err.value)


def test_services_without_a_schema_are_refused(tmp_path):
    (tmp_path / "dialogues_001.json").write_text((SGD_FIXTURE / "dialogues_001.json").read_text())
    (tmp_path / "schema.json").write_text("[]")
    with pytest.raises(DataError, match="dialogue 2_00000: service 'Restaurants_1' has no schema"):
        extract_sgd_exemplars(tmp_path)


SGD_TRAIN = SHARED_DATA / "sgd" / "train"


@pytest.mark.skipif(not (SGD_TRAIN / "schema.json").exists(), reason="no SGD data in ../shared/data")
def test_real_sgd_train_counts_are_self_consistent():
    exemplars, stats = extract_sgd_exemplars(SGD_TRAIN)
    print(f"\nSGD train: {stats}")
    owned = [e for e in exemplars if e.function is not None]
    assert len(owned) == stats.activations
    assert len(exemplars) - len(owned) == stats.negatives
    assert stats.templates + sum(stats.templates_skipped.values()) == stats.activations
    assert sum(e.template is not None for e in owned) == stats.templates
    assert set(stats.templates_skipped) <= {"value not found", "value occurs more than once", "values overlap",
                                            "span out of range"}
    known = {f.name: f for f in read_functions(SGD_TRAIN)}
    assert {e.function for e in owned} <= set(known)
    # every templated placeholder is the owner service's slot, and every argument is a slot too
    raw = json.loads((SGD_TRAIN / "schema.json").read_text())
    slots = {s["service_name"]: {slot["name"] for slot in s["slots"]} for s in raw}
    assert all(set(e.arguments) <= slots[known[e.function].service] for e in owned)
    # activations counted independently from the raw files
    activations = 0
    for file in sorted(Path(SGD_TRAIN).glob("dialogues_*.json")):
        for dialogue in json.loads(file.read_text()):
            last: dict[str, str] = {}
            for turn in dialogue["turns"]:
                for frame in turn["frames"] if turn["speaker"] == "USER" else []:
                    intent = frame["state"]["active_intent"]
                    activations += intent not in ("NONE", last.get(frame["service"], "NONE"))
                    last[frame["service"]] = intent
    assert stats.activations == activations


def test_read_exemplars_says_what_each_sgd_source_held_back():
    from dialogtune.retrieval.exemplars import read_exemplars

    exemplars, notes = read_exemplars([SGD_FIXTURE], read_functions(SGD_FIXTURE))
    assert exemplars == extract_sgd_exemplars(SGD_FIXTURE)[0]
    assert notes == [(f"{SGD_FIXTURE}: 0 record(s) refused by the SGD reader; 2 template(s) not built"
                      " (1 value occurs more than once, 1 span out of range)")]
