import pytest
import torch

from dialogtune.collate import CausalCollator, Seq2SeqCollator
from dialogtune.errors import DataError


def test_causal_rows_are_padded_with_restarting_positions():
    batch = CausalCollator(pad_token_id=9)([
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2]},
        {"input_ids": [4], "labels": [-100], "position_ids": [0]},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert "attention_mask" not in batch


def test_seq2seq_splits_context_from_the_trained_reply():
    batch = Seq2SeqCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9], [6, 7]]


def test_seq2seq_refuses_rows_with_several_trained_turns():
    with pytest.raises(DataError, match=r"one trained reply at the end .* context: \{rounds: N\}"):
        Seq2SeqCollator(0)([{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4]}])


def test_flattened_batch_is_one_row_without_padding():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2]},
            {"input_ids": [4, 5], "labels": [-100, 5], "position_ids": [0, 1]}]
    batch = CausalCollator(pad_token_id=9, flatten=True)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert all(t.dtype == torch.long for t in batch.values())
