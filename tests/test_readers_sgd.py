"""Schema-Guided Dialogue: USER/SYSTEM turns with their frames, dialogues with their schemas."""

from __future__ import annotations

import gzip
import shutil

import pytest
from helpers import FIXTURES, SHARED_DATA, split_items

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.errors import DataError
from dialogtune.readers import detect_format, read_dialogues, sgd

SGD_DIR = FIXTURES / "sgd"
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
