"""Render an example with its chat template once, tokenize it once, label it exactly.

How a message is located without guessing: the template is rendered with each message's
content replaced by a unique placeholder, and the real contents are spliced back in. This
gives every message's character span in the exact text `apply_chat_template` produces. The
placeholder render depends only on the roles and names, so it is done once per dialogue shape
and checked against a real render (see VERIFY_EVERY). A trained message's span runs
from its first character through the template's end-of-turn marker; a token is trained when
it overlaps a trained span (no per-token Python loop). Which token covers a character comes
from the tokenizer's offsets, or, for byte-level BPE tokenizers, from the tokens' byte lengths
(see TokenBytes), which spares the tokenizer tracking offsets at all.

Examples longer than `max_length` are cut at message boundaries: each piece keeps the system
prompt and as much of the most recent context as fits, and no trained message is ever cut.
A trained message that cannot fit even alone is reported, never silently lost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from dialogtune.dialogue import Reject
from dialogtune.errors import TemplateError
from dialogtune.tasks import Example
from dialogtune.templates import ChatTemplate, content_is_opaque, uses_names

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


class TokenBytes:
    """How many bytes of text each token stands for, for byte-level BPE tokenizers (GPT-2,
    Llama 3, Qwen, SmolLM, ...). There a token's text is exactly its bytes, so where each token
    sits follows from a cumulative sum, and the Rust tokenizer need not compute character
    offsets, which costs it a third of its time. A text whose tokens do not add up to its
    length in bytes (an added token that swallows spaces, say) is located by offsets instead."""

    UNKNOWN, NOT_BYTES = -1, -2

    def __init__(self, backend):
        self.backend = backend
        self.added = {i: len(t.content.encode()) for i, t in backend.get_added_tokens_decoder().items()}
        # The unknown token stands for however many bytes it swallowed: never a known length.
        unk = backend.model.unk_token
        self.unknown_id = backend.token_to_id(unk) if unk else None
        # Filled in as ids are met; grown by `learn` if an id lies past the vocabulary's size.
        self.lengths = np.full(backend.get_vocab_size(with_added_tokens=True), self.UNKNOWN, dtype=np.int64)

    @classmethod
    def of(cls, backend) -> TokenBytes | None:
        """For a tokenizer whose tokens are bytes as they are: a BPE model (without byte
        fallback) over the ByteLevel pre-tokenizer (without an added prefix space), no normalizer
        to change the text, and no post-processor that trims offsets (the labels must be those
        the offsets would give)."""
        from tokenizers.models import BPE

        if backend.normalizer is not None or backend.pre_tokenizer is None or not isinstance(backend.model, BPE):
            return None
        if backend.model.byte_fallback:
            return None
        steps = _steps(backend.pre_tokenizer, "pretokenizers")
        byte_level = [p for p in steps if p.get("type") == "ByteLevel"]
        harmless = {"ByteLevel", "Split", "Digits", "Punctuation"}  # they only cut the text
        if len(byte_level) != 1 or byte_level[0].get("add_prefix_space") or any(
                p.get("type") not in harmless for p in steps):
            return None
        post = _steps(backend.post_processor, "processors") if backend.post_processor is not None else []
        if any(p.get("trim_offsets") and p.get("type") in ("ByteLevel", "RobertaProcessing") for p in post):
            return None
        return cls(backend)

    def learn(self, ids: np.ndarray) -> None:
        """Look up the byte lengths of the ids not met before (a few thousand per run)."""
        if len(ids) and ids.max() >= len(self.lengths):  # ids need not be contiguous
            grown = np.full(int(ids.max()) + 1, self.UNKNOWN, dtype=np.int64)
            grown[: len(self.lengths)] = self.lengths
            self.lengths = grown
        met = np.zeros(len(self.lengths), dtype=bool)
        met[ids] = True  # (np.unique sorts or hashes: ten times slower here)
        alphabet = _byte_alphabet()
        for i in np.flatnonzero(met & (self.lengths == self.UNKNOWN)).tolist():
            if i in self.added:
                self.lengths[i] = self.added[i]
            elif i == self.unknown_id:
                self.lengths[i] = self.NOT_BYTES
            else:
                token = self.backend.id_to_token(i)
                self.lengths[i] = len(token) if token is not None and alphabet.issuperset(token) else self.NOT_BYTES

    def ends(self, ids: np.ndarray, size: int) -> np.ndarray | None:
        """The byte offset where each token ends, or None if they do not add up to `size` bytes."""
        lengths = self.lengths[ids]
        if (lengths < 0).any():
            return None
        ends = np.cumsum(lengths)
        return ends if len(ends) and ends[-1] == size else None


def _steps(component, members: str) -> list[dict]:
    """A pre-tokenizer's or post-processor's settings, a Sequence as its members."""
    state = json.loads(component.__getstate__())
    return state.get(members, [state]) if state.get("type") == "Sequence" else [state]


@cache
def _byte_alphabet() -> frozenset[str]:
    """The 256 characters byte-level BPE writes bytes as (GPT-2's `bytes_to_unicode`)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return frozenset(ByteLevel.alphabet())


class Located:
    """A tokenized text and which token covers a given character."""

    __slots__ = ("_char_bytes", "_encoding", "_ends", "ids")

    def __init__(self, ids: np.ndarray, encoding=None, ends: np.ndarray | None = None,
                 char_bytes: np.ndarray | None = None):
        self.ids = ids
        self._encoding = encoding  # with offsets: ask it
        self._ends = ends  # or: each token's end in bytes,
        self._char_bytes = char_bytes  # and each character's byte offset (None: the same, ASCII text)

    def token_at(self, char: int, stop: int, step: int) -> int | None:
        """The token covering `char` (the first of them, for a character split across tokens,
        as `char_to_token` says), moving by `step` past characters no token covers (a space the
        tokenizer's offsets leave out)."""
        if self._ends is None:
            while char != stop:
                token = self._encoding.char_to_token(char)
                if token is not None:
                    return token
                char += step
            return None
        if char == stop:
            return None
        return int(self._tokens_at(np.array([char]))[0])

    def token_spans(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The first and last token of each character span (start, end), for spans some token covers."""
        if self._ends is None:
            found = [(self.token_at(start, end, 1), self.token_at(end - 1, start - 1, -1)) for start, end in spans]
            return [(first, last) for first, last in found if first is not None and last is not None]
        bounds = np.array([span for span in spans if span[1] > span[0]], dtype=np.int64).reshape(-1, 2)
        return list(zip(self._tokens_at(bounds[:, 0]).tolist(), self._tokens_at(bounds[:, 1] - 1).tolist()))

    def _tokens_at(self, chars: np.ndarray) -> np.ndarray:
        """The token holding the first byte of each character."""
        at = chars if self._char_bytes is None else self._char_bytes[chars]
        return np.searchsorted(self._ends, at, side="right")


def char_byte_offsets(text: str) -> np.ndarray:
    """The UTF-8 byte offset of each character of `text` (and of its end)."""
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    sizes = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate(([0], np.cumsum(sizes)))


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
        self._token_bytes = TokenBytes.of(backend)
        # Without offsets when token byte lengths locate the tokens (tokenizers >= 0.21 has it).
        fast = getattr(backend, "encode_batch_fast", None)
        self._encode_batch = fast if fast is not None and self._token_bytes is not None else backend.encode_batch

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
    def _labels(self, located: Located, spans: list[tuple[int, int]]) -> np.ndarray:
        ids = located.ids
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        for first, last in located.token_spans(spans):
            labels[first : last + 1] = ids[first : last + 1]
        # The first token is never predicted (nothing precedes it); making that explicit keeps
        # packed rows safe: no example is ever trained to follow the previous one.
        labels[0] = IGNORE_INDEX
        return labels

    def _locate(self, text: str, encoding, ids: np.ndarray) -> Located:
        if self._token_bytes is None:
            return Located(ids, encoding=encoding)
        char_bytes = None if text.isascii() else char_byte_offsets(text)
        ends = self._token_bytes.ends(ids, len(text) if char_bytes is None else int(char_bytes[-1]))
        if ends is None:  # the byte lengths do not add up: ask the tokenizer for offsets
            encoding = self.backend.encode(text, add_special_tokens=False)
            return Located(np.asarray(encoding.ids, dtype=np.int32), encoding=encoding)
        return Located(ids, ends=ends, char_bytes=char_bytes)

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
        return self._encode_batch([r.text for r in rendered], add_special_tokens=False)

    def label(self, examples: list[Example], rendered: list[Rendered], encodings: list,
              stats: TokenizeStats) -> Iterator[Tokenized]:
        located = self._locate_batch(rendered, encodings)
        long = [k for k, found in enumerate(located) if len(found.ids) > self.max_length]
        ahead = dict(zip(long, self._fit_ahead([(examples[k], rendered[k], located[k]) for k in long]), strict=True))
        for k, (example, render, found) in enumerate(zip(examples, rendered, located, strict=True)):
            if k in ahead:
                yield from self._fit(example, *ahead[k], stats)
            else:
                yield Tokenized(found.ids, self._labels(found, render.trained_spans), example)

    def _locate_batch(self, rendered: list[Rendered], encodings: list) -> list[Located]:
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        if self._token_bytes is not None and ids:
            self._token_bytes.learn(np.concatenate(ids))
        return [self._locate(r.text, e, i) for r, e, i in zip(rendered, encodings, ids, strict=True)]

    def encode_one(self, example: Example) -> tuple[Tokenized, Rendered]:
        render = self.render(example)
        [located] = self._locate_batch([render], self._encode_batch([render.text], add_special_tokens=False))
        return Tokenized(located.ids, self._labels(located, render.trained_spans), example), render

    # -- fitting long examples ------------------------------------------------------
    def _layout(self, example: Example, render: Rendered, located: Located) -> _Layout:
        messages = example.messages
        n_system = 0
        while n_system < len(messages) and messages[n_system]["role"] == "system":
            n_system += 1
        # Token estimate per message from the full encoding: from its start to the next message's.
        starts = [located.token_at(s, len(render.text), 1) if s is not None else None
                  for s in render.message_starts]
        known = sorted((s, i) for i, s in enumerate(starts) if s is not None)
        sizes = [0] * len(messages)
        for (start, index), following in zip(known, [s for s, _ in known[1:]] + [len(located.ids)]):
            sizes[index] = following - start
        head = starts[n_system] if n_system < len(starts) and starts[n_system] is not None else 0
        trained = [i for i in range(n_system, len(messages)) if messages[i]["train"]]
        return _Layout(n_system, sizes, head, trained)

    def _window(self, layout: _Layout, example: Example, cursor: int) -> tuple[int, int, int, int]:
        """The messages (begin, end) of the piece that starts with trained turn number `cursor`,
        by token estimates; `floor` is the turn it answers, `first` its first trained turn."""
        sizes, n_system, head, trained = layout.sizes, layout.n_system, layout.head, layout.trained
        first = trained[cursor]
        # The turn being answered always comes along; more context up to half the row, then
        # as many following turns as fit, then more context if room is left.
        floor = first - 1 if first > n_system else first
        budget = max(self.max_length // 2, head + sum(sizes[floor : first + 1]))
        begin = min(floor, self._extend_back(sizes, n_system, first, head + sizes[first], budget))
        estimate = head + sum(sizes[begin : first + 1])
        end = first
        while end + 1 < len(example.messages) and estimate + sizes[end + 1] <= self.max_length:
            end += 1
            estimate += sizes[end]
        end = max(i for i in trained if first <= i <= end)
        begin = self._extend_back(sizes, n_system, begin, head + sum(sizes[begin : end + 1]), self.max_length)
        return begin, floor, first, end

    def _fit_ahead(self, long: list[tuple[Example, Rendered, Located]]) -> list[tuple[_Layout, dict]]:
        """Tokenize, all in one parallel batch, the pieces `_fit` will try first for each long
        example (the estimates are nearly always right), so it rarely encodes on its own."""
        plans, pieces = [], []
        for example, render, located in long:
            layout = self._layout(example, render, located)
            plan, cursor = {}, 0
            while cursor < len(layout.trained):
                begin, _, first, end = self._window(layout, example, cursor)
                plan[begin, first, end] = len(pieces)
                pieces.append(self._piece(example, layout.n_system, begin, first, end))
                cursor = _after(layout.trained, end)
            plans.append((layout, plan))
        kept, rendered = [], []
        for index, piece in enumerate(pieces):
            try:
                rendered.append(self.render(piece))
                kept.append(index)
            except (ExampleRejected, TemplateError):
                pass  # not tokenized ahead: `_fit` meets it again if it needs it, and reports it there
        located = self._locate_batch(rendered, self.tokenize(rendered)) if rendered else []
        done = {i: Tokenized(found.ids, self._labels(found, r.trained_spans), pieces[i])
                for i, r, found in zip(kept, rendered, located, strict=True)}
        return [(layout, {key: done[i] for key, i in plan.items() if i in done}) for layout, plan in plans]

    def _fit(self, example: Example, layout: _Layout, ready: dict, stats: TokenizeStats) -> Iterator[Tokenized]:
        messages, n_system, trained = example.messages, layout.n_system, layout.trained
        pieces = 0
        cursor = 0
        while cursor < len(trained):
            begin, floor, first, end = self._window(layout, example, cursor)
            try:
                piece = self._fit_piece(example, n_system, begin, floor, first, end, ready)
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
            cursor = _after(trained, end)
        if pieces > 1:
            stats.examples_split += 1

    @staticmethod
    def _extend_back(sizes: list[int], n_system: int, begin: int, estimate: int, budget: int) -> int:
        while begin - 1 >= n_system and estimate + sizes[begin - 1] <= budget:
            begin -= 1
            estimate += sizes[begin]
        return begin

    @staticmethod
    def _piece(example: Example, n_system: int, begin: int, first: int, end: int) -> Example:
        """messages[begin..end] with the system prompt; only turns from `first` on are trained."""
        messages = example.messages
        body = [dict(m) for m in messages[begin : end + 1]]
        for offset, m in enumerate(body):
            m["train"] = m["train"] and begin + offset >= first
        return Example(messages[:n_system] + body, example.dialogue_id, example.group, example.source, example.line)

    def _fit_piece(self, example: Example, n_system: int, begin: int, floor: int, first: int, end: int,
                   ready: dict):
        """Render messages[begin..end] (with the system prompt) and shrink until it fits:
        drop the oldest context first (never the turn at `floor`, the one being answered),
        then trailing trained turns (they go to the next piece). `ready` holds pieces already
        tokenized by `_fit_ahead`."""
        messages = example.messages
        while True:
            tokenized = ready.get((begin, first, end))
            if tokenized is None:
                tokenized, _ = self.encode_one(self._piece(example, n_system, begin, first, end))
            if len(tokenized.input_ids) <= self.max_length:
                return tokenized, begin, end
            if begin < floor:
                begin += 1
            elif end > first:
                end = max(i for i in range(first, end) if messages[i]["train"])
            else:
                return None


@dataclass(slots=True)
class _Layout:
    """Where a long example's messages sit, for cutting it: token estimates per message."""

    n_system: int  # leading system messages, repeated in every piece
    sizes: list[int]  # tokens per message, from the full encoding
    head: int  # tokens before the first non-system message
    trained: list[int]  # indices of the trained messages


def _after(trained: list[int], end: int) -> int:
    """The number of the first trained turn after message `end`: where the next piece starts."""
    return next((k for k, i in enumerate(trained) if i > end), len(trained))


def _reject(example: Example, reason: str) -> Reject:
    return Reject(example.source, example.line, reason, stage="tokenize", item=example.dialogue_id)
