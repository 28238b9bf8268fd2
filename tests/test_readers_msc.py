"""Multi-Session Chat reader: speakers normalised to A/B across sessions whose role labels differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FIXTURES, SHARED_DATA

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.errors import DataError
from dialogtune.readers import msc, read_dialogues

MSC_REAL = SHARED_DATA / "msc" / "msc_dialog_samples.json"


def _read(path: Path) -> tuple[list[Dialogue], list[Reject]]:
    out = list(msc.read(path))
    return [d for d in out if isinstance(d, Dialogue)], [r for r in out if isinstance(r, Reject)]


def test_fixture_dialogues_and_sessions():
    dialogues, rejects = _read(FIXTURES / "msc_sample.json")
    assert [d.id for d in dialogues] == ["test_100", "test_101"]
    first = dialogues[0]
    assert first.source == str(FIXTURES / "msc_sample.json")
    assert [(t.speaker, t.session) for t in first.turns] == [
        ("A", 1), ("B", 1), ("A", 1), ("B", 1),
        ("A", 2), ("B", 2), ("A", 2),
        ("B", 3), ("A", 3), ("A", 3),  # turn 2 of session 3 was rejected (see below)
    ]
    assert first.turns[0].text == "Do you have any plans for the weekend? I might go hiking."
    # Text goes through clean_text: the double space is collapsed.
    assert first.turns[1].text == "I was going to bake bread with my daughter."
    assert first.turns[-1].text == "Maybe you could bring a loaf on our next hike."
    assert first.speakers() == ["A", "B"]
    assert [r.item for r in rejects] == ["['test_100'][9]"]


def test_role_labels_of_every_session_map_to_the_same_letters():
    dialogues, _ = _read(FIXTURES / "msc_sample.json")
    by_role = {(t.meta["role"], t.speaker) for d in dialogues for t in d.turns}
    assert by_role == {
        ("bot_0", "A"), ("bot_1", "B"),
        ("Speaker 1", "A"), ("Speaker 2", "B"),
        ("56152", "B"),  # bare number: decided by token id 387
        ("63372", "A"),  # bare number: decided by token id 250
    }
    assert dialogues[0].turns[7].meta == {"turn_id": 0, "role": "56152"}


def test_turn_without_token_ids_maps_known_role_by_name():
    dialogues, _ = _read(FIXTURES / "msc_sample.json")
    second = dialogues[1]
    turn = next(t for t in second.turns if t.text == "Do your dogs get along with cats?")
    assert (turn.speaker, turn.session, turn.meta["role"]) == ("B", 3, "bot_1")
    assert [(t.speaker, t.session) for t in second.turns] == [
        ("A", 1), ("B", 1), ("B", 2), ("A", 2), ("B", 3), ("A", 3)]


def test_turn_without_token_ids_and_unknown_role_is_rejected():
    _, rejects = _read(FIXTURES / "msc_sample.json")
    assert len(rejects) == 1
    reject = rejects[0]
    assert reject.source == str(FIXTURES / "msc_sample.json")
    assert reject.line is None
    assert reject.item == "['test_100'][9]"
    assert reject.stage == "read"
    assert reject.reason.startswith("cannot tell the speaker of role '31024'")
    assert "['Speaker 1', 'Speaker 2', 'bot_0', 'bot_1']" in reject.reason


def test_token_id_wins_over_role_label(tmp_path):
    path = tmp_path / "conflict.json"
    path.write_text(json.dumps({"d": [
        {"dial_id": "d", "turn_id": 0, "text": "Hi.", "role": "Speaker 1", "session": 2, "token_ids": [387, 35, 30086]},
    ]}))
    (dialogue,) = msc.read(path)
    assert dialogue.turns[0].speaker == "B"


def test_bad_turns_become_rejects_with_their_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({
        "x": "not a list",
        "y": [
            {"dial_id": "y", "turn_id": 0, "role": "bot_0", "session": 1},
            {"dial_id": "y", "turn_id": 1, "text": "   ", "role": "bot_1", "session": 1},
            {"dial_id": "y", "turn_id": 2, "text": "Still here.", "role": "bot_0"},
        ],
    }))
    out = list(msc.read(path))
    assert [(type(o).__name__, getattr(o, "item", None), getattr(o, "reason", None)) for o in out[:3]] == [
        ("Reject", "['x']", "expected a list of turns"),
        ("Reject", "['y'][0]", "turn needs a string field 'text'"),
        ("Reject", "['y'][1].text", "empty text"),
    ]
    dialogue = out[3]
    assert dialogue.id == "y"
    assert [(t.speaker, t.text, t.session) for t in dialogue.turns] == [("A", "Still here.", None)]


def test_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[{"dial_id": "a"}]')
    with pytest.raises(DataError, match="MSC data must be a JSON object"):
        list(msc.read(path))


def test_read_dialogues_detects_msc():
    out = list(read_dialogues(FIXTURES / "msc_sample.json"))
    assert [o.id for o in out if isinstance(o, Dialogue)] == ["test_100", "test_101"]


@pytest.mark.skipif(not MSC_REAL.exists(), reason="shared MSC data not available")
def test_real_msc_speakers_follow_token_ids_across_all_sessions():
    raw = json.loads(MSC_REAL.read_text())
    dialogues, rejects = _read(MSC_REAL)
    assert rejects == []
    assert len(dialogues) == 10
    assert [d.id for d in dialogues] == list(raw)
    assert sum(len(d.turns) for d in dialogues) == 595
    letter = {250: "A", 387: "B"}
    for dialogue in dialogues:
        raw_turns = raw[dialogue.id]
        assert len(dialogue.turns) == len(raw_turns)
        assert {t.session for t in dialogue.turns} == {1, 2, 3, 4, 5}
        for turn, raw_turn in zip(dialogue.turns, raw_turns):
            assert turn.speaker in ("A", "B")
            assert turn.speaker == letter[raw_turn["token_ids"][0]], (dialogue.id, raw_turn)
            assert turn.meta["role"] == raw_turn["role"]
        # Both speakers talk in every session even though the labels change.
        for session in range(1, 6):
            assert {t.speaker for t in dialogue.turns if t.session == session} == {"A", "B"}
    # The labels really do vary: bot_*, Speaker *, and bare numbers.
    roles = {t.meta["role"] for d in dialogues for t in d.turns}
    assert {"bot_0", "bot_1", "Speaker 1", "Speaker 2"} <= roles
    assert any(str(r).isdigit() for r in roles)
