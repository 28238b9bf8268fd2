"""Best-fit-decreasing packing, and the proof that packed examples do not see each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dialogtune.packing import one_per_row, pack_best_fit, rows_to_table
from dialogtune.tasks import Example, message
from dialogtune.templates import resolve_template
from dialogtune.tokenize import IGNORE_INDEX, ExampleEncoder, TokenizeStats


def test_best_fit_decreasing_places_each_example_in_the_tightest_row():
    rows = pack_best_fit([6, 5, 4, 3, 2, 2], capacity=8)
    assert rows == [[0, 4], [1, 3], [2, 5]]  # 6+2, 5+3, 4+2: three full-ish rows
    assert sorted(i for row in rows for i in row) == list(range(6))


def test_packing_never_overfills_and_keeps_every_example():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500).tolist()
    rows = pack_best_fit(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= int(np.ceil(sum(lengths) / 128) * 1.1)  # within 10% of the ideal


def test_too_long_example_is_an_error():
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_best_fit([10, 3], 8)


def test_table_has_positions_restarting_per_example():
    ids = [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32)]
    labels = [np.array([-100, 2, 3], np.int32), np.array([-100, 5], np.int32)]
    table = rows_to_table(ids, labels, [[0, 1]]).to_pylist()
    assert table == [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}]
    padded = rows_to_table(ids, labels, one_per_row([3, 2])).to_pylist()
    assert [r["position_ids"] for r in padded] == [[0, 1, 2], [0, 1]]


def _examples(tokenizer):
    encoder = ExampleEncoder(tokenizer, resolve_template("chatml", tokenizer), 256)
    chats = [
        [message("user", "Hello there!"), message("assistant", "How are you doing today?", train=True)],
        [message("system", "Be brief."), message("user", "I would like to find a restaurant."),
         message("assistant", "What about Sushi Sam?", train=True), message("user", "Thanks."),
         message("assistant", "Anything else?", train=True)],
        [message("user", "Summarize the following dialogue:"), message("assistant", "Amanda baked cookies.", train=True)],
    ]
    examples = [Example(c, str(i), str(i), "t", None) for i, c in enumerate(chats)]
    return list(encoder.encode(examples, TokenizeStats()))


def _labelled_loss_sum(model, input_ids, labels, position_ids=None) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[0, :-1].double(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")


def test_packed_row_loss_equals_the_examples_run_separately(byte_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(byte_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    items = _examples(byte_tokenizer)
    rows = pack_best_fit([len(t.input_ids) for t in items], capacity=256)
    assert len(rows) == 1 and sorted(rows[0]) == [0, 1, 2]  # all three share one row
    row = rows_to_table([t.input_ids for t in items], [t.labels for t in items], rows).to_pylist()[0]
    tensor = {k: torch.tensor([v]) for k, v in row.items()}
    packed = _labelled_loss_sum(model, tensor["input_ids"], tensor["labels"], tensor["position_ids"])
    separate = sum(
        _labelled_loss_sum(model, torch.tensor([t.input_ids], dtype=torch.long), torch.tensor([t.labels], dtype=torch.long))
        for t in items
    )
    assert packed.item() == pytest.approx(separate.item(), abs=1e-5)
    # Without restarting positions the examples would see each other: the proof has teeth.
    leaky = _labelled_loss_sum(model, tensor["input_ids"], tensor["labels"],
                               torch.arange(tensor["input_ids"].shape[1]).unsqueeze(0))
    assert abs(leaky.item() - separate.item()) > 1e-3
