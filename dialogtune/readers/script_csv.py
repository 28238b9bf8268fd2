"""Film/TV scripts as CSV, one row a line: a speaker column, a text column and optionally an
episode (or scene) column and a season column. Consecutive rows of one episode form one dialogue
(with a season column, of one season and episode: S1E1 and S2E1 are different dialogues), so
splitting by dialogue never puts two windows of the same episode on both sides of the split.

Columns are found by name with case, spaces and punctuation ignored (`episode no.`,
`Episode Number` and `episode_id` are all the episode); `data.columns` names them exactly.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.errors import DataError
from dialogtune.readers._io import open_text
from dialogtune.textfix import clean_text

# Normalised header names (see `normalise_header`), in order of preference.
COLUMN_NAMES = {
    "speaker": ("speaker", "name", "character", "charactername", "role", "author"),
    "text": ("text", "line", "utterance", "dialogue", "content", "message"),
    "episode": ("episode", "episodeno", "episodenumber", "episodenum", "episodeid", "scene", "sceneno",
                "scenenumber", "sceneid", "dialogueid", "conversationid", "episodename", "episodetitle"),
    "season": ("season", "seasonno", "seasonnumber", "seasonnum", "seasonid"),
}
REQUIRED = ("speaker", "text")
_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")
_WHOLE_NUMBER = re.compile(r"\d+(\.0*)?")  # "3", and "3.0" as spreadsheets and pandas write it


def normalise_header(name: str) -> str:
    """`Episode No.`, `episode_no` and `episode no` all become `episodeno`."""
    return _NOT_ALPHANUMERIC.sub("", name.lower())


def detect_columns(header: list[str], given: dict[str, str | None], path: Path) -> dict[str, str | None]:
    normalised: dict[str, str] = {}
    for name in header:
        normalised.setdefault(normalise_header(name), name)  # the first of two look-alike columns wins
    chosen: dict[str, str | None] = {}
    for key, candidates in COLUMN_NAMES.items():
        name = given.get(key)
        if name is not None:
            if name not in header:
                raise DataError(f"{path}: no column {name!r} (columns: {', '.join(header)})")
            chosen[key] = name
            continue
        chosen[key] = next((normalised[c] for c in candidates if c in normalised), None)
        if chosen[key] is None and key in REQUIRED:
            raise DataError(
                f"{path}: cannot find the {key} column among {header}; name it with"
                f" data.columns.{key} (looked for {', '.join(candidates)}, ignoring case, spaces and punctuation)"
            )
    return chosen


def episode_name(season: str | None, episode: str) -> str:
    """A readable dialogue name: `s1e1` for season 1 episode 1, else the values as written."""
    if season is None:
        return episode
    season, episode = season.strip(), episode.strip()
    if _WHOLE_NUMBER.fullmatch(season) and _WHOLE_NUMBER.fullmatch(episode):
        return f"s{int(float(season))}e{int(float(episode))}"
    return f"{season}/{episode}"


def read(path: Path, *, columns: dict[str, str | None] | None = None, **_: object) -> Iterator[Dialogue | Reject]:
    source = str(path)
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty CSV file")
        cols = detect_columns(list(reader.fieldnames), columns or {}, path)
        episode_key = cols["episode"]
        if episode_key is None and (columns or {}).get("season"):
            raise DataError(f"{path}: data.columns.season names {columns['season']!r} but there is no episode column;"
                            " a season only tells episodes apart: name one with data.columns.episode")
        # A season only tells episodes apart: without an episode column it would make a whole
        # season one dialogue.
        season_key = cols["season"] if episode_key is not None else None
        turns: list[Turn] = []
        episode: tuple[str | None, str] | None = None
        first_line = 2
        count = 0

        def flush() -> Iterator[Dialogue]:
            nonlocal turns, count
            if turns:
                name = episode_name(*episode) if episode is not None else str(count)
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
                if episode_key is not None:
                    season = (row[season_key] or "") if season_key else None
                    row_episode = (season, row[episode_key] or "")
                    if row_episode != episode:
                        yield from flush()
                        episode, first_line = row_episode, lineno
                speaker = clean_text(row.get(cols["speaker"]) or "")
                text = clean_text(row.get(cols["text"]) or "")
                if not text:
                    yield Reject(source, lineno, f"empty text in column {cols['text']!r}")
                    continue
                turns.append(Turn(speaker or None, text, meta={"line": lineno}))
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {err}") from err
        yield from flush()
