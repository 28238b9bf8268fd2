"""Best-fit-decreasing packing, and the proof that packed examples do not see each other."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from dialogtune.packing import one_per_row, pack_best_fit, pack_examples, pack_stream, rows_to_table
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


def _example_table(lengths: list[int], first_id: int = 0) -> pa.Table:
    """Examples whose tokens are (example number * 1000 + position): every token says where it came from."""
    ids = [[(first_id + k) * 1000 + p for p in range(n)] for k, n in enumerate(lengths)]
    return pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                     "labels": pa.array([[-100, *x[1:]] for x in ids], pa.list_(pa.int32())),
                     "dialogue_ids": pa.array([[f"d{first_id + k}"] for k in range(len(lengths))], pa.list_(pa.string())),
                     "trained_messages": pa.array([["t"] * (k % 3) for k in range(len(lengths))], pa.list_(pa.string()))})


def _chunks(table: pa.Table, sizes: list[int]):
    start = 0
    for size in sizes:
        yield table.slice(start, size)
        start += size
    if start < table.num_rows:
        yield table.slice(start)


def test_a_buffer_as_large_as_the_data_packs_exactly_as_the_whole_set():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 120, size=300).tolist()
    table = _example_table(lengths)
    whole = pack_examples(table, pack_best_fit(lengths, 128))
    # The reference for input_ids/labels/position_ids is the whole-set function prepare used before streaming.
    reference = rows_to_table([np.array(x, np.int32) for x in table["input_ids"].to_pylist()],
                              [np.array(x, np.int32) for x in table["labels"].to_pylist()], pack_best_fit(lengths, 128))
    assert whole.select(["input_ids", "labels", "position_ids"]).equals(reference)
    for buffer in (300, 301, 10_000):
        streamed = pa.concat_tables(pack_stream(_chunks(table, [7, 50, 1, 100]), 128, buffer, pack=True))
        assert streamed.equals(whole)


def test_a_small_buffer_packs_within_capacity_and_keeps_every_token():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 120, size=250).tolist()
    table = _example_table(lengths)
    parts = list(pack_stream(_chunks(table, [33] * 8), 128, buffer=40, pack=True))
    assert len(parts) == 7  # 6 full buffers of 40, then the last 10
    for index, part in enumerate(parts):
        assert all(len(row) <= 128 for row in part["input_ids"].to_pylist())
        # A buffer packs its own examples, each once, and only them.
        held = sorted(int(d[1:]) for row in part["dialogue_ids"].to_pylist() for d in row)
        assert held == list(range(40 * index, min(40 * (index + 1), 250)))
    packed = pa.concat_tables(parts)
    # Every token, in its example's order: each example comes back whole from its row.
    examples = {}
    for ids, positions in zip(packed["input_ids"].to_pylist(), packed["position_ids"].to_pylist(), strict=True):
        starts = [k for k, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in itertools.pairwise(starts):
            examples[ids[a] // 1000] = ids[a:b]
    assert examples == {k: x for k, x in enumerate(table["input_ids"].to_pylist())}
    assert sum(len(r) for r in packed["trained_messages"].to_pylist()) == sum(k % 3 for k in range(250))
    assert packed.num_rows <= len(pack_best_fit(lengths, 128)) * 1.1  # within 10% of packing all at once


def test_packing_a_stream_does_not_depend_on_how_it_is_chunked():
    lengths = np.random.default_rng(3).integers(1, 60, size=120).tolist()
    table = _example_table(lengths)
    results = [pa.concat_tables(pack_stream(_chunks(table, sizes), 64, buffer=25, pack=pack))
               for pack in (True, False) for sizes in ([120], [1] * 120, [24, 26, 3, 50])]
    assert results[0].equals(results[1]) and results[0].equals(results[2])
    assert results[3].equals(results[4]) and results[3].equals(results[5])
    assert results[3]["dialogue_ids"].to_pylist() == [[f"d{k}"] for k in range(120)]  # unpacked: one a row, in order
