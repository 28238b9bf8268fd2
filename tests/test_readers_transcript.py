"""`Name: utterance` transcripts: scenes, narration, actions, strict speaker prefixes."""

from __future__ import annotations

from helpers import FIXTURES, split_items, turn_pairs

from dialogtune.readers import transcript
from dialogtune.readers.transcript import split_speaker

TRANSCRIPT = FIXTURES / "transcript.txt"




def test_scenes_speakers_and_narration():
    dialogues, _ = split_items(transcript.read(TRANSCRIPT))
    # Blank line after line 5 and the `---` on line 11 each end a scene.
    assert [(d.id, d.line) for d in dialogues] == [
        ("transcript.txt#scene0", 1),
        ("transcript.txt#scene1", 7),
        ("transcript.txt#scene2", 12),
    ]
    assert turn_pairs(dialogues[0]) == [
        (None, "INT. BAKERY - MORNING"),
        ("Alice", "Good morning! Are the croissants ready yet?"),
        ("Bob Smith", "Five more minutes. (wipes flour off his hands) Coffee while you wait?"),
        ("Alice", "Yes please."),
        ("Bob", "I'll get it, Dad."),
    ]
    assert [t.meta["line"] for t in dialogues[0].turns] == [1, 2, 3, 4, 5]
    assert turn_pairs(dialogues[1]) == [
        (None, "Bob walks to the espresso machine."),
        ("Bob", "Here you go, Alice."),
        # `wouldnâ€™t` (UTF-8 read as cp1252) is repaired.
        ("Alice", "Thanks, Bob. I wouldn't start the day without it."),
    ]
    assert [t.meta["line"] for t in dialogues[1].turns] == [7, 8, 10]
    assert turn_pairs(dialogues[2]) == [
        (None, "EXT. STREET - LATER"),
        ("Alice", "(waving) See you tomorrow!"),
        ("Bob Smith", "Don't forget your umbrella."),
    ]
    # "Bob Smith" and "Bob" are different speakers.
    assert dialogues[0].speakers() == ["Alice", "Bob Smith", "Bob"]
    assert all(d.group == d.id for d in dialogues)


def test_empty_turn_is_rejected_with_its_line():
    _, rejects = split_items(transcript.read(TRANSCRIPT))
    assert [(r.source, r.line, r.reason) for r in rejects] == [
        (str(TRANSCRIPT), 9, "empty text after speaker 'Alice'"),
    ]


def test_actions_can_be_dropped():
    dialogues, rejects = split_items(transcript.read(TRANSCRIPT, actions="drop"))
    assert dialogues[0].turns[2].text == "Five more minutes. Coffee while you wait?"
    assert dialogues[2].turns[1].text == "See you tomorrow!"
    assert [r.line for r in rejects] == [9]


def test_known_speakers_are_matched_as_exact_prefixes():
    # Only "Alice" and "Bob": "Bob Smith: ..." is not Bob speaking, it is narration.
    dialogues, _ = split_items(transcript.read(TRANSCRIPT, speakers=["Alice", "Bob"]))
    first = dialogues[0]
    assert first.turns[2].speaker is None
    assert first.turns[2].text == "Bob Smith: Five more minutes. (wipes flour off his hands) Coffee while you wait?"
    assert first.speakers() == ["Alice", "Bob"]
    # Same result whatever order the names come in, and "Bob Smith" is found when named.
    dialogues, _ = split_items(transcript.read(TRANSCRIPT, speakers=["Bob", "Alice", "Bob Smith"]))
    assert dialogues[0].speakers() == ["Alice", "Bob Smith", "Bob"]
    assert turn_pairs(dialogues[2])[2] == ("Bob Smith", "Don't forget your umbrella.")


def test_split_speaker_strict_prefix_not_character_strip():
    # str.lstrip("Bob:") would also eat the "bo" of "boo".
    assert split_speaker("Bob:boo!", ["Bob"]) == ("Bob", "boo!")
    assert split_speaker("Bobby: hi", ["Bob"]) is None
    assert split_speaker("Bob Smith: hi", ["Bob"]) is None
    assert split_speaker("Bob Smith: hi", ["Bob Smith", "Bob"]) == ("Bob Smith", " hi")


def test_split_speaker_heuristics_without_known_names():
    assert split_speaker("Bob Smith: hi", None) == ("Bob Smith", " hi")
    assert split_speaker("  Dr. Who : hello", None) == ("Dr. Who", " hello")
    # Numbers first (times), long clauses and sentence-ending names are not speakers.
    assert split_speaker("12:30 the train leaves", None) is None
    assert split_speaker("Later that night at the old mill by the river: silence", None) is None
    assert split_speaker("Wait!: nothing", None) is None
    assert split_speaker("No colon at all", None) is None


def test_crlf_lines_and_narration_only_scenes(tmp_path):
    path = tmp_path / "log.txt"
    path.write_bytes(
        b"The lights go down.\r\n"
        b"***\r\n"
        b"Ann: Ready?\r\n"
        b"Ben: Always.\r\n"
        b"\r\n"
        b"\r\n"
        b"Ann: Go!\r\n"
    )
    dialogues, rejects = split_items(transcript.read(path))
    # The narration-only first scene makes no dialogue (it is listed as a reject, never lost
    # silently) and does not use up a scene number.
    assert [(r.line, r.reason) for r in rejects] == [(1, "scene of 1 narration line(s) and no speaker line")]
    assert [(d.id, d.line, turn_pairs(d)) for d in dialogues] == [
        ("log.txt#scene0", 3, [("Ann", "Ready?"), ("Ben", "Always.")]),
        ("log.txt#scene1", 7, [("Ann", "Go!")]),
    ]


def test_mostly_narration_is_noted_with_the_format_that_fits():
    # DailyDialog read as a transcript: `Sure , it's 7:15` and `Note : ...` look like speaker tags.
    dailydialog = FIXTURES / "dialogues_test.txt"
    notes: list[str] = []
    dialogues, _ = split_items(transcript.read(dailydialog, notes=notes))
    assert [(d.id, d.speakers()) for d in dialogues] == [("dialogues_test.txt#scene0", ["Sure , it's 7", "Note"])]
    assert notes == [(
        f"{dailydialog}: 10 of 12 lines (83%) have no `Name:` speaker tag and were read as narration;"
        " __eou__ turn separators in 10 of them: --format dailydialog"
    )]


def test_narration_note_names_other_formats_or_says_what_to_check(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text('Ann: hello\n{"messages": []}\n{"messages": []}\nA<|endoftext|>B\n\nBen: hi\nJust prose.\n')
    notes: list[str] = []
    list(transcript.read(path, notes=notes))
    assert notes == [(
        f"{path}: 4 of 6 lines (67%) have no `Name:` speaker tag and were read as narration;"
        " <|endoftext|> separators in 1 of them: --format endoftext;"
        " JSON records in 2 of them: name the file .jsonl (messages, rows)"
    )]
    path.write_text("It was a dark night.\nThe wind howled.\nBob: Who's there?\n")
    notes.clear()
    list(transcript.read(path, notes=notes))
    assert notes == [(
        f"{path}: 2 of 3 lines (67%) have no `Name:` speaker tag and were read as narration; if it is not a"
        " `Name: line` transcript, name its format with --format (dailydialog: `__eou__`-separated turns;"
        " endoftext; parlai), or name the speakers with data.speakers"
    )]


def test_half_narration_or_less_is_not_noted():
    notes: list[str] = []
    list(transcript.read(TRANSCRIPT, notes=notes))
    assert notes == []  # 3 narration lines of 12 (a `---` line is neither)
    list(transcript.read(TRANSCRIPT))  # without a list to fill, nothing is noted anywhere
