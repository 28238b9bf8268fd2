"""DialoGPT-style raw samples: turns joined by `<|endoftext|>`.

A JSON list of strings, or (any other file) one sample per line. The two speakers of a
sample alternate; they are named `A` (first turn) and `B`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.errors import DataError
from dialogtune.readers._io import base_suffix, load_json, open_text
from dialogtune.textfix import clean_text

SEPARATOR = "<|endoftext|>"


def _samples(path: Path) -> Iterator[tuple[int | None, str | None, object]]:
    if base_suffix(path) == ".json":
        data = load_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of strings")
        for index, sample in enumerate(data):
            yield None, f"[{index}]", sample
    else:
        with open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield lineno, None, line.rstrip("\r\n")


def read(path: Path, **_: object) -> Iterator[Dialogue | Reject]:
    source = str(path)
    for number, (lineno, item, sample) in enumerate(_samples(path)):
        if not isinstance(sample, str):
            yield Reject(source, lineno, f"expected a string, got {type(sample).__name__}", item=item)
            continue
        # Speakers alternate by position, so an empty part keeps its place in the alternation.
        turns = [Turn("A" if i % 2 == 0 else "B", text)
                 for i, text in enumerate(clean_text(part) for part in sample.split(SEPARATOR)) if text]
        if not turns:
            yield Reject(source, lineno, "sample has no text", item=item)
            continue
        yield Dialogue(f"{path.name}#{number}", turns, source=source, line=lineno)
