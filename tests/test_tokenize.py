"""Long examples: cut at turn boundaries, most recent context kept, no trained turn ever cut,
and a turn that cannot fit is reported."""

from __future__ import annotations

import numpy as np
import pytest

from dialogtune.tasks import Example, message
from dialogtune.templates import resolve_template
from dialogtune.tokenize import IGNORE_INDEX, ExampleEncoder, TokenizeStats


def dialogue(turns: int, trained_every: int = 2, system: str | None = "Be brief.") -> Example:
    messages = [message("system", system)] if system else []
    for i in range(turns):
        train = i % trained_every == trained_every - 1
        messages.append(message("assistant" if train else "user", f"Turn number {i} says hello there.", train=train))
    return Example(messages, "long", "long", "test.json", 7)


def encode(tokenizer, ex: Example, max_length: int):
    encoder = ExampleEncoder(tokenizer, resolve_template("chatml", tokenizer), max_length)
    stats = TokenizeStats()
    return list(encoder.encode([ex], stats)), stats, encoder


def trained_text(tokenizer, tokenized) -> str:
    keep = tokenized.labels != IGNORE_INDEX
    return tokenizer.decode(tokenized.input_ids[keep].tolist())


def test_fitting_example_is_one_sequence(byte_tokenizer):
    pieces, stats, _ = encode(byte_tokenizer, dialogue(4), 4096)
    assert len(pieces) == 1 and stats.examples_split == 0


def test_long_dialogue_is_split_at_turns_with_every_trained_turn_once(byte_tokenizer):
    ex = dialogue(12)
    whole, _, _ = encode(byte_tokenizer, ex, 100_000)
    full_length = len(whole[0].input_ids)
    max_length = full_length // 3
    pieces, stats, _ = encode(byte_tokenizer, ex, max_length)
    assert len(pieces) >= 3
    assert stats.examples_split == 1 and stats.turns_too_long == 0
    assert all(len(p.input_ids) <= max_length for p in pieces)
    trained_turns = []
    for piece in pieces:
        text = byte_tokenizer.decode(piece.input_ids.tolist())
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # system prompt in every piece
        trained_turns += [int(s.split()[2]) for s in trained_text(byte_tokenizer, piece).split("<|im_end|>") if s]
    assert trained_turns == [1, 3, 5, 7, 9, 11]  # each trained turn exactly once, in order
    # Later pieces carry earlier turns as untrained context (the most recent ones).
    later = byte_tokenizer.decode(pieces[1].input_ids.tolist())
    first_trained_later = trained_turns[len(trained_text(byte_tokenizer, pieces[0]).split("<|im_end|>")) - 1]
    assert f"Turn number {first_trained_later - 1} " in later
    assert stats.context_truncated >= 1


def test_window_keeps_the_most_recent_context(byte_tokenizer):
    messages = [message("user", f"Context line {i} is here.") for i in range(10)]
    messages.append(message("assistant", "The answer.", train=True))
    ex = Example(messages, "w", "w", "t", 1)
    whole, _, _ = encode(byte_tokenizer, ex, 100_000)
    pieces, stats, _ = encode(byte_tokenizer, ex, len(whole[0].input_ids) // 2)
    assert len(pieces) == 1
    text = byte_tokenizer.decode(pieces[0].input_ids.tolist())
    assert "Context line 9 is here." in text and "Context line 0 is here." not in text
    assert trained_text(byte_tokenizer, pieces[0]) == "The answer.<|im_end|>"
    assert stats.context_truncated == 1


def test_turn_that_cannot_fit_is_reported_not_lost(byte_tokenizer):
    messages = [message("user", "Hi."), message("assistant", "Hello there! " * 40, train=True),
                message("user", "And?"), message("assistant", "Fine.", train=True)]
    ex = Example(messages, "d7", "d7", "data.jsonl", 12)
    pieces, stats, _ = encode(byte_tokenizer, ex, 40)
    assert stats.turns_too_long == 1
    (reject,) = stats.rejects
    assert (reject.source, reject.line, reject.item, reject.stage) == ("data.jsonl", 12, "d7", "tokenize")
    assert "does not fit in max_length=40" in reject.reason
    assert [trained_text(byte_tokenizer, p) for p in pieces] == ["Fine.<|im_end|>"]


def test_labels_are_int32_and_ids_match_labels(byte_tokenizer):
    (piece,), _, _ = encode(byte_tokenizer, dialogue(4), 4096)
    assert piece.input_ids.dtype == np.int32 and piece.labels.dtype == np.int32
    trained = piece.labels != IGNORE_INDEX
    assert np.array_equal(piece.labels[trained], piece.input_ids[trained])


def test_slow_tokenizer_is_refused(byte_tokenizer):
    from dialogtune.templates import TemplateError

    class Slow:
        name_or_path = "slow-one"

    with pytest.raises(TemplateError, match="not a fast"):
        ExampleEncoder(Slow(), resolve_template("chatml", byte_tokenizer), 10)


def test_a_reply_is_never_kept_without_the_turn_it_answers(byte_tokenizer):
    long_question = "Tell me everything about the station and the trains. " * 12
    messages = [message("user", long_question), message("assistant", "Ask me something shorter.", train=True)]
    ex = Example(messages, "q", "q", "data.jsonl", 3)
    pieces, stats, _ = encode(byte_tokenizer, ex, 60)
    assert pieces == []
    (reject,) = stats.rejects
    assert "does not fit in max_length=60 tokens with the turn it answers" in reject.reason
    # A reply that opens the dialogue needs no context.
    opening = Example([message("assistant", "Welcome aboard.", train=True), message("user", long_question)],
                      "o", "o", "data.jsonl", 4)
    (piece,), stats, _ = encode(byte_tokenizer, opening, 60)
    assert trained_text(byte_tokenizer, piece) == "Welcome aboard.<|im_end|>" and not stats.rejects
