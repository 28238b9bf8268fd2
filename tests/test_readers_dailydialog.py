"""DailyDialog `__eou__` lines: one dialogue a line, speakers A/B by position, empty turns named."""

from __future__ import annotations

from helpers import FIXTURES, split_items, turn_pairs

from dialogtune.readers import dailydialog, detect_format, read_dialogues
from dialogtune.readers.dailydialog import split_turns

DAILYDIALOG = FIXTURES / "dialogues_test.txt"  # DailyDialog's layout and tokenised style


def test_one_dialogue_a_line_with_alternating_speakers():
    dialogues, rejects = split_items(dailydialog.read(DAILYDIALOG))
    assert rejects == []
    assert [d.id for d in dialogues] == [f"dialogues_test.txt#{i}" for i in range(12)]
    assert [d.line for d in dialogues] == list(range(1, 13))
    assert [len(d.turns) for d in dialogues] == [4, 4, 5, 3, 5, 3, 3, 5, 4, 3, 3, 4]
    # `it's 7:15` and `Note :` are words of a turn, not speaker tags.
    assert turn_pairs(dialogues[0]) == [
        ("A", "Sure , it's 7:15 now . We still have time for breakfast ."),
        ("B", "Great . Let's try the new place on Elm Street ."),
        ("A", "The one with the blue door ?"),
        ("B", "Yes , that one ."),
    ]
    assert turn_pairs(dialogues[9])[0] == ("A", "Note : the meeting has been moved to room B .")
    # Curly apostrophes are normalised once, at read time.
    assert turn_pairs(dialogues[1])[3] == ("B", "I am . It ' s always late on Mondays .")
    assert all(d.speakers() == ["A", "B"] and d.source == str(DAILYDIALOG) for d in dialogues)


def test_detected_even_though_turns_hold_colons():
    assert detect_format(DAILYDIALOG) == "dailydialog"
    assert len(list(read_dialogues(DAILYDIALOG))) == 12


def test_empty_turns_and_lines_without_markers_are_rejected_with_their_line(tmp_path):
    path = tmp_path / "dialogues_train.txt"
    path.write_bytes(
        b"Hi . __eou__  __eou__ Anyone there ? __eou__\r\n"
        b"\r\n"
        b"Just a sentence with no marker .\n"
        b"Last turn without a marker . __eou__ Fine by me .\n"
        b"__eou__ __eou__\n"
    )
    dialogues, rejects = split_items(dailydialog.read(path))
    assert [(r.source, r.line, r.reason) for r in rejects] == [
        (str(path), 1, "empty turn(s) [1] between __eou__ markers"),
        (str(path), 3, "no __eou__ marker: not a DailyDialog line"),
        (str(path), 5, "empty turn(s) [0, 1] between __eou__ markers"),
    ]
    # Speakers stay by position: the empty second turn was B's, so A speaks twice.
    assert [(d.id, d.line, turn_pairs(d)) for d in dialogues] == [
        ("dialogues_train.txt#0", 1, [("A", "Hi ."), ("A", "Anyone there ?")]),
        ("dialogues_train.txt#3", 4, [("A", "Last turn without a marker ."), ("B", "Fine by me .")]),
    ]


def test_split_turns_drops_only_the_piece_after_the_final_marker():
    assert split_turns("a __eou__ b __eou__ ") == ["a", "b"]
    assert split_turns("a __eou__ b") == ["a", "b"]
    assert split_turns("a __eou__ __eou__ b __eou__") == ["a", "", "b"]
