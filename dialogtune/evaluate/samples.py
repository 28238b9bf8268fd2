"""Evaluation samples from a prepared split, and fitting each into a model's own context.

A sample is one trained turn (a run of trained tokens) of a prepared example: its reference is
the turn's text, its context everything before it. Evaluation prepares whole examples (nothing
is split off or rejected for length), so the samples depend on the data alone and every model
in a comparison gets the same ones. A context longer than the model can read is cut here, at
evaluation, from the left: the head (the system prompt and the task's instruction) and the end
(the turn being answered, the reply's header) stay, the oldest context between them goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dialogtune.tokenize import IGNORE_INDEX


@dataclass
class Sample:
    index: int
    example_ids: list[int]  # the whole prepared example (one list shared by all its samples)
    start: int  # the turn's tokens are example_ids[start:end]
    end: int
    reference: str
    session: int  # the turn's session in multi-session data; -1 when there is none or it cannot be told

    @property
    def key(self) -> tuple[int, str]:
        """What must be equal for two models to be scored on the same sample: not token ids,
        which differ between tokenizers."""
        return self.index, self.reference

    @property
    def context_ids(self) -> list[int]:
        return self.example_ids[: self.start]


def trained_runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive trained positions: the trained turns, in order."""
    trained = np.concatenate([[0], (labels != IGNORE_INDEX).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(trained))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def samples_of(rows, tokenizer, end_of_turn: str, limit: int | None = None) -> list[Sample]:
    """Every trained turn of the prepared rows (one example a row, unpacked), in order."""
    samples: list[Sample] = []
    for row in rows:
        ids = list(row["input_ids"])
        runs = trained_runs(np.asarray(row["labels"]))
        sessions = list(row.get("turn_sessions") or [])
        if len(sessions) != len(runs):  # trained turns that touch read as one run: its session is ambiguous
            sessions = [-1] * len(runs)
        for (start, end), session in zip(runs, sessions, strict=True):
            if limit is not None and len(samples) >= limit:
                return samples
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            samples.append(Sample(len(samples), ids, start, end, text.split(end_of_turn)[0].strip(), session))
    return samples


@dataclass(frozen=True)
class ContextFit:
    """Cuts token sequences from the left to a length, keeping their head: everything up to the
    end of the last of `keep` (texts such as the system prompt or the instruction) found in
    them. A head longer than half the room is not kept: the end matters more."""

    tokenizer: Any
    keep: tuple[str, ...]

    def __call__(self, ids: list[int], limit: int) -> list[int]:
        if len(ids) <= limit:
            return ids
        head = self.head_length(ids)
        if head > limit // 2:
            head = 0
        return ids[:head] + ids[len(ids) - (limit - head):]

    def head_length(self, ids: list[int]) -> int:
        """The fewest leading tokens whose text covers every `keep` text (0 if none occurs)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        ends = [text.find(kept) + len(kept) for kept in self.keep if kept and kept in text]
        if not ends:
            return 0
        chars, low, high = max(ends), 0, len(ids)
        while low < high:  # a prefix's text only grows with its tokens: bisect on its length
            middle = (low + high) // 2
            if len(self.tokenizer.decode(ids[:middle], skip_special_tokens=False)) >= chars:
                high = middle
            else:
                low = middle + 1
        return low
