"""Turns as a memory model's step rows: the history window, exact labels, padding."""

from __future__ import annotations

import torch

from dialogtune.memory.inputs import TurnInputs

DIALOGUE = {"prefix_ids": [[1, 2], [3], [4, 5]], "text_ids": [[10, 11, 12], [13, 14], [15]],
            "sessions": [1, 1, 2], "trained": [True, False, True]}


def test_the_history_is_the_last_window_tokens_before_the_turn():
    inputs = TurnInputs(window=4, encoder_decoder=False, pad_token_id=0)
    assert inputs.history(DIALOGUE, 0) == []
    assert inputs.history(DIALOGUE, 1) == [2, 10, 11, 12]  # cut inside the first turn's prefix
    assert inputs.history(DIALOGUE, 2) == [12, 3, 13, 14]
    assert TurnInputs(window=0, encoder_decoder=False, pad_token_id=0).history(DIALOGUE, 2) == []
    assert TurnInputs(window=100, encoder_decoder=False, pad_token_id=0).history(DIALOGUE, 2) == [
        1, 2, 10, 11, 12, 3, 13, 14]


def test_a_causal_row_learns_the_text_of_trained_turns_only():
    inputs = TurnInputs(window=3, encoder_decoder=False, pad_token_id=0)
    ids, labels = inputs.row(DIALOGUE, 2)
    assert ids == [3, 13, 14, 4, 5, 15]
    assert labels == [-100, -100, -100, -100, -100, 15]
    ids, labels = inputs.row(DIALOGUE, 1)  # not trained: read, never learned
    assert ids == [10, 11, 12, 3, 13, 14] and set(labels) == {-100}


def test_an_encoder_decoder_row_reads_history_and_prefix_and_writes_the_text():
    inputs = TurnInputs(window=3, encoder_decoder=True, pad_token_id=0, bos_token_id=7, eos_token_id=8)
    source, target = inputs.row(DIALOGUE, 2)
    assert source == [7, 3, 13, 14, 4, 5, 8]
    assert target == [15, 8]
    assert inputs.row(DIALOGUE, 1)[1] == [-100, -100, -100]


def test_a_batch_is_right_padded_and_an_idle_stream_is_one_untrained_pad():
    inputs = TurnInputs(window=3, encoder_decoder=False, pad_token_id=0)
    batch = inputs.batch([inputs.row(DIALOGUE, 2), None, inputs.row(DIALOGUE, 0)], "cpu")
    assert batch["input_ids"].tolist() == [[3, 13, 14, 4, 5, 15], [0] * 6, [1, 2, 10, 11, 12, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 0, 0, 0, 0, 0], [1] * 5 + [0]]
    assert batch["labels"].tolist() == [[-100] * 5 + [15], [-100] * 6, [-100, -100, 10, 11, 12, -100]]
    assert batch["labels"].dtype == torch.long
