"""Multi-Session Chat reader: speakers normalised to A/B across sessions whose role labels differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FIXTURES, SHARED_DATA

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.errors import DataError
from dialogtune.readers import msc, read_dialogues
from dialogtune.textfix import clean_text

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


# -- ParlAI's release: one episode a line, sessions 1..N-1 in previous_dialogs --------------------

PARLAI_FIXTURE = FIXTURES / "msc_parlai.jsonl"
MSC_SESSION3 = SHARED_DATA / "msc" / "msc_session3_valid.jsonl"


def _episode(dialog, previous=None, **extra) -> dict:
    return {"dialog": dialog, "previous_dialogs": [] if previous is None else previous, "personas": [[], []], **extra}


def test_parlai_episodes_hold_every_session_in_order():
    dialogues, rejects = _read(PARLAI_FIXTURE)
    assert [(d.id, d.line) for d in dialogues] == [("demo_1", 1), ("demo_2", 3), ("msc_parlai.jsonl#3", 4)]
    assert all(d.source == str(PARLAI_FIXTURE) for d in dialogues)
    first, second, third = dialogues
    assert [(t.session, t.speaker, t.text) for t in first.turns] == [
        (1, "A", "Hi there! I just got stung twice before breakfast."),
        (1, "B", "Ouch. Wasps?"),
        (1, "A", "My own bees, sadly. I keep three hives on the roof."),
        (1, "B", "Brave. I only see the city at night from my bus."),
        (2, "A", "Did your sister have the babies yet?"),
        (2, "B", "Yes, twins, both girls!"),
        (3, "A", "How are the twins sleeping these days?"),
        (3, "B", "Better than me, honestly. Night shifts and newborns do not mix."),
        (3, "A", "Come by for honey tea after your shift, it helps."),
    ]
    # Session 1 has an odd number of turns: alternation restarts with Speaker 1 (A) in session 2.
    assert [(t.session, t.speaker) for t in second.turns] == [
        (1, "A"), (1, "B"), (1, "A"), (2, "A"), (2, "B"), (3, "A"), (3, "B")]
    # Text goes through clean_text: the double space is collapsed.
    assert third.turns[4].text == "The lighthouse tour was cancelled again."
    assert [str(r) for r in rejects] == [
        f"{PARLAI_FIXTURE}:2: malformed JSON: unexpected control character in string (column 85)"]


def test_parlai_last_session_labels_and_worker_numbers():
    dialogues, _ = _read(PARLAI_FIXTURE)
    first, second, _third = dialogues
    assert [t.meta for t in first.turns[:2]] == [{}, {}]  # earlier sessions carry no labels
    assert [t.meta for t in first.turns[6:]] == [{"role": "Speaker 1"}, {"role": "Speaker 2"}, {"role": "Speaker 1"}]
    # A crowdworker number where Speaker 1's label should be: the position decides (A).
    assert [(t.speaker, t.meta) for t in second.turns[5:]] == [
        ("A", {"role": "40117"}), ("B", {"role": "Speaker 2", "rating": "good"})]


def test_parlai_meta_personas_and_time_gaps():
    dialogues, _ = _read(PARLAI_FIXTURE)
    first, second, third = dialogues
    assert first.meta == {
        "personas": {"A": ["I have three beehives.", "I play the cello badly."],
                     "B": ["I work nights.", "I have a big family."]},
        "persona_summaries": {"A": ["I keep bees on my roof.", "I am learning the cello."],
                              "B": ["I drive a night bus.", "My sister just had twins."]},
        "sessions": [
            {"session": 1, "time_gap": None, "time_back": "3 days 5 hours ago",
             "personas": {"A": ["I keep bees on my roof."], "B": ["I drive a night bus."]}},
            {"session": 2, "time_gap": "3 days", "time_back": "5 hours ago",
             "personas": {"A": ["I asked about the babies."], "B": ["My sister just had twins."]}},
            {"session": 3, "time_gap": "5 hours"},
        ],
    }
    assert [s["time_gap"] for s in second.meta["sessions"]] == [None, "1 day", "2 hours"]
    assert second.meta["sessions"][1]["personas"] == {"A": ["I am training for a marathon."]}
    # Empty persona lists are left out, as the parlai reader does.
    assert "persona_summaries" not in third.meta
    assert [set(s) for s in third.meta["sessions"]] == [{"session", "time_gap", "time_back"}] * 2 + [
        {"session", "time_gap"}]


def test_parlai_personas_reach_the_respond_system_prompt():
    from dialogtune.tasks.respond import respond

    dialogues, _ = _read(PARLAI_FIXTURE)
    (example,) = respond(dialogues[0], {"B"}, persona=True)
    assert example.messages[0] == {"role": "system", "content": "Your persona: I work nights.\nYour persona: I have a big family.",
                                   "train": False}
    assert [m.get("session") for m in example.messages[1:] if m["train"]] == [1, 1, 2, 3]


def test_parlai_bad_lines_and_turns_become_rejects(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(["not", "an", "object"]),
        json.dumps({"personas": [[], []], "previous_dialogs": []}),
        json.dumps(_episode([{"text": "Hello."}], previous=[{"time_num": 1}])),
        json.dumps(_episode([{"id": "Speaker 1", "text": "Only me."}], previous="nope")),
        json.dumps(_episode(
            [{"id": "Speaker 1", "text": "  "}, {"id": "Speaker 2", "text": "Still here."}, {"id": "Speaker 1"}],
            previous=[{"dialog": [{"text": "Hi."}, "oops", {"text": "Bye."}], "time_num": 2, "time_unit": "days"}],
            init_personas=[["only one speaker"]],
        )),
        "",
        json.dumps(_episode([{"text": ""}])),
    ]
    path.write_text("\n".join(lines) + "\n")
    out = list(msc.read(path))
    assert [(type(o).__name__, o.line, getattr(o, "item", None), getattr(o, "reason", None)) for o in out] == [
        ("Reject", 1, None, "expected an object, got list"),
        ("Reject", 2, None, "expected a list field 'dialog' (the turns of the last session)"),
        ("Reject", 3, None, "previous_dialogs[0] needs a list field 'dialog'"),
        ("Reject", 4, None, "'previous_dialogs' must be a list of earlier sessions"),
        ("Reject", 5, "previous_dialogs[0].dialog[1]", "turn needs a string field 'text'"),
        ("Reject", 5, "dialog[0].text", "empty text"),
        ("Reject", 5, "dialog[2]", "turn needs a string field 'text'"),
        ("Reject", 5, "init_personas", "personas must be two lists of strings ([Speaker 1's, Speaker 2's]); left out"),
        ("Dialogue", 5, None, None),
        ("Reject", 7, "dialog[0].text", "empty text"),
        ("Reject", 7, None, "no non-empty turn in any session"),
    ]
    kept = out[8]
    assert kept.id == "bad.jsonl#4"
    # Positions count the rejected turns too: "Bye." is still Speaker 1's (A), "Still here." Speaker 2's.
    assert [(t.session, t.speaker, t.text) for t in kept.turns] == [(1, "A", "Hi."), (1, "A", "Bye."), (2, "B", "Still here.")]
    assert kept.meta == {"sessions": [{"session": 1, "time_gap": None}, {"session": 2, "time_gap": "2 days"}]}


def test_parlai_shape_in_a_json_or_txt_file(tmp_path):
    """ParlAI's own files are `.txt`; a `.json` whose first line is an episode is read as lines too,
    while a one-line samples document stays the samples shape."""
    episode = json.dumps(_episode([{"id": "Speaker 1", "text": "Hi."}, {"id": "Speaker 2", "text": "Hey."}],
                                  metadata={"initial_data_id": "t_1", "session_id": 0}))
    for name in ("valid.txt", "valid.json"):
        path = tmp_path / name
        path.write_text(episode + "\n")
        (dialogue,) = read_dialogues(path)
        assert (dialogue.id, [(t.session, t.speaker) for t in dialogue.turns]) == ("t_1", [(1, "A"), (1, "B")])
    one_line = tmp_path / "samples.json"
    one_line.write_text(json.dumps({"d": [{"dial_id": "d", "text": "Hi.", "role": "bot_1", "session": 1}]}))
    (dialogue,) = read_dialogues(one_line)
    assert [(t.speaker, t.meta) for t in dialogue.turns] == [("B", {"turn_id": None, "role": "bot_1"})]


@pytest.mark.skipif(not MSC_SESSION3.exists(), reason="shared MSC data not available")
def test_real_parlai_session3_file():
    raw = [json.loads(line) for line in MSC_SESSION3.read_text().splitlines()]
    dialogues, rejects = _read(MSC_SESSION3)
    assert rejects == []
    assert len(dialogues) == len({d.id for d in dialogues}) == 500
    assert [d.id for d in dialogues] == [r["metadata"]["initial_data_id"] for r in raw]
    assert [d.line for d in dialogues] == list(range(1, 501))
    assert sum(len(d.turns) for d in dialogues) == 19555
    first = dialogues[0]
    assert first.id == "valid_0"
    assert len(first.turns) == 40
    assert [sum(t.session == s for t in first.turns) for s in (1, 2, 3)] == [16, 12, 12]
    assert [(s["session"], s["time_gap"]) for s in first.meta["sessions"]] == [(1, None), (2, "6 days"), (3, "3 hours")]
    assert first.turns[0].text == raw[0]["previous_dialogs"][0]["dialog"][0]["text"]
    assert first.meta["personas"]["A"][0] == raw[0]["init_personas"][0][0]
    for dialogue, record in zip(dialogues, raw):
        assert {t.session for t in dialogue.turns} == {1, 2, 3}
        for session in (1, 2, 3):
            assert {t.speaker for t in dialogue.turns if t.session == session} == {"A", "B"}
        last = [t for t in dialogue.turns if t.session == 3]
        assert [t.text for t in last] == [clean_text(t["text"]) for t in record["dialog"]]
        # Where the last session is labelled, the label and the alternation agree.
        for position, turn in enumerate(last):
            assert turn.speaker == "AB"[position % 2], (dialogue.id, position, turn.meta)
    labels = {t.meta["role"] for d in dialogues for t in d.turns if "role" in t.meta}
    numbers = {label for label in labels if label.isdigit()}
    assert labels - numbers == {"Speaker 1", "Speaker 2"}
    assert len({d.id for d in dialogues for t in d.turns if t.meta.get("role") in numbers}) == 50
