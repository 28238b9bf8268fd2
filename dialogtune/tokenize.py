"""Render an example with its chat template once, tokenize it once, label it exactly.

The steps, one module each: `render` gives the text `apply_chat_template` gives and every
trained message's character span (through its end-of-turn marker); the tokenizer runs once
over a batch; `locate` says which token covers a character; a token is trained when it holds
part of a trained span (no per-token Python loop). Examples longer than `max_length` are cut into
pieces by `fit`. This module joins the steps and holds the data contract: `Tokenized`,
`TokenizeStats` and `IGNORE_INDEX` (torch-free: `prepare` must not import torch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dialogtune.dialogue import Reject
from dialogtune.errors import TemplateError
from dialogtune.fit import fit, fit_ahead
from dialogtune.locate import Located, TokenLocator
from dialogtune.render import ExampleRejected, Rendered, TemplateRenderer
from dialogtune.tasks import Example
from dialogtune.templates import ChatTemplate

IGNORE_INDEX = -100


def trained_runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive trained positions: the trained turns, in order."""
    trained = np.concatenate([[0], (labels != IGNORE_INDEX).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(trained))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def token_counter(tokenizer):
    """text -> its number of tokens, no special tokens added: how prompt budgets are measured."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


@dataclass(slots=True)
class Tokenized:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    example: Example


@dataclass
class TokenizeStats:
    examples_split: int = 0  # longer than max_length, cut at turn boundaries into several pieces
    context_truncated: int = 0  # pieces whose oldest context was dropped to fit
    turns_too_long: int = 0  # trained turns that cannot fit even alone (listed as rejects)
    rejects: list[Reject] = field(default_factory=list)

    def reject(self, example: Example, reason: str) -> None:
        self.rejects.append(Reject(example.source, example.line, reason, stage="tokenize", item=example.dialogue_id))

    def merge(self, other: TokenizeStats) -> None:
        """Add the counts and rejects of another batch (one a worker process tokenized)."""
        self.examples_split += other.examples_split
        self.context_truncated += other.context_truncated
        self.turns_too_long += other.turns_too_long
        self.rejects.extend(other.rejects)


class ExampleEncoder:
    def __init__(self, tokenizer, template: ChatTemplate, max_length: int, *, by_offsets: bool = False):
        """`by_offsets`: locate every token by the tokenizer's offsets, never by byte lengths
        (the reference the byte-length path is checked against)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TemplateError(
                f"the tokenizer {tokenizer.name_or_path!r} is not a fast (Rust) tokenizer; dialogtune needs"
                " character offsets, which only fast tokenizers give"
            )
        self.max_length = max_length
        self.renderer = TemplateRenderer(template, tokenizer.special_tokens_map)
        self.locator = TokenLocator(backend, by_offsets)

    def encode(self, examples: list[Example], stats: TokenizeStats) -> Iterator[Tokenized]:
        """Tokenize a batch of examples (in parallel, in Rust); yields the ones that fit, split
        or shortened as needed. Rejects and counts go to `stats`."""
        kept, rendered = self.render_batch(examples, stats)
        yield from self.label(kept, rendered, self.tokenize(rendered), stats)

    # `encode` in three steps: `prepare` runs `tokenize` in a thread (the Rust tokenizer
    # releases the GIL) while it labels the previous batch and renders the next.
    def render_batch(self, examples: list[Example], stats: TokenizeStats) -> tuple[list[Example], list[Rendered]]:
        """Render each example; one the template rewrites or refuses becomes a reject."""
        kept, rendered = [], []
        for example in examples:
            try:
                rendered.append(self.renderer.render(example))
                kept.append(example)
            except ExampleRejected as err:
                stats.reject(example, str(err))
        return kept, rendered

    def tokenize(self, rendered: list[Rendered]) -> list:
        return self.locator.tokenize([r.text for r in rendered])

    def label(self, examples: list[Example], rendered: list[Rendered], encodings: list,
              stats: TokenizeStats) -> Iterator[Tokenized]:
        located = self.locator.locate([r.text for r in rendered], encodings)
        long = [k for k, found in enumerate(located) if len(found.ids) > self.max_length]
        ahead = dict(zip(long, fit_ahead(self, [(examples[k], rendered[k], located[k]) for k in long]), strict=True))
        for k, (example, render, found) in enumerate(zip(examples, rendered, located, strict=True)):
            if k in ahead:
                yield from fit(self, example, *ahead[k], stats)
            else:
                yield self._labelled(example, render, found)

    # -- examples as they are, not fitted to max_length -------------------------------------
    def encode_one(self, example: Example) -> tuple[Tokenized, Rendered]:
        render = self.renderer.render(example)
        [located] = self.locator.locate([render.text], self.locator.tokenize([render.text]))
        return self._labelled(example, render, located), render

    def encode_many(self, examples: list[Example]) -> list[Tokenized | None]:
        """Tokenize examples in one parallel batch; None for one the template refuses or
        cannot label (the caller decides whether that is an error)."""
        kept, rendered = [], []
        for index, example in enumerate(examples):
            try:
                rendered.append(self.renderer.render(example))
                kept.append(index)
            except (ExampleRejected, TemplateError):
                pass
        out: list[Tokenized | None] = [None] * len(examples)
        if rendered:
            located = self.locator.locate([r.text for r in rendered], self.tokenize(rendered))
            for index, render, found in zip(kept, rendered, located, strict=True):
                out[index] = self._labelled(examples[index], render, found)
        return out

    @staticmethod
    def _labelled(example: Example, render: Rendered, located: Located) -> Tokenized:
        ids = located.ids
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        for first, last in located.token_spans(render.trained_spans):
            labels[first : last + 1] = ids[first : last + 1]
        # The first token is never predicted (nothing precedes it); making that explicit keeps
        # packed rows safe: no example is ever trained to follow the previous one.
        labels[0] = IGNORE_INDEX
        return Tokenized(ids, labels, example)
