"""Film/TV scripts as CSV, one row a line: a speaker column, a text column and optionally an
episode (or scene) column. Consecutive rows of one episode form one dialogue, so splitting
by dialogue never puts two windows of the same episode on both sides of the split.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.errors import DataError
from dialogtune.readers._io import open_text
from dialogtune.textfix import clean_text

COLUMN_NAMES = {
    "speaker": ("speaker", "name", "character", "role", "author"),
    "text": ("text", "line", "utterance", "dialogue", "content", "message"),
    "episode": ("episode", "scene", "episode_id", "scene_id", "dialogue_id", "conversation_id"),
}


def detect_columns(header: list[str], given: dict[str, str | None], path: Path) -> dict[str, str | None]:
    lower = {h.strip().lower(): h for h in header}
    chosen: dict[str, str | None] = {}
    for key, candidates in COLUMN_NAMES.items():
        name = given.get(key)
        if name is not None:
            if name not in header:
                raise DataError(f"{path}: no column {name!r} (columns: {', '.join(header)})")
            chosen[key] = name
            continue
        chosen[key] = next((lower[c] for c in candidates if c in lower), None)
        if chosen[key] is None and key != "episode":
            raise DataError(
                f"{path}: cannot find the {key} column among {header}; name it with"
                f" data.columns.{key} (looked for {', '.join(candidates)})"
            )
    return chosen


def read(path: Path, *, columns: dict[str, str | None] | None = None, **_: object) -> Iterator[Dialogue | Reject]:
    source = str(path)
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty CSV file")
        cols = detect_columns(list(reader.fieldnames), columns or {}, path)
        episode_key = cols["episode"]
        turns: list[Turn] = []
        episode: str | None = None
        first_line = 2
        count = 0

        def flush() -> Iterator[Dialogue]:
            nonlocal turns, count
            if turns:
                name = episode if episode is not None else str(count)
                yield Dialogue(f"{path.name}#{name}", turns, source=source, line=first_line,
                               meta={"group": f"{path.name}#{name}"})
                count += 1
            turns = []

        try:
            for row in reader:
                lineno = reader.line_num
                if None in row:
                    yield Reject(source, lineno, f"row has {len(reader.fieldnames) + len(row[None])} fields,"
                                 f" the header has {len(reader.fieldnames)}")
                    continue
                if episode_key is not None and row.get(episode_key) != episode:
                    yield from flush()
                    episode = row.get(episode_key)
                    first_line = lineno
                speaker = clean_text(row.get(cols["speaker"]) or "")
                text = clean_text(row.get(cols["text"]) or "")
                if not text:
                    yield Reject(source, lineno, f"empty text in column {cols['text']!r}")
                    continue
                turns.append(Turn(speaker or None, text, meta={"line": lineno}))
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {err}") from err
        yield from flush()
