"""Record-per-example data: `{input, response, contexts?}` (SAMSum style prompt/response
pairs) and `{dialogue, summary}` (a `Name: text` dialogue and its summary).

Sources: JSON list, JSONL, CSV, Parquet, or a `datasets` directory from `save_to_disk`.
- `{input, response}` becomes a two-turn dialogue, `user` then `assistant`; `contexts`
  (a list of strings) becomes the dialogue's system text.
- `{dialogue, summary}` is parsed into speaker turns; the summary is kept for `summarize`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.errors import DataError
from dialogtune.readers._io import base_suffix, iter_jsonl, load_json, open_text
from dialogtune.readers.transcript import split_speaker
from dialogtune.textfix import clean_text

# (line, item, row or None, error or None)
Row = tuple[int | None, str | None, Any, str | None]


def iter_rows(path: Path) -> Iterator[Row]:
    if path.is_dir():
        import datasets

        try:
            table = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({err})") from err
        if isinstance(table, datasets.DatasetDict):
            raise DataError(f"{path}: holds several splits ({', '.join(table)}); point at one of them")
        for index, row in enumerate(table):
            yield None, f"[{index}]", row, None
        return
    suffix = base_suffix(path)
    if suffix == ".jsonl":
        for lineno, row, error in iter_jsonl(path):
            yield lineno, None, row, error
    elif suffix == ".json":
        data = load_json(path)
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        for index, row in enumerate(data):
            yield None, f"[{index}]", row, None
    elif suffix == ".csv":
        with open_text(path) as fh:
            reader = csv.DictReader(fh)
            try:
                for row in reader:
                    if None in row:
                        # More fields than the header (an unquoted comma): the text would be cut
                        # short silently, and `sorted(row)` in a reason would fail on the None key.
                        yield reader.line_num, None, None, (
                            f"row has {len(reader.fieldnames) + len(row[None])} fields,"
                            f" the header has {len(reader.fieldnames)}")
                        continue
                    yield reader.line_num, None, row, None
            except csv.Error as err:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV: {err}") from err
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield None, f"[{index}]", row, None
                index += 1
    else:
        raise DataError(f"{path}: rows must be .json, .jsonl, .csv, .parquet or a datasets directory")


def parse_dialogue_text(text: str) -> list[Turn]:
    turns = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        parsed = split_speaker(line, None)
        if parsed is None:
            turns.append(Turn(None, clean_text(line)))
        else:
            name, said = parsed
            said = clean_text(said)
            if said:
                turns.append(Turn(clean_text(name), said))
    return turns


def row_to_dialogue(row: dict, dialogue_id: str, source: str, line: int | None) -> Dialogue | str:
    """A Dialogue, or the reason the row cannot be used."""
    if "input" in row or "response" in row:
        prompt, response = row.get("input"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            return "needs string fields 'input' and 'response'"
        prompt, response = clean_text(prompt), clean_text(response)
        if not prompt or not response:
            return "empty 'input'" if not prompt else "empty 'response'"
        meta: dict[str, Any] = {}
        contexts = row.get("contexts")
        if contexts:
            if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
                return "'contexts' must be a list of strings"
            meta["system"] = "\n".join(clean_text(c) for c in contexts)
        turns = [Turn("user", prompt), Turn("assistant", response)]
        return Dialogue(dialogue_id, turns, source=source, line=line, meta=meta)
    if "dialogue" in row:
        text, summary = row.get("dialogue"), row.get("summary")
        if not isinstance(text, str):
            return "needs a string field 'dialogue'"
        turns = parse_dialogue_text(text)
        if not turns:
            return "empty 'dialogue'"
        meta = {}
        if isinstance(summary, str) and clean_text(summary):
            meta["summary"] = clean_text(summary)
        return Dialogue(dialogue_id, turns, source=source, line=line, meta=meta)
    return f"expected fields input/response or dialogue/summary, got {sorted(row)}"


def read(path: Path, **_: object) -> Iterator[Dialogue | Reject]:
    source = str(path)
    for number, (line, item, row, error) in enumerate(iter_rows(path)):
        if error is None and not isinstance(row, dict):
            error = f"expected an object, got {type(row).__name__}"
        if error is not None:
            yield Reject(source, line, error, item=item)
            continue
        dialogue_id = str(row.get("id", f"{path.name}#{number}"))
        result = row_to_dialogue(row, dialogue_id, source, line)
        if isinstance(result, str):
            yield Reject(source, line, result, item=item)
        else:
            yield result
