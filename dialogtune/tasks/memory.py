"""The memory task: a dialogue as the sequence of its turns, each one step of a memory model.

A step reads the turn's `prefix` (who speaks, and where a session starts, how long since the
last one) and learns the turn's `text`. The history a step also sees (a window of earlier turns)
and the memory it starts from are training's business: the same turns serve a memory model with
a short window, the same model without memory, and a plain model with the whole history.

Every speaker's turns are trained unless `task.as` names some (MemBart trained one speaker only,
which halves the data and leaves the memory never reading its own side's words as a target).
Narration (turns without a speaker) is read, never trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from dialogtune.dialogue import Dialogue, Reject

TURN_END = "\n"  # what ends a turn: the stop string of generation


@dataclass(slots=True)
class TurnStep:
    prefix: str  # read: a session line where a session starts, then "Name:"
    text: str  # " text" and the turn's end: learned when `trained`
    session: int
    trained: bool


def one_line(text: str) -> str:
    """A turn's text on one line: TURN_END is a newline, so a newline inside a turn would end it."""
    return " ".join(text.split("\n")).strip()


def session_line(number: int, time_gap: str | None) -> str:
    gap = f", {time_gap} later" if time_gap else ""
    return f"[session {number}{gap}]\n"


def memory_steps(dialogue: Dialogue, speakers_as: set[str] | None) -> list[TurnStep] | Reject:
    """The turns as steps; `speakers_as` None or containing "*" trains every speaker."""
    gaps = {s.get("session"): s.get("time_gap") for s in dialogue.meta.get("sessions", []) if isinstance(s, dict)}
    every = not speakers_as or "*" in speakers_as
    steps: list[TurnStep] = []
    previous_session = None
    for turn in dialogue.turns:
        session = turn.session if turn.session is not None else 1
        prefix = ""
        if session != previous_session and (previous_session is not None or session > 1):
            prefix = session_line(session, gaps.get(session))
        previous_session = session
        if turn.speaker is not None:
            prefix += f"{turn.speaker}:"
        trained = turn.speaker is not None and (every or turn.speaker in speakers_as)
        steps.append(TurnStep(prefix, f" {one_line(turn.text)}{TURN_END}", session, trained))
    if not any(step.trained for step in steps):
        wanted = ", ".join(sorted(speakers_as or ()))
        return Reject(dialogue.source, dialogue.line, f"no turn by {wanted} to train", stage="unused")
    return steps
