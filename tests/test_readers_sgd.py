"""Schema-Guided Dialogue: USER/SYSTEM turns with their frames, dialogues with their schemas."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from helpers import FIXTURES, SHARED_DATA, split_items

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.errors import DataError
from dialogtune.readers import detect_format, read_dialogues, sgd

SGD_DIR = FIXTURES / "sgd"
SGD_CALLS = FIXTURES / "sgd_calls"  # a dialogue with two service calls, one returning 4 results
SGD_DEV = SHARED_DATA / "sgd" / "dev"


def _summary(out) -> list[tuple]:
    """Everything that must survive a change of container (.gz, file vs directory), minus paths."""
    result = []
    for o in out:
        if isinstance(o, Dialogue):
            result.append((o.id, [(t.speaker, t.text, t.meta) for t in o.turns], o.meta))
        else:
            result.append((o.item, o.reason))
    return result


def test_directory_dialogues_and_speakers():
    dialogues, _ = split_items(sgd.read(SGD_DIR))
    assert [d.id for d in dialogues] == ["1_00000", "1_00001"]
    assert all(d.source == str(SGD_DIR / "dialogues_001.json") for d in dialogues)
    assert [(t.speaker, t.text) for t in dialogues[0].turns] == [
        ("USER", "I'd like to find a restaurant in San Jose for dinner."),
        ("SYSTEM", "What kind of food are you in the mood for?"),
        ("USER", "Something Italian, please."),
        ("SYSTEM", "Il Fornaio in San Jose is a nice Italian restaurant."),
        ("USER", "Great, book a table for 2 there."),
    ]
    assert [t.speaker for t in dialogues[1].turns] == ["USER", "SYSTEM", "USER"]


def test_empty_utterance_is_rejected_with_its_position():
    _, rejects = split_items(sgd.read(SGD_DIR))
    assert [(r.source, r.line, r.item, r.reason) for r in rejects] == [
        (str(SGD_DIR / "dialogues_001.json"), None, "[1].turns[3].utterance", "empty utterance"),
    ]


def test_frames_are_kept_on_turns():
    dialogues, _ = split_items(sgd.read(SGD_DIR))
    first = dialogues[0].turns[0]
    (frame,) = first.meta["frames"]
    assert frame["service"] == "Restaurants_1"
    assert frame["state"]["active_intent"] == "FindRestaurants"
    assert frame["state"]["slot_values"] == {"city": ["San Jose"]}
    assert [a["act"] for a in frame["actions"]] == ["INFORM", "INFORM_INTENT"]
    # Slot spans still point into the turn's text.
    spans = {s["slot"]: first.text[s["start"]:s["exclusive_end"]] for s in frame["slots"]}
    assert spans == {"city": "San Jose"}
    offer = dialogues[0].turns[3]
    assert {s["slot"]: offer.text[s["start"]:s["exclusive_end"]] for s in offer.meta["frames"][0]["slots"]} == {
        "restaurant_name": "Il Fornaio", "city": "San Jose"}
    # System turns have no state; the intent changes over the dialogue.
    assert "state" not in dialogues[0].turns[1].meta["frames"][0]
    intents = [t.meta["frames"][0]["state"]["active_intent"] for t in dialogues[0].turns if t.speaker == "USER"]
    assert intents == ["FindRestaurants", "FindRestaurants", "ReserveRestaurant"]
    weather = dialogues[1].turns[0]
    assert {s["slot"]: weather.text[s["start"]:s["exclusive_end"]] for s in weather.meta["frames"][0]["slots"]} == {
        "city": "Portland", "date": "tomorrow"}


def test_services_and_their_schemas_are_kept_on_dialogues():
    dialogues, _ = split_items(sgd.read(SGD_DIR))
    first, second = dialogues
    assert first.meta["services"] == ["Restaurants_1"]
    assert list(first.meta["schemas"]) == ["Restaurants_1"]
    restaurants = first.meta["schemas"]["Restaurants_1"]
    assert [i["name"] for i in restaurants["intents"]] == ["FindRestaurants", "ReserveRestaurant"]
    assert [s["name"] for s in restaurants["slots"]] == ["restaurant_name", "city", "cuisine", "party_size"]
    assert second.meta["services"] == ["Weather_1", "RideSharing_2"]
    assert list(second.meta["schemas"]) == ["Weather_1", "RideSharing_2"]
    ride = second.meta["schemas"]["RideSharing_2"]
    assert ride["intents"][0]["required_slots"] == ["destination", "number_of_riders"]
    # A schema for a service no dialogue uses is not attached anywhere.
    assert all("Music_1" not in d.meta["schemas"] for d in dialogues)


def test_service_calls_are_kept_as_named_calls_with_their_results():
    (dialogue,), rejects = split_items(sgd.read(SGD_CALLS))
    assert rejects == []
    calls = [(i, t.meta["tool_calls"]) for i, t in enumerate(dialogue.turns) if "tool_calls" in t.meta]
    assert [(i, [(c["name"], c["arguments"], len(c["results"])) for c in turn_calls]) for i, turn_calls in calls] == [
        (1, [("Events_1__FindEvents", {"category": "Music", "city_of_event": "Chicago", "date": "2019-03-02"}, 4)]),
        (5, [("Events_1__BuyEventTickets", {"event_name": "Alejandro Sanz", "number_of_seats": "2",
                                            "date": "2019-03-02", "city_of_event": "Chicago"}, 1)]),
    ]
    # The results are SGD's own, in order, and the frames are kept as they were.
    frame = dialogue.turns[1].meta["frames"][0]
    assert calls[0][1][0]["results"] == frame["service_results"]
    assert [r["event_name"] for r in frame["service_results"]] == ["Alejandro Sanz", "Beach House", "Cher",
                                                                    "Kacey Musgraves"]


def test_a_malformed_service_call_rejects_its_turn(tmp_path):
    (tmp_path / "dialogues_001.json").write_text(json.dumps([{"dialogue_id": "1_0", "services": ["Events_1"], "turns": [
        {"speaker": "USER", "utterance": "Hi.", "frames": []},
        {"speaker": "SYSTEM", "utterance": "Searching.", "frames": [{"service": "Events_1", "service_call": {
            "method": "FindEvents"}, "service_results": []}]},
        {"speaker": "SYSTEM", "utterance": "Found one.", "frames": [{"service": "Events_1", "service_call": {
            "method": "FindEvents", "parameters": {}}, "service_results": ["not an object"]}]},
    ]}]))
    (dialogue,), rejects = split_items(sgd.read(tmp_path))
    assert [(r.item, r.reason) for r in rejects] == [
        ("[0].turns[1]", "frames[0]: a service_call needs a 'service', a string 'method' and an object 'parameters'"),
        ("[0].turns[2]", "frames[0]: service_results must be a list of objects"),
    ]
    assert [t.text for t in dialogue.turns] == ["Hi."]


def test_single_file_finds_the_schema_next_to_it():
    assert _summary(sgd.read(SGD_DIR / "dialogues_001.json")) == _summary(sgd.read(SGD_DIR))


def test_gzipped_files_read_the_same(tmp_path):
    for name in ("dialogues_001.json", "schema.json"):
        with open(SGD_DIR / name, "rb") as src, gzip.open(tmp_path / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert detect_format(tmp_path) == "sgd"
    assert detect_format(tmp_path / "dialogues_001.json.gz") == "sgd"
    out = list(read_dialogues(tmp_path))
    assert _summary(out) == _summary(sgd.read(SGD_DIR))
    assert out[0].source == str(tmp_path / "dialogues_001.json.gz")


def test_without_a_schema_file_schemas_are_empty(tmp_path):
    shutil.copy(SGD_DIR / "dialogues_001.json", tmp_path / "dialogues_001.json")
    dialogues, _ = split_items(sgd.read(tmp_path))
    assert [d.meta for d in dialogues] == [
        {"services": ["Restaurants_1"], "schemas": {}},
        {"services": ["Weather_1", "RideSharing_2"], "schemas": {}},
    ]


def test_directory_without_dialogue_files(tmp_path):
    shutil.copy(SGD_DIR / "schema.json", tmp_path / "schema.json")
    with pytest.raises(DataError, match=r"no dialogues_\*\.json files"):
        list(sgd.read(tmp_path))


def test_bad_dialogues_and_turns(tmp_path):
    (tmp_path / "dialogues_002.json").write_text(
        '[{"dialogue_id": "2_00000", "services": []},'
        ' {"dialogue_id": "2_00001", "services": [], "turns": [{"speaker": "USER", "utterance": null},'
        ' {"speaker": "SYSTEM", "utterance": "Hello.", "frames": []}]}]')
    out = list(sgd.read(tmp_path))
    assert [(r.item, r.reason) for r in out if isinstance(r, Reject)] == [
        ("[0]", "dialogue needs a list field 'turns'"),
        ("[1].turns[0]", "turn needs a string field 'utterance'"),
    ]
    (dialogue,) = [d for d in out if isinstance(d, Dialogue)]
    assert (dialogue.id, [(t.speaker, t.text) for t in dialogue.turns]) == ("2_00001", [("SYSTEM", "Hello.")])


@pytest.mark.skipif(not SGD_DEV.is_dir(), reason="shared SGD data not available")
def test_real_sgd_dev():
    assert detect_format(SGD_DEV) == "sgd"
    dialogues, rejects = split_items(sgd.read(SGD_DEV))
    assert rejects == []
    assert len(dialogues) == 1074
    assert len({d.id for d in dialogues}) == 1074
    for dialogue in dialogues:
        assert {t.speaker for t in dialogue.turns} == {"USER", "SYSTEM"}
        assert dialogue.turns[0].speaker == "USER"
        assert set(dialogue.meta["schemas"]) == set(dialogue.meta["services"])
        for turn in dialogue.turns:
            for frame in turn.meta["frames"]:
                assert frame["service"] in dialogue.meta["services"]
                assert ("state" in frame) == (turn.speaker == "USER")
            # Every service call is kept as a call, on system turns only, named as `dialogtune schema` names it.
            frames = [f for f in turn.meta["frames"] if "service_call" in f]
            assert [(c["name"], c["arguments"]) for c in turn.meta.get("tool_calls", [])] == [
                (f"{f['service']}__{f['service_call']['method']}", f["service_call"]["parameters"]) for f in frames]
            assert not frames or turn.speaker == "SYSTEM"
        assert any("tool_calls" in t.meta for t in dialogue.turns)
