"""Long examples: cut at turn boundaries, most recent context kept, no trained turn ever cut,
a turn that cannot fit reported; pieces planned once, tokenized ahead in one batch, and planned
again from where a piece had to shrink."""

from __future__ import annotations

import numpy as np

from dialogtune.fit import Layout, Window, fit, plan_windows
from dialogtune.tasks import Example, message
from dialogtune.templates import resolve_template
from dialogtune.tokenize import IGNORE_INDEX, ExampleEncoder, Tokenized, TokenizeStats


def dialogue(turns: int, trained_every: int = 2, system: str | None = "Be brief.") -> Example:
    messages = [message("system", system)] if system else []
    for i in range(turns):
        train = i % trained_every == trained_every - 1
        messages.append(message("assistant" if train else "user", f"Turn number {i} says hello there.", train=train))
    return Example(messages, "long", "long", "test.json", 7)


def encode(tokenizer, ex: Example, max_length: int):
    encoder = ExampleEncoder(tokenizer, resolve_template("chatml", tokenizer), max_length)
    stats = TokenizeStats()
    return list(encoder.encode([ex], stats)), stats


def trained_text(tokenizer, tokenized) -> str:
    keep = tokenized.labels != IGNORE_INDEX
    return tokenizer.decode(tokenized.input_ids[keep].tolist())


def test_fitting_example_is_one_sequence(byte_tokenizer):
    pieces, stats = encode(byte_tokenizer, dialogue(4), 4096)
    assert len(pieces) == 1 and stats.examples_split == 0


def test_long_dialogue_is_split_at_turns_with_every_trained_turn_once(byte_tokenizer):
    ex = dialogue(12)
    whole, _ = encode(byte_tokenizer, ex, 100_000)
    max_length = len(whole[0].input_ids) // 3
    pieces, stats = encode(byte_tokenizer, ex, max_length)
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
    whole, _ = encode(byte_tokenizer, ex, 100_000)
    pieces, stats = encode(byte_tokenizer, ex, len(whole[0].input_ids) // 2)
    assert len(pieces) == 1
    text = byte_tokenizer.decode(pieces[0].input_ids.tolist())
    assert "Context line 9 is here." in text and "Context line 0 is here." not in text
    assert trained_text(byte_tokenizer, pieces[0]) == "The answer.<|im_end|>"
    assert stats.context_truncated == 1


def test_turn_that_cannot_fit_is_reported_not_lost(byte_tokenizer):
    messages = [message("user", "Hi."), message("assistant", "Hello there! " * 40, train=True),
                message("user", "And?"), message("assistant", "Fine.", train=True)]
    ex = Example(messages, "d7", "d7", "data.jsonl", 12)
    pieces, stats = encode(byte_tokenizer, ex, 40)
    assert stats.turns_too_long == 1
    (reject,) = stats.rejects
    assert (reject.source, reject.line, reject.item, reject.stage) == ("data.jsonl", 12, "d7", "tokenize")
    assert "does not fit in max_length=40" in reject.reason
    assert [trained_text(byte_tokenizer, p) for p in pieces] == ["Fine.<|im_end|>"]


def test_a_reply_is_never_kept_without_the_turn_it_answers(byte_tokenizer):
    long_question = "Tell me everything about the station and the trains. " * 12
    messages = [message("user", long_question), message("assistant", "Ask me something shorter.", train=True)]
    ex = Example(messages, "q", "q", "data.jsonl", 3)
    pieces, stats = encode(byte_tokenizer, ex, 60)
    assert pieces == []
    (reject,) = stats.rejects
    assert "does not fit in max_length=60 tokens with the turn it answers" in reject.reason
    # A reply that opens the dialogue needs no context.
    opening = Example([message("assistant", "Welcome aboard.", train=True), message("user", long_question)],
                      "o", "o", "data.jsonl", 4)
    (piece,), stats = encode(byte_tokenizer, opening, 60)
    assert trained_text(byte_tokenizer, piece) == "Welcome aboard.<|im_end|>" and not stats.rejects


def test_long_examples_cut_in_a_batch_as_one_at_a_time(byte_tokenizer):
    """Pieces of long examples are tokenized together ahead of time: the same pieces, counts
    and rejects as encoding each example on its own."""
    batch = [dialogue(3), dialogue(14), dialogue(2, system=None), dialogue(11, trained_every=3), dialogue(4)]
    too_long = Example([message("user", "Hi."), message("assistant", "Hello there! " * 40, train=True),
                        message("user", "And?"), message("assistant", "Fine.", train=True)], "d7", "d7", "x", 2)
    batch.insert(2, too_long)
    template = resolve_template("chatml", byte_tokenizer)
    encoder = ExampleEncoder(byte_tokenizer, template, 100)
    one_by_one = []
    encoder.encode_one = lambda ex: one_by_one.append(ex.dialogue_id) or ExampleEncoder.encode_one(encoder, ex)
    together = TokenizeStats()
    got = list(encoder.encode(batch, together))
    assert one_by_one == []  # every piece came tokenized from the one batch
    alone = TokenizeStats()
    reference = ExampleEncoder(byte_tokenizer, template, 100, by_offsets=True)
    expected = [piece for ex in batch for piece in reference.encode([ex], alone)]
    assert [(p.input_ids.tolist(), p.labels.tolist(), p.example.dialogue_id) for p in got] == [
        (p.input_ids.tolist(), p.labels.tolist(), p.example.dialogue_id) for p in expected]
    assert (together.examples_split, together.context_truncated, together.turns_too_long) == (
        alone.examples_split, alone.context_truncated, alone.turns_too_long)
    assert together.examples_split >= 2 and together.turns_too_long == 1
    assert [r.reason for r in together.rejects] == [r.reason for r in alone.rejects]


# -- the plan, on token estimates ---------------------------------------------------------
# A system prompt (6 tokens) and six turns of 10 tokens by estimate; turns 2, 4 and 6 trained.
LAYOUT = Layout(n_system=1, sizes=[6, 10, 10, 10, 10, 10, 10], head=6, trained=[2, 4, 6])


def test_plan_fills_each_piece_and_starts_the_next_after_it():
    # Each piece: the turn answered, context up to half the row, then as many turns as fit.
    assert list(plan_windows(LAYOUT, 40)) == [Window(1, 1, 2, 2), Window(2, 3, 4, 4), Window(4, 5, 6, 6)]
    assert list(plan_windows(LAYOUT, 60)) == [Window(1, 1, 2, 4), Window(2, 5, 6, 6)]
    assert list(plan_windows(LAYOUT, 100)) == [Window(1, 1, 2, 6)]
    # Planning from a later trained turn is planning the rest: what `fit` does after a piece shrank.
    assert list(plan_windows(LAYOUT, 40, cursor=1)) == list(plan_windows(LAYOUT, 40))[1:]


class TrueLengths:
    """An encoder whose pieces are as long as their messages truly are, where message 3 is
    three times what the estimates say: the plan is wrong about every piece holding it."""

    max_length = 60

    def __init__(self):
        self.true_sizes = {f"m{i}": size for i, size in enumerate([6, 10, 10, 30, 10, 10, 10])}

    def encode_one(self, piece: Example):
        length = sum(self.true_sizes[m["content"]] for m in piece.messages)
        labels = np.zeros(length, dtype=np.int32)
        return Tokenized(np.zeros(length, dtype=np.int32), labels, piece), None


def test_a_piece_that_shrank_makes_the_rest_planned_again():
    roles = ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    example = Example([message(role, f"m{i}", train=i in LAYOUT.trained) for i, role in enumerate(roles)],
                      "d", "d", "x", 1)
    stats = TokenizeStats()
    pieces = list(fit(TrueLengths(), example, LAYOUT, {}, stats))
    bodies = [[int(m["content"][1:]) for m in p.example.messages[1:]] for p in pieces]
    trained = [[int(m["content"][1:]) for m in p.example.messages if m["train"]] for p in pieces]
    # Planned: 1..4, then 2..6. The first piece shrinks to 1..2, so turn 4 starts the next piece
    # (the old plan would have skipped it); that one shrinks too, and so does the last.
    assert bodies == [[1, 2], [3, 4], [4, 5, 6]]
    assert trained == [[2], [4], [6]]
    assert (stats.examples_split, stats.context_truncated, stats.turns_too_long, stats.rejects) == (1, 2, 0, [])
