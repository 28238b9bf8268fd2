"""DailyDialog text files (`dialogues_text.txt`, `dialogues_train.txt` ...): one dialogue a line,
turns separated by `__eou__` (end of utterance), which usually also ends the line.

The two speakers alternate by position and are named `A` (first turn) and `B`. A dialogue's id
is its 0-based line index, the index the companion `dialogues_act_*` and `dialogues_emotion_*`
files use. An empty turn between two markers is rejected with its line and position; the rest of
the dialogue is kept, its speakers still assigned by position.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.readers._io import open_text
from dialogtune.textfix import clean_text

EOU = "__eou__"


def split_turns(line: str) -> list[str]:
    """The turns of one line, empty ones included; the empty piece after a final marker is not a turn."""
    parts = line.split(EOU)
    if not parts[-1].strip():
        parts.pop()
    return [clean_text(part) for part in parts]


def read(path: Path, **_: object) -> Iterator[Dialogue | Reject]:
    source = str(path)
    with open_text(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if EOU not in line:
                yield Reject(source, lineno, f"no {EOU} marker: not a DailyDialog line")
                continue
            texts = split_turns(line)
            empty = [index for index, text in enumerate(texts) if not text]
            if empty:
                yield Reject(source, lineno, f"empty turn(s) {empty} between {EOU} markers")
            turns = [Turn("A" if index % 2 == 0 else "B", text) for index, text in enumerate(texts) if text]
            if turns:
                yield Dialogue(f"{path.name}#{lineno - 1}", turns, source=source, line=lineno)
