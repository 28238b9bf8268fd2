"""Evaluation samples from a prepared split, and fitting each into a model's own context.

A sample is one trained turn (a run of trained tokens) of a prepared example: its reference is
the turn's text as the data had it (the split's `trained_messages`), its context everything
before it. Evaluation prepares whole examples (nothing is split off or rejected for length), so
the samples depend on the data alone and every model in a comparison gets the same ones, whatever
its tokenizer makes of the text. A context longer than the model can read is cut here, at
evaluation, from the left: the head (the whole system message, persona lines and all, and the
summarize instruction) and the end (the turn being answered, the reply's header) stay, the oldest
context between them goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dialogtune.tokenize import trained_runs

PLACEHOLDER = "\ue000"  # stands for a message's text when rendering the template around it


@dataclass
class Sample:
    index: int
    example_ids: list[int]  # the whole prepared example (one list shared by all its samples)
    start: int  # the turn's tokens are example_ids[start:end]
    end: int
    reference: str
    session: int  # the turn's session in multi-session data; -1 when there is none or it cannot be told
    system: str | None = None  # the example's system message ("" for none); None where the data does not say

    @property
    def key(self) -> tuple[int, str]:
        """What must be equal for two models to be scored on the same sample: not token ids,
        which differ between tokenizers."""
        return self.index, self.reference

    @property
    def context_ids(self) -> list[int]:
        return self.example_ids[: self.start]


def samples_of(rows, tokenizer, end_of_turn: str, limit: int | None = None) -> list[Sample]:
    """Every trained turn of the prepared rows (one example a row, unpacked), in order. The
    reference is the turn's source text; data prepared without it (or whose trained turns touch
    and read as one run) falls back to the turn's tokens decoded."""
    samples: list[Sample] = []
    for row in rows:
        ids = list(row["input_ids"])
        runs = trained_runs(np.asarray(row["labels"]))
        sessions = list(row.get("turn_sessions") or [])
        if len(sessions) != len(runs):  # trained turns that touch read as one run: its session is ambiguous
            sessions = [-1] * len(runs)
        sources = row.get("trained_messages")
        if sources is None or len(sources) != len(runs):
            sources = [None] * len(runs)
        systems = row.get("system_messages")
        system = systems[0] if systems is not None and len(systems) == 1 else None
        for (start, end), session, source in zip(runs, sessions, sources, strict=True):
            if limit is not None and len(samples) >= limit:
                return samples
            if source is None:
                source = tokenizer.decode(ids[start:end], skip_special_tokens=False).split(end_of_turn)[0].strip()
            samples.append(Sample(len(samples), ids, start, end, source, session, system))
    return samples


@dataclass
class ContextFit:
    """Cuts token sequences from the left to a length, keeping their head: everything before the
    first message after the system message (the system message whole, the next message's header,
    and for summarize the instruction that opens it). A head that takes more than half the room,
    or leaves too little for the `tail` that must stay whole, is dropped: the end matters more.

    The head is found by rendering the model's chat template around the sample's system message,
    so it is the template's own text, tokenized as the example was. Where that does not match
    (a template that rewrites the system message), the head is the fewest tokens whose decoded
    text covers the system message and the instruction."""

    tokenizer: Any
    system_prompt: str | None = None  # the configured one: the system message of data that does not record it
    instruction: str | None = None  # summarize's, which opens the first user message
    _heads: dict[str, list[list[int]]] = field(default_factory=dict, init=False, repr=False)  # by system message

    def __call__(self, ids: list[int], limit: int, system: str | None = None, tail: int = 0) -> tuple[list[int], bool]:
        """The ids cut to `limit`, and whether a head had to be dropped to make them fit."""
        if len(ids) <= limit:
            return ids, False
        head = self.head_length(ids, system)
        dropped = head > limit // 2 or head + tail > limit
        if dropped:
            head = 0
        return ids[:head] + ids[len(ids) - (limit - head) :], dropped

    def head_length(self, ids: list[int], system: str | None = None) -> int:
        """How many leading tokens are the head (0 if none is found)."""
        for head in self.rendered_heads(system if system is not None else self.system_prompt or ""):
            if ids[: len(head)] == head:
                return len(head)
        texts = (system if system is not None else self.system_prompt, self.instruction)
        return self.covering_length(ids, [text for text in texts if text])

    def rendered_heads(self, system: str) -> list[list[int]]:
        """The head as the template writes it, tokenized, longest first: the system message and
        the header of a first user or assistant message (with the instruction), or the system
        message alone. Each also without trailing white space, which may tokenize with the text after it."""
        if system in self._heads:
            return self._heads[system]
        opening = [{"role": "system", "content": system}] if system else []
        firsts = ([{"role": "user", "content": f"{self.instruction}\n{PLACEHOLDER}"}] if self.instruction else
                  [{"role": "user", "content": PLACEHOLDER}, {"role": "assistant", "content": PLACEHOLDER}])
        texts = [text.split(PLACEHOLDER)[0] for text in (self.render([*opening, first]) for first in firsts)
                 if text and PLACEHOLDER in text]
        if opening:
            texts.append(self.render(opening) or "")
        heads = {tuple(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                 for text in texts for t in (text, text.rstrip()) if t}
        self._heads[system] = sorted(map(list, heads), key=len, reverse=True)
        return self._heads[system]

    def render(self, messages: list[dict[str, str]]) -> str | None:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except (jinja2.TemplateError, ValueError):  # a template that refuses this shape (no system role, say)
            return None

    def covering_length(self, ids: list[int], texts: list[str]) -> int:
        """The fewest leading tokens whose text covers every one of `texts` found in them (0 if none is)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        ends = [text.find(kept) + len(kept) for kept in texts if kept in text]
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
