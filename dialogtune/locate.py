"""Tokenize texts and tell which token covers a given character.

Which token covers a character comes from the tokenizer's offsets, or, for byte-level BPE
tokenizers, from the tokens' byte lengths (see TokenBytes), which spares the tokenizer
tracking offsets at all. A text whose tokens do not add up to its length in bytes is located
by offsets instead, so both ways give the same answer.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np


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


class TokenLocator:
    """A fast tokenizer's batch encoding, and each encoded text `Located`: by the tokens' byte
    lengths where `TokenBytes` applies, else (or with `by_offsets`) by the tokenizer's offsets."""

    def __init__(self, backend, by_offsets: bool = False):
        self.backend = backend
        self.token_bytes = None if by_offsets else TokenBytes.of(backend)
        # Without offsets when token byte lengths locate the tokens (tokenizers >= 0.21 has it).
        fast = getattr(backend, "encode_batch_fast", None)
        self._encode_batch = fast if fast is not None and self.token_bytes is not None else backend.encode_batch

    def tokenize(self, texts: list[str]) -> list:
        """The Rust tokenizer over a batch. It releases the GIL, so a caller may run it in a
        thread while it renders the next batch."""
        return self._encode_batch(texts, add_special_tokens=False)

    def locate(self, texts: list[str], encodings: list) -> list[Located]:
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        if self.token_bytes is not None and ids:
            self.token_bytes.learn(np.concatenate(ids))
        return [self._locate(text, e, i) for text, e, i in zip(texts, encodings, ids, strict=True)]

    def _locate(self, text: str, encoding, ids: np.ndarray) -> Located:
        if self.token_bytes is None:
            return Located(ids, encoding=encoding)
        char_bytes = None if text.isascii() else char_byte_offsets(text)
        ends = self.token_bytes.ends(ids, len(text) if char_bytes is None else int(char_bytes[-1]))
        if ends is None:  # the byte lengths do not add up: ask the tokenizer for offsets
            encoding = self.backend.encode(text, add_special_tokens=False)
            return Located(np.asarray(encoding.ids, dtype=np.int32), encoding=encoding)
        return Located(ids, ends=ends, char_bytes=char_bytes)
