"""Pack tokenized examples into rows of at most `max_length` tokens.

Best-fit-decreasing: longest example first, each into the row with the least room that
still fits it. `position_ids` restart at 0 for every example; with no attention mask,
transformers builds a block-diagonal causal mask from them, so examples in a row never see
each other (proved in tests/test_packing.py). The plain mode keeps one example a row; the
collator pads batches.

Over a stream (`pack_stream`), examples are packed a buffer of `buffer` examples at a time:
memory stays bounded, and a buffer as large as the data gives exactly the whole-set packing.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dialogtune.errors import DataError


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of example indices; every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), kept sorted
    for index in order:
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"example {index} has {size} tokens, more than the row capacity {capacity}")
        slot = bisect_left(free, (size, -1))
        if slot == len(free):
            rows.append([index])
            room, row = capacity - size, len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            room -= size
        if room > 0:
            insort(free, (room, row))
    return rows


def one_per_row(lengths: list[int]) -> list[list[int]]:
    return [[i] for i in range(len(lengths))]


def rows_to_table(input_ids: list[np.ndarray], labels: list[np.ndarray], rows: list[list[int]]) -> pa.Table:
    """One Arrow row per packed row: input_ids, labels, position_ids (restarting per example)."""
    return pack_examples(pa.table({"input_ids": int_lists(input_ids), "labels": int_lists(labels)}), rows)


def pack_examples(examples: pa.Table, rows: list[list[int]]) -> pa.Table:
    """One Arrow row per packed row. Every column of `examples` holds a list per example; a row's
    value in each column is its examples' lists concatenated in row order. `position_ids`
    (restarting per example) follows `labels`."""
    order = np.array([i for row in rows for i in row], dtype=np.int64)
    per_row = np.array([len(row) for row in rows], dtype=np.int64)
    lengths = _lengths(examples.column("input_ids"))[order]  # tokens of each, in row order
    columns = {}
    for name in examples.column_names:  # one column at a time: a buffer's copies are made one by one
        lists = examples.column(name).take(order).combine_chunks()
        columns[name] = list_array(lists.flatten(), _row_sums(_lengths(lists), per_row))
        if name == "labels":
            starts = np.repeat((np.cumsum(lengths) - lengths).astype(np.int32), lengths)
            positions = np.arange(int(lengths.sum()), dtype=np.int32) - starts
            columns["position_ids"] = list_array(pa.array(positions), _row_sums(lengths, per_row))
    return pa.table(columns)


def _lengths(lists: pa.ListArray | pa.ChunkedArray) -> np.ndarray:
    """The length of each list, read from the offsets: the values are neither copied nor combined."""
    return pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)


def _row_sums(lengths: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    """Per packed row, the sum of its examples' `lengths` (given in row order, `per_row` examples a row)."""
    totals = np.concatenate([[0], np.cumsum(lengths)])[np.cumsum(per_row)]
    return np.diff(np.concatenate([[0], totals])).astype(np.int64)


def list_array(values: pa.Array, lengths: np.ndarray) -> pa.ListArray:
    """A list column from its flat values and the length of each list."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:  # Arrow list offsets are 32-bit
        raise DataError(f"{offsets[-1]} values are too many for one Arrow list column; lower pack_buffer")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def int_lists(arrays: list[np.ndarray]) -> pa.ListArray:
    """An int32 list column holding `arrays`, one list each."""
    flat = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
    return list_array(pa.array(flat), np.array([len(a) for a in arrays], dtype=np.int64))


def pack_buffer(examples: pa.Table, capacity: int, pack: bool) -> pa.Table:
    """Pack a table of examples into rows of at most `capacity` tokens: best-fit-decreasing, or
    one example a row."""
    lengths = _lengths(examples.column("input_ids")).tolist()
    return pack_examples(examples, pack_best_fit(lengths, capacity) if pack else one_per_row(lengths))


def pack_stream(tables: Iterable[pa.Table], capacity: int, buffer: int, pack: bool) -> Iterator[pa.Table]:
    """Packed rows from a stream of example tables, `buffer` examples at a time (whatever the
    sizes of the tables coming in: the result depends only on the examples and `buffer`)."""
    held: list[pa.Table] = []
    count = 0
    for table in tables:
        held.append(table)
        count += table.num_rows
        while count >= buffer:
            whole = pa.concat_tables(held)
            yield pack_buffer(whole.slice(0, buffer), capacity, pack)
            rest = whole.slice(buffer)
            held, count = [rest], rest.num_rows
    if count:
        yield pack_buffer(pa.concat_tables(held), capacity, pack)
