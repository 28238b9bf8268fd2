"""Film/TV scripts as CSV: one dialogue per episode, rejects that name the line."""

from __future__ import annotations

import pytest
from helpers import FIXTURES, split_items, turn_pairs

from dialogtune.errors import DataError
from dialogtune.readers import script_csv

SCRIPT = FIXTURES / "script.csv"
CUSTOM = FIXTURES / "script_custom.csv"




def test_episodes_become_dialogues():
    dialogues, _ = split_items(script_csv.read(SCRIPT))
    assert [(d.id, d.line, d.group, d.source) for d in dialogues] == [
        ("script.csv#S01E01", 2, "script.csv#S01E01", str(SCRIPT)),
        ("script.csv#S01E02", 7, "script.csv#S01E02", str(SCRIPT)),
    ]
    assert turn_pairs(dialogues[0]) == [
        ("Monica", "There's nothing to tell! He's just some guy I work with!"),
        ("Joey", "C'mon, you're going out with the guy! There's gotta be something wrong with him!"),
        ("Chandler", "All right Joey, be nice. So does he have a hump? A hump and a hairpiece?"),
        ("Monica", "Okay, everybody relax."),
    ]
    assert [t.meta["line"] for t in dialogues[0].turns] == [2, 3, 4, 6]
    assert turn_pairs(dialogues[1]) == [
        ("Ross", "Hi."),  # surrounding spaces stripped
        ("Rachel", "Hi! Oh, I'm sorry,\nI didn't mean to interrupt."),  # quoted line break kept
    ]


def test_bad_rows_are_rejected_with_their_line():
    _, rejects = split_items(script_csv.read(SCRIPT))
    assert [(r.source, r.line, r.item, r.reason) for r in rejects] == [
        (str(SCRIPT), 5, None, "row has 5 fields, the header has 3"),
        (str(SCRIPT), 10, None, "empty text in column 'line'"),
    ]


def test_non_standard_columns_need_naming():
    with pytest.raises(DataError, match=r"cannot find the speaker column among \['ep', 'who', 'said', 'notes'\]"):
        list(script_csv.read(CUSTOM))


def test_explicit_columns():
    dialogues, rejects = split_items(script_csv.read(CUSTOM, columns={"episode": "ep", "speaker": "who", "text": "said"}))
    assert rejects == []
    assert [(d.id, d.line) for d in dialogues] == [("script_custom.csv#1", 2), ("script_custom.csv#2", 4)]
    assert turn_pairs(dialogues[0]) == [
        ("Jerry", "What is the deal with airline food?"),
        ("Elaine", "Jerry, nobody cares about airline food."),
    ]
    assert turn_pairs(dialogues[1]) == [("George", "I was in the pool!"), ("Jerry", "You were in the pool?")]


def test_without_an_episode_column_the_file_is_one_dialogue():
    dialogues, _ = split_items(script_csv.read(CUSTOM, columns={"speaker": "who", "text": "said"}))
    assert [(d.id, d.group, len(d.turns)) for d in dialogues] == [("script_custom.csv#0", "script_custom.csv#0", 4)]
    assert dialogues[0].speakers() == ["Jerry", "Elaine", "George"]


def test_named_column_must_exist():
    with pytest.raises(DataError, match=r"no column 'speech' \(columns: ep, who, said, notes\)"):
        list(script_csv.read(CUSTOM, columns={"speaker": "who", "text": "speech"}))


def test_empty_file_and_missing_speaker(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty CSV file"):
        list(script_csv.read(empty))
    # A row without a speaker is narration (speaker None), as in transcripts.
    path = tmp_path / "scene.csv"
    path.write_text("scene,name,text\n1,,The door creaks open.\n1,KRAMER,Hey buddy!\n")
    dialogues, _ = split_items(script_csv.read(path))
    assert turn_pairs(dialogues[0]) == [(None, "The door creaks open."), ("KRAMER", "Hey buddy!")]
    assert dialogues[0].id == "scene.csv#1"
