"""Render an example with its chat template once, tokenize it once, label it exactly.

How a message is located without guessing: the template is rendered with each message's
content replaced by a unique placeholder, and the real contents are spliced back in. This
gives every message's character span in the exact text `apply_chat_template` produces. The
placeholder render depends only on the roles and names, so it is done once per dialogue shape
and checked against a real render (see VERIFY_EVERY). A trained message's span runs
from its first character through the template's end-of-turn marker; a token is trained when
it overlaps a trained span (found with `char_to_token`, no per-token Python loop).

Examples longer than `max_length` are cut at message boundaries: each piece keeps the system
prompt and as much of the most recent context as fits, and no trained message is ever cut.
A trained message that cannot fit even alone is reported, never silently lost.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dialogtune.dialogue import Reject
from dialogtune.tasks import Example
from dialogtune.templates import ChatTemplate, TemplateError, content_is_opaque, uses_names

IGNORE_INDEX = -100
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
MAX_SKELETONS = 4096
# With a template that writes content only as it is (see templates.content_is_opaque), every
# new dialogue shape and every VERIFY_EVERY-th example is also rendered for real and compared;
# with any other template, every example is. An example whose real text differs is rejected.
VERIFY_EVERY = 1000


class ExampleRejected(ValueError):
    """This example cannot be labelled exactly (the template rewrites or refuses it)."""


@dataclass(slots=True)
class Rendered:
    text: str
    trained_spans: list[tuple[int, int]]  # character spans, end-of-turn included
    message_starts: list[int | None]  # character offset of each message's content


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


def compile_template(source: str):
    """The same compiled Jinja template `apply_chat_template` renders with."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


class ExampleEncoder:
    def __init__(self, tokenizer, template: ChatTemplate, max_length: int):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TemplateError(
                f"the tokenizer {tokenizer.name_or_path!r} is not a fast (Rust) tokenizer; dialogtune needs"
                " character offsets, which only fast tokenizers give"
            )
        self.tokenizer = tokenizer
        self.backend = backend
        self.template = template
        self.max_length = max_length
        self._compiled = compile_template(template.source)
        # apply_chat_template passes the special tokens (bos_token, eos_token, ...) to the template.
        self._variables = dict(tokenizer.special_tokens_map)
        self._skeletons: dict[tuple, tuple[list[str], list[int]]] = {}
        self._rendered = 0
        self._verify_every_example = not content_is_opaque(template.source)
        self._names_matter = uses_names(template.source)

    # -- rendering -----------------------------------------------------------------
    def _render_text(self, chat: list[dict]) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=False, **self._variables)
        except jinja2.TemplateError as err:  # e.g. raise_exception("roles must alternate")
            raise ExampleRejected(f"the chat template refuses this conversation: {err}") from err

    def _skeleton(self, chat: list[dict]) -> tuple[list[str], list[int], bool]:
        """The template's own text around the messages: literal pieces and the message order.
        It depends only on the roles and names, so it is rendered once per shape of dialogue."""
        key = tuple((m["role"], m.get("name") if self._names_matter else None) for m in chat)
        cached = self._skeletons.get(key)
        if cached is not None:
            return (*cached, False)
        skeleton = self._render_text([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(chat)])
        literals, order, cursor = [], [], 0
        for match in _PLACEHOLDER.finditer(skeleton):
            literals.append(skeleton[cursor : match.start()])
            order.append(int(match.group(1)))
            cursor = match.end()
        literals.append(skeleton[cursor:])
        if len(self._skeletons) >= MAX_SKELETONS:
            self._skeletons.clear()
        self._skeletons[key] = (literals, order)
        return literals, order, True

    def render(self, example: Example) -> Rendered:
        chat = example.chat()
        literals, order, new_shape = self._skeleton(chat)
        pieces: list[str] = [literals[0]]
        starts: list[int | None] = [None] * len(chat)
        ends: list[int] = [0] * len(chat)
        length = len(literals[0])
        for position, index in enumerate(order):
            content = chat[index]["content"]
            starts[index] = length
            length += len(content)
            ends[index] = length
            literal = literals[position + 1]
            pieces += (content, literal)
            length += len(literal)
        text = "".join(pieces)
        self._rendered += 1
        if new_shape or self._verify_every_example or self._rendered % VERIFY_EVERY == 1:
            self._check_splice(chat, text)
        spans = []
        for position, index in enumerate(order):
            if not example.messages[index]["train"]:
                continue
            gap_end = starts[order[position + 1]] if position + 1 < len(order) else len(text)
            marker = text.find(self.template.end_of_turn, ends[index], gap_end)
            if marker < 0:
                raise TemplateError(
                    f"template {self.template.name!r} does not write its end-of-turn marker"
                    f" {self.template.end_of_turn!r} after an assistant message"
                )
            spans.append((starts[index], marker + len(self.template.end_of_turn)))
        for index, message in enumerate(example.messages):
            if message["train"] and starts[index] is None:
                raise TemplateError(f"template {self.template.name!r} does not render {message['role']!r} messages")
        return Rendered(text, spans, starts)

    def _check_splice(self, chat: list[dict], text: str) -> None:
        real = self._render_text(chat)  # what apply_chat_template renders
        if real != text:
            at = next((i for i, (a, b) in enumerate(zip(real, text)) if a != b), min(len(real), len(text)))
            raise ExampleRejected(
                f"the chat template rewrites message text here (real render {real[at:at + 40]!r} vs message"
                f" text {text[at:at + 40]!r}); it cannot be labelled exactly"
            )

    # -- tokenizing ----------------------------------------------------------------
    def _labels(self, encoding, ids: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        for start, end in spans:
            first = _token_at(encoding, start, end, step=1)
            last = _token_at(encoding, end - 1, start - 1, step=-1)
            if first is not None and last is not None:
                labels[first : last + 1] = ids[first : last + 1]
        # The first token is never predicted (nothing precedes it); making that explicit keeps
        # packed rows safe: no example is ever trained to follow the previous one.
        labels[0] = IGNORE_INDEX
        return labels

    def encode(self, examples: list[Example], stats: TokenizeStats) -> Iterator[Tokenized]:
        """Tokenize a batch of examples (in parallel, in Rust); yields the ones that fit, split
        or shortened as needed. Rejects and counts go to `stats`."""
        kept, rendered = self.render_batch(examples, stats)
        yield from self.label(kept, rendered, self.tokenize(rendered), stats)

    def render_batch(self, examples: list[Example], stats: TokenizeStats) -> tuple[list[Example], list[Rendered]]:
        """Render each example; one the template rewrites or refuses becomes a reject."""
        kept, rendered = [], []
        for example in examples:
            try:
                rendered.append(self.render(example))
                kept.append(example)
            except ExampleRejected as err:
                stats.rejects.append(_reject(example, str(err)))
        return kept, rendered

    def tokenize(self, rendered: list[Rendered]) -> list:
        """The Rust tokenizer over a batch. It releases the GIL, so a caller may run it in a
        thread while it renders the next batch."""
        return self.backend.encode_batch([r.text for r in rendered], add_special_tokens=False)

    def label(self, examples: list[Example], rendered: list[Rendered], encodings: list,
              stats: TokenizeStats) -> Iterator[Tokenized]:
        for example, render, encoding in zip(examples, rendered, encodings, strict=True):
            ids = np.asarray(encoding.ids, dtype=np.int32)
            if len(ids) <= self.max_length:
                yield Tokenized(ids, self._labels(encoding, ids, render.trained_spans), example)
            else:
                yield from self._fit(example, render, encoding, stats)

    def encode_one(self, example: Example) -> tuple[Tokenized, Rendered]:
        render = self.render(example)
        encoding = self.backend.encode(render.text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int32)
        return Tokenized(ids, self._labels(encoding, ids, render.trained_spans), example), render

    # -- fitting long examples ------------------------------------------------------
    def _fit(self, example: Example, render: Rendered, encoding, stats: TokenizeStats) -> Iterator[Tokenized]:
        messages = example.messages
        n_system = 0
        while n_system < len(messages) and messages[n_system]["role"] == "system":
            n_system += 1
        # Token estimate per message from the full encoding: from its start to the next message's.
        starts = [_token_at(encoding, s, len(render.text), 1) if s is not None else None
                  for s in render.message_starts]
        known = sorted((s, i) for i, s in enumerate(starts) if s is not None)
        sizes = [0] * len(messages)
        for (start, index), following in zip(known, [s for s, _ in known[1:]] + [len(encoding.ids)]):
            sizes[index] = following - start
        head = starts[n_system] if n_system < len(starts) and starts[n_system] is not None else 0
        trained = [i for i in range(n_system, len(messages)) if messages[i]["train"]]
        pieces = 0
        cursor = 0
        while cursor < len(trained):
            first = trained[cursor]
            # The turn being answered always comes along; more context up to half the row, then
            # as many following turns as fit, then more context if room is left.
            floor = first - 1 if first > n_system else first
            budget = max(self.max_length // 2, head + sum(sizes[floor : first + 1]))
            begin = min(floor, self._extend_back(sizes, n_system, first, head + sizes[first], budget))
            estimate = head + sum(sizes[begin : first + 1])
            end = first
            while end + 1 < len(messages) and estimate + sizes[end + 1] <= self.max_length:
                end += 1
                estimate += sizes[end]
            end = max(i for i in trained if first <= i <= end)
            begin = self._extend_back(sizes, n_system, begin, head + sum(sizes[begin : end + 1]), self.max_length)
            try:
                piece = self._fit_piece(example, n_system, begin, floor, first, end)
            except ExampleRejected as err:
                stats.rejects.append(_reject(example, str(err)))
                return
            if piece is None:
                stats.turns_too_long += 1
                who = messages[first].get("name") or "assistant"
                context = " with the turn it answers" if floor < first else ""
                stats.rejects.append(_reject(example, (
                    f"trained turn {first - n_system} ({who}) does not fit in max_length={self.max_length}"
                    f" tokens{context}; raise max_length to keep it")))
                cursor += 1
                continue
            tokenized, begin, end = piece
            if begin > n_system:
                stats.context_truncated += 1
            pieces += 1
            yield tokenized
            cursor = next((k for k, i in enumerate(trained) if i > end), len(trained))
        if pieces > 1:
            stats.examples_split += 1

    @staticmethod
    def _extend_back(sizes: list[int], n_system: int, begin: int, estimate: int, budget: int) -> int:
        while begin - 1 >= n_system and estimate + sizes[begin - 1] <= budget:
            begin -= 1
            estimate += sizes[begin]
        return begin

    def _fit_piece(self, example: Example, n_system: int, begin: int, floor: int, first: int, end: int):
        """Render messages[begin..end] (with the system prompt) and shrink until it fits:
        drop the oldest context first (never the turn at `floor`, the one being answered),
        then trailing trained turns (they go to the next piece)."""
        messages = example.messages
        while True:
            body = [dict(m) for m in messages[begin : end + 1]]
            for offset, m in enumerate(body):
                m["train"] = m["train"] and begin + offset >= first
            piece = Example(messages[:n_system] + body, example.dialogue_id, example.group,
                            example.source, example.line)
            tokenized, _ = self.encode_one(piece)
            if len(tokenized.input_ids) <= self.max_length:
                return tokenized, begin, end
            if begin < floor:
                begin += 1
            elif end > first:
                end = max(i for i in range(first, end) if messages[i]["train"])
            else:
                return None


def _reject(example: Example, reason: str) -> Reject:
    return Reject(example.source, example.line, reason, stage="tokenize", item=example.dialogue_id)


def _token_at(encoding, char: int, stop: int, step: int) -> int | None:
    """The token covering `char`, moving by `step` past characters no token covers (a space
    that the tokenizer trims from a token's offsets)."""
    while char != stop:
        token = encoding.char_to_token(char)
        if token is not None:
            return token
        char += step
    return None
