"""The memory task: turns as steps, session lines, who is trained."""

from __future__ import annotations

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.tasks.memory import memory_steps


def msc_like() -> Dialogue:
    turns = [Turn("A", "Hi!", 1), Turn("B", "Hello.", 1), Turn(None, "(a week passes)", 2),
             Turn("A", "Back again.", 2), Turn("B", "Welcome back.", 3)]
    return Dialogue("d1", turns, meta={"sessions": [{"session": 1, "time_gap": None},
                                                     {"session": 2, "time_gap": "7 days"},
                                                     {"session": 3, "time_gap": None}]})


def test_every_speaker_is_trained_and_sessions_open_with_their_time_gap():
    steps = memory_steps(msc_like(), None)
    assert [(s.prefix, s.text, s.session, s.trained) for s in steps] == [
        ("A:", " Hi!\n", 1, True),
        ("B:", " Hello.\n", 1, True),
        ("[session 2, 7 days later]\n", " (a week passes)\n", 2, False),  # narration: read, not learned
        ("A:", " Back again.\n", 2, True),
        ("[session 3]\nB:", " Welcome back.\n", 3, True),
    ]


def test_as_limits_the_trained_speakers_and_a_dialogue_without_them_is_counted_unused():
    steps = memory_steps(msc_like(), {"B"})
    assert [s.trained for s in steps] == [False, True, False, False, True]
    refused = memory_steps(msc_like(), {"Carol"})
    assert isinstance(refused, Reject) and refused.stage == "unused" and "no turn by Carol" in refused.reason


def test_a_dialogue_without_sessions_is_one_session_without_session_lines():
    steps = memory_steps(Dialogue("d", [Turn("x", "one"), Turn("y", "two")]), None)
    assert [(s.prefix, s.session) for s in steps] == [("x:", 1), ("y:", 1)]


def test_a_newline_inside_a_turn_does_not_end_it():
    steps = memory_steps(Dialogue("d", [Turn("x", "first line\nsecond line")]), None)
    assert steps[0].text == " first line second line\n"
