"""Film/TV scripts as CSV: one dialogue per episode, rejects that name the line."""

from __future__ import annotations

import pytest
from helpers import FIXTURES, split_items, turn_pairs

from dialogtune.errors import DataError
from dialogtune.readers import script_csv

SCRIPT = FIXTURES / "script.csv"
CUSTOM = FIXTURES / "script_custom.csv"
RICK_AND_MORTY = FIXTURES / "rick_and_morty.csv"  # the Kaggle scripts' header: index,season no.,episode no.,...




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
    with pytest.raises(DataError) as err:
        list(script_csv.read(CUSTOM))
    assert str(err.value) == (
        f"{CUSTOM}: cannot find the speaker column among ['ep', 'who', 'said', 'notes']; name it with"
        " data.columns.speaker (looked for speaker, name, character, charactername, role, author,"
        " ignoring case, spaces and punctuation)")


def test_season_and_episode_columns_make_one_dialogue_per_episode():
    dialogues, rejects = split_items(script_csv.read(RICK_AND_MORTY))
    assert rejects == []
    assert [(d.id, d.group, d.line, len(d.turns)) for d in dialogues] == [
        ("rick_and_morty.csv#s1e1", "rick_and_morty.csv#s1e1", 2, 5),
        ("rick_and_morty.csv#s1e2", "rick_and_morty.csv#s1e2", 7, 3),
        ("rick_and_morty.csv#s2e1", "rick_and_morty.csv#s2e1", 10, 4),
        ("rick_and_morty.csv#s2e2", "rick_and_morty.csv#s2e2", 14, 2),
    ]
    assert turn_pairs(dialogues[1]) == [
        ("Jerry", "Snuffles, no! Bad dog."),
        ("Rick", "Morty, can't you see he's just a dog? A dumb, dumb dog."),
        ("Morty", 'He\'s not dumb, Rick. He\'s "learning".'),  # quoted commas and doubled quotes
    ]
    assert [t.meta["line"] for t in dialogues[1].turns] == [7, 8, 9]


@pytest.mark.parametrize("header", [
    "Season,Episode Number,Character,Dialogue",
    "season_no,episode_id,speaker,text",
    "SEASON NO.,Episode No.,Name,Line",
    " season , episode ,character , line ",
])
def test_headers_match_whatever_their_case_spaces_and_punctuation(tmp_path, header):
    # Episode 1 of season 1 straight after episode 1 of season 2: only the season tells them apart.
    path = tmp_path / "show.csv"
    path.write_text(f"{header}\n2,1,Ann,New season.\n2,1,Ben,Same old us.\n1,1,Ann,First ever line.\n")
    dialogues, _ = split_items(script_csv.read(path))
    assert [(d.id, turn_pairs(d)) for d in dialogues] == [
        ("show.csv#s2e1", [("Ann", "New season."), ("Ben", "Same old us.")]),
        ("show.csv#s1e1", [("Ann", "First ever line.")]),
    ]


def test_episode_names_as_written_when_not_whole_numbers(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("season,episode,speaker,text\n1.0,3.0,Ann,From pandas.\nOne,Pilot,Ben,Named.\n")
    dialogues, _ = split_items(script_csv.read(path))
    assert [d.id for d in dialogues] == ["export.csv#s1e3", "export.csv#One/Pilot"]
    # An episode's name is the last resort for telling episodes apart.
    path.write_text("Episode Name,Character,Line\nPilot,Ann,Hi.\nFinale,Ben,Bye.\n")
    dialogues, _ = split_items(script_csv.read(path))
    assert [d.id for d in dialogues] == ["export.csv#Pilot", "export.csv#Finale"]


def test_a_season_without_an_episode_column_does_not_group(tmp_path):
    path = tmp_path / "seasons.csv"
    path.write_text("season,speaker,text\n1,Ann,Hi.\n2,Ben,Bye.\n")
    dialogues, _ = split_items(script_csv.read(path))
    assert [(d.id, len(d.turns)) for d in dialogues] == [("seasons.csv#0", 2)]


def test_explicit_episode_column_still_combines_with_the_detected_season():
    columns = {"episode": "episode name", "speaker": "name", "text": "line"}
    dialogues, _ = split_items(script_csv.read(RICK_AND_MORTY, columns=columns))
    assert [d.id for d in dialogues] == ["rick_and_morty.csv#1/Pilot", "rick_and_morty.csv#1/Lawnmower Dog",
                                         "rick_and_morty.csv#2/A Rickle in Time", "rick_and_morty.csv#2/Mortynight Run"]


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


def test_a_season_column_can_be_named_in_the_config(tmp_path):
    from dialogtune.config import build_config

    path = tmp_path / "show.csv"
    path.write_text("Series,Ep,Who,Said\nA,1,Ann,Hi.\nA,1,Ben,Hello.\nB,1,Ann,Back again.\n")
    config = build_config({"data": {"path": str(path), "columns": {"season": "Series", "episode": "Ep",
                                                                   "speaker": "Who", "text": "Said"}}})
    dialogues, rejects = split_items(script_csv.read(path, columns=config.data.columns.model_dump()))
    assert [(d.id, turn_pairs(d)) for d in dialogues] == [
        ("show.csv#A/1", [("Ann", "Hi."), ("Ben", "Hello.")]),
        ("show.csv#B/1", [("Ann", "Back again.")]),
    ] and rejects == []


def test_a_named_season_without_an_episode_column_is_refused(tmp_path):
    path = tmp_path / "show.csv"
    path.write_text("Series,Who,Said\nA,Ann,Hi.\n")
    with pytest.raises(DataError, match=r"data.columns.season names 'Series' but there is no episode column"):
        list(script_csv.read(path, columns={"season": "Series", "speaker": "Who", "text": "Said"}))
