"""`Name: utterance` transcripts (plays, chat logs, character sheets).

- A line starting with a speaker name and a colon is a turn. The name must match exactly
  (a strict prefix, never `str.lstrip`, which strips characters, not a prefix). With
  `speakers` given, only those names start turns; otherwise any short name does
  (at most four words, starting with a letter).
- Other lines are narration: kept as turns without a speaker, so tasks can use them as context.
- A blank line or a `---` line ends a scene; each scene is its own dialogue (and split group).
- `(actions)` inside lines are kept, or removed with `actions: drop`.
- When most lines are narration, the file is probably not a transcript at all (DailyDialog's
  `__eou__` lines, say): a note saying so, with the formats that fit, goes to `notes`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.readers import dailydialog, endoftext
from dialogtune.readers._io import open_text
from dialogtune.textfix import clean_text

_TURN = re.compile(r"^\s*([^\W\d_][^:\n]{0,39}?)\s*:(.*)$")
_SCENE_BREAK = re.compile(r"^\s*(-{3,}|\*{3,}|={3,})\s*$")
_ACTION = re.compile(r"\s*\([^()]*\)\s*")
MAX_NAME_WORDS = 4
# Signs, in narration lines, of a file that is some other format: (sign, what to do about it).
FORMAT_SIGNS = (
    (lambda line: dailydialog.EOU in line, f"{dailydialog.EOU} turn separators in {{}}: --format dailydialog"),
    (lambda line: endoftext.SEPARATOR in line, f"{endoftext.SEPARATOR} separators in {{}}: --format endoftext"),
    (lambda line: line.lstrip().startswith("{"), "JSON records in {}: name the file .jsonl (messages, rows)"),
)


def split_speaker(line: str, speakers: list[str] | None) -> tuple[str, str] | None:
    """Return (name, text) if the line is a turn, else None (narration)."""
    if speakers is not None:
        for name in speakers:
            if line.startswith(name + ":"):
                return name, line[len(name) + 1 :]
        return None
    match = _TURN.match(line)
    if not match:
        return None
    name = match.group(1).strip()
    if len(name.split()) > MAX_NAME_WORDS or name.endswith((".", ",", "!", "?")):
        return None
    return name, match.group(2)


def narration_note(path: Path, lines: int, narration: int, signs: list[int]) -> str | None:
    """A warning when most lines are narration, naming the formats that would fit better."""
    if narration * 2 <= lines:
        return None
    found = [remedy.format(f"{count} of them") for count, (_, remedy) in zip(signs, FORMAT_SIGNS, strict=True) if count]
    advice = "; ".join(found) or (
        "if it is not a `Name: line` transcript, name its format with --format (dailydialog: `__eou__`-separated"
        " turns; endoftext; parlai), or name the speakers with data.speakers")
    return (f"{path}: {narration} of {lines} lines ({narration / lines:.0%}) have no `Name:` speaker tag and were"
            f" read as narration; {advice}")


def read(
    path: Path,
    *,
    speakers: list[str] | None = None,
    actions: str = "keep",
    notes: list[str] | None = None,
    **_: object,
) -> Iterator[Dialogue | Reject]:
    """`notes`, when given, receives a note about the whole file once it has been read."""
    source = str(path)
    known = list(speakers) if speakers else None
    turns: list[Turn] = []
    scene_line = 1
    scene = 0
    lines = narration = 0
    signs = [0] * len(FORMAT_SIGNS)

    def flush() -> Iterator[Dialogue | Reject]:
        nonlocal turns, scene
        if any(t.speaker is not None for t in turns):
            scene_id = f"{path.name}#scene{scene}"
            yield Dialogue(scene_id, turns, source=source, line=scene_line)
            scene += 1
        elif turns:
            yield Reject(source, scene_line, f"scene of {len(turns)} narration line(s) and no speaker line")
        turns = []

    with open_text(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.rstrip("\r\n")
            if not line.strip() or _SCENE_BREAK.match(line):
                yield from flush()
                scene_line = lineno + 1
                continue
            lines += 1
            parsed = split_speaker(line, known)
            if parsed is None:
                narration += 1
                for index, (sign, _) in enumerate(FORMAT_SIGNS):
                    signs[index] += sign(line)
                text = clean_text(line)
                turns.append(Turn(None, text, meta={"line": lineno}))
                continue
            name, text = parsed
            if actions == "drop":
                text = _ACTION.sub(" ", text)
            text = clean_text(text)
            if not text:
                yield Reject(source, lineno, f"empty text after speaker {name!r}")
                continue
            turns.append(Turn(clean_text(name), text, meta={"line": lineno}))
    yield from flush()
    note = narration_note(path, lines, narration, signs)
    if note and notes is not None:
        notes.append(note)
