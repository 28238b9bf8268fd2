"""`dialogtune inspect DIR [--index N]`: one prepared example, decoded, with the tokens the
model learns marked (green on a terminal, [[brackets]] when piped), so a user sees what
training will teach before spending an hour on it."""

from __future__ import annotations

import sys
from itertools import pairwise
from pathlib import Path

import numpy as np

from dialogtune.errors import DataError
from dialogtune.models import load_tokenizer
from dialogtune.records import PreparedInfo
from dialogtune.tokenize import IGNORE_INDEX

GREEN, RESET = "\033[1;32m", "\033[0m"


def example_bounds(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each packed example: positions restart at 0 where an example starts."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(pairwise(starts))


def locate(dataset, index: int) -> tuple[int, int, int, int]:
    """(row, start, end, total examples) of the index-th example across packed rows."""
    if index < 0:
        raise DataError(f"--index {index}: examples are numbered from 0")
    seen = 0
    found = None
    for row, positions in enumerate(dataset["position_ids"]):
        bounds = example_bounds(positions)
        if found is None and index < seen + len(bounds):
            found = (row, *bounds[index - seen])
        seen += len(bounds)
    if found is None:
        raise DataError(f"--index {index} is out of range: this split has {seen} examples (0..{seen - 1})")
    return (*found, seen)


def render_marked(tokenizer, ids: np.ndarray, trained: np.ndarray, colour: bool) -> str:
    pieces = []
    edges = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    for chunk_ids, chunk_trained in zip(np.split(ids, edges), np.split(trained, edges)):
        text = tokenizer.decode(chunk_ids.tolist(), skip_special_tokens=False)
        if chunk_trained[0]:
            text = f"{GREEN}{text}{RESET}" if colour else f"[[{text}]]"
        pieces.append(text)
    return "".join(pieces)


def inspect(directory: Path, index: int = 0, split: str = "train", colour: bool | None = None) -> str:
    import datasets

    manifest = PreparedInfo.load(directory)
    path = Path(directory) / split
    if not path.exists():
        raise DataError(f"{directory}: no split {split!r}")
    dataset = datasets.load_from_disk(str(path))
    if len(dataset) == 0:
        raise DataError(f"{path}: the split is empty")
    colour = sys.stdout.isatty() if colour is None else colour
    if manifest.task == "memory":
        return inspect_dialogue(dataset, index, split, load_tokenizer(manifest.model), colour)
    row, start, end, total = locate(dataset, index)
    record = dataset[row]
    ids = np.asarray(record["input_ids"][start:end])
    labels = np.asarray(record["labels"][start:end])
    trained = labels != IGNORE_INDEX
    bounds = example_bounds(record["position_ids"])
    member = bounds.index((start, end))
    tokenizer = load_tokenizer(manifest.model)
    header = (
        f"{split} example {index} of {total} (dialogue {record['dialogue_ids'][member]}, row {row},"
        f" {len(bounds)} example(s) in the row)\n"
        f"tokens: {len(ids)}   trained: {int(trained.sum())} ({trained.mean():.1%})"
        f"   template: {manifest.template.name}   end of turn: {manifest.template.end_of_turn!r}\n"
        + ("trained tokens in green" if colour else "trained tokens in [[double brackets]]")
        + "\n" + "-" * 72
    )
    return header + "\n" + render_marked(tokenizer, ids, trained, colour)


def inspect_dialogue(dataset, index: int, split: str, tokenizer, colour: bool) -> str:
    """A memory preparation's index-th dialogue: every turn as its step reads it (prefix) and
    learns it (text, marked when trained); the history window is cut at training time."""
    if not 0 <= index < len(dataset):
        raise DataError(f"--index {index} is out of range: this split has {len(dataset)} dialogues"
                        f" (0..{len(dataset) - 1})")
    record = dataset[index]
    pieces, tokens, trained_tokens = [], 0, 0
    for prefix, text, trained in zip(record["prefix_ids"], record["text_ids"], record["trained"]):
        marks = np.asarray([False] * len(prefix) + [trained] * len(text))
        pieces.append(render_marked(tokenizer, np.asarray(prefix + text), marks, colour))
        tokens += len(prefix) + len(text)
        trained_tokens += len(text) if trained else 0
    header = (f"{split} dialogue {index} of {len(dataset)} ({record['dialogue_id']}): {len(record['trained'])} turns"
              f" in {max(record['sessions'])} session(s)\n"
              f"tokens: {tokens}   trained: {trained_tokens} ({trained_tokens / max(tokens, 1):.1%})   task: memory"
              " (each turn is one step: the last memory.window tokens before it, its prefix, its text)\n"
              + ("trained tokens in green" if colour else "trained tokens in [[double brackets]]") + "\n" + "-" * 72)
    return header + "\n" + "".join(pieces)
