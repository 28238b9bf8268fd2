"""Readers: one module per input format, each streaming `Dialogue`s and `Reject`s."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.errors import DataError
from dialogtune.readers import dailydialog, endoftext, messages, msc, parlai, rows, script_csv, sgd, transcript
from dialogtune.readers._io import base_suffix, open_text

Reader = Callable[..., Iterator[Dialogue | Reject]]

FORMATS: dict[str, Reader] = {
    "msc": msc.read,
    "endoftext": endoftext.read,
    "transcript": transcript.read,
    "script_csv": script_csv.read,
    "rows": rows.read,
    "sgd": sgd.read,
    "messages": messages.read,
    "parlai": parlai.read,
    "dailydialog": dailydialog.read,
}

# Formats whose reader records the tool calls behind a turn (`turn.meta["tool_calls"]`), what
# `task.tool_calls` trains: SGD's service calls and results.
TOOL_CALL_FORMATS = ("sgd",)

__all__ = ["FORMATS", "TOOL_CALL_FORMATS", "DataError", "detect_format", "read_dialogues"]


def _head(path: Path, size: int = 4096) -> str:
    with open_text(path) as fh:
        return fh.read(size)


def _mostly_dailydialog(head: str) -> bool:
    """Most lines hold `__eou__` markers. Decided before transcript: DailyDialog turns such as
    `Sure , it's 7:15 now` would otherwise read as a `Name: line` transcript."""
    lines = [line for line in head.splitlines() if line.strip()]
    return sum(dailydialog.EOU in line for line in lines) * 2 > len(lines)


def detect_format(path: Path) -> str:
    """Guess a file's format from its name and first few kilobytes."""
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if any(n.startswith("dialogues_") for n in names):
            return "sgd"
        if "dataset_info.json" in names or "state.json" in names:
            return "rows"
        raise DataError(f"{path}: a directory that is neither SGD (dialogues_*.json) nor a saved dataset")
    suffix = base_suffix(path)
    if suffix == ".parquet":
        return "rows"
    head = _head(path)
    first_line = next((line for line in head.splitlines() if line.strip()), "")
    if suffix == ".csv":
        header = {h.strip().strip('"').lower() for h in first_line.split(",")}
        return "rows" if {"input", "response"} <= header or "summary" in header else "script_csv"
    # ParlAI's MSC release: one episode a line (its own files are `.txt`), told by its keys before
    # `messages`; the whole first line is parsed, as an episode is often longer than `head`.
    if head.lstrip().startswith("{") and msc.is_episode(msc.first_record(path)):
        return "msc"
    if suffix in (".jsonl", ".json"):
        if suffix == ".json" and head.lstrip().startswith("{") and '"dial_id"' in head:
            return "msc"
        if re.match(r"\s*\[\s*\"", head):
            return "endoftext"
        if '"messages"' in head or '"conversations"' in head:
            return "messages"
        if '"dialogue_id"' in head and '"turns"' in head:
            return "sgd"
        if '"input"' in head or '"dialogue"' in head:
            return "rows"
    else:
        if _mostly_dailydialog(head):
            return "dailydialog"
        if re.match(r"\d+ ", first_line) or first_line.startswith("text:"):
            return "parlai"
        if endoftext.SEPARATOR in head:
            return "endoftext"
        return "transcript"
    raise DataError(f"{path}: cannot tell the format; name it with --format ({', '.join(FORMATS)})")


def read_dialogues(path: Path, fmt: str = "auto", **options: object) -> Iterator[Dialogue | Reject]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return _named_errors(path, FORMATS[fmt](path, **options))


def _named_errors(path: Path, items: Iterator[Dialogue | Reject]) -> Iterator[Dialogue | Reject]:
    """A file that breaks while being read (not gzip after all, corrupt Parquet, a disk error)
    is a DataError naming it, not a traceback."""
    import pyarrow as pa

    try:
        yield from items
    except DataError:
        raise
    except (OSError, EOFError, UnicodeError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
