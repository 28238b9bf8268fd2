"""Evaluation samples from prepared rows, and cutting contexts to fit a model, on hand-made rows."""

from __future__ import annotations

import numpy as np

from dialogtune.evaluate.samples import ContextFit, samples_of, trained_runs
from dialogtune.tokenize import IGNORE_INDEX as X

HEAD = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSummarize the following dialogue:"


def test_trained_runs_are_the_runs_of_labelled_positions():
    assert trained_runs(np.array([X, 5, 6, X, X, 7, X, 8])) == [(1, 3), (5, 6), (7, 8)]
    assert trained_runs(np.array([X, X])) == []


def test_samples_are_the_trained_turns_with_their_references_and_sessions(byte_tokenizer):
    def row(texts_trained, sessions):
        ids, labels = [], []
        for text, trained in texts_trained:
            piece = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [X] * len(piece)
        return {"input_ids": ids, "labels": labels, "turn_sessions": sessions}

    rows = [row([("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False), ("Hello<|im_end|>", True),
                 ("\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False), (" Bye now<|im_end|>", True),
                 ("\n", False)], [1, 2]),
            # Two trained turns with nothing between read as one: which session it is cannot be told.
            row([("Tom: ", False), ("Yes<|im_end|>", True), ("No<|im_end|>", True)], [1, 1])]
    samples = samples_of(rows, byte_tokenizer, "<|im_end|>")
    assert [(s.index, s.reference, s.session) for s in samples] == [(0, "Hello", 1), (1, "Bye now", 2), (2, "Yes", -1)]
    assert byte_tokenizer.decode(samples[1].context_ids).endswith("Bye<|im_end|>\n<|im_start|>assistant\n")
    assert samples[0].example_ids is samples[1].example_ids  # one copy per example
    assert [s.key for s in samples_of(rows, byte_tokenizer, "<|im_end|>", limit=2)] == [(0, "Hello"), (1, "Bye now")]


def test_a_long_context_keeps_its_head_and_its_end(byte_tokenizer):
    lines = "\n".join(f"Tim: line {i}." for i in range(40))
    ids = byte_tokenizer(f"{HEAD}\n{lines}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    fit = ContextFit(byte_tokenizer, ("Be brief.", "Summarize the following dialogue:"))
    head = fit.head_length(ids)
    assert byte_tokenizer.decode(ids[:head]).startswith(HEAD) and len(byte_tokenizer.decode(ids[:head])) <= len(HEAD) + 1
    cut = fit(ids, 100)
    assert len(cut) == 100 and cut[:head] == ids[:head] and cut[head:] == ids[-(100 - head):]
    text = byte_tokenizer.decode(cut)
    assert text.startswith(HEAD) and text.endswith("Tim: line 39.<|im_end|>\n<|im_start|>assistant\n")
    assert "line 0." not in text
    assert fit(ids, len(ids)) == ids


def test_a_head_longer_than_half_the_room_is_not_kept(byte_tokenizer):
    ids = byte_tokenizer(f"{HEAD}\nTim: hello there.", add_special_tokens=False)["input_ids"]
    fit = ContextFit(byte_tokenizer, ("Summarize the following dialogue:",))
    assert fit.head_length(ids) > 10
    assert fit(ids, 10) == ids[-10:]
    assert ContextFit(byte_tokenizer, ("not in the text",)).head_length(ids) == 0
