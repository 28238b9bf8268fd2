"""Pack tokenized examples into rows of at most `max_length` tokens.

Best-fit-decreasing: longest example first, each into the row with the least room that
still fits it. `position_ids` restart at 0 for every example; with no attention mask,
transformers builds a block-diagonal causal mask from them, so examples in a row never see
each other (proved in tests/test_packing.py). The plain mode keeps one example a row; the
collator pads batches.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np
import pyarrow as pa

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


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:  # Arrow list offsets are 32-bit
        raise DataError(f"a split of {offsets[-1]} tokens is too large for one Arrow list; prepare the data in parts")
    offsets = offsets.astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def rows_to_table(input_ids: list[np.ndarray], labels: list[np.ndarray], rows: list[list[int]]) -> pa.Table:
    """One Arrow row per packed row: input_ids, labels, position_ids (restarting per example)."""
    order = [i for row in rows for i in row]
    lengths = np.array([len(input_ids[i]) for i in order], dtype=np.int32)
    row_lengths = np.array([sum(len(input_ids[i]) for i in row) for row in rows], dtype=np.int32)
    if order:
        ids = np.concatenate([input_ids[i] for i in order])
        labs = np.concatenate([labels[i] for i in order])
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = (np.arange(len(ids), dtype=np.int64) - starts).astype(np.int32)
    else:
        ids = labs = positions = np.zeros(0, dtype=np.int32)
    return pa.table({
        "input_ids": _list_array(ids, row_lengths),
        "labels": _list_array(labs, row_lengths),
        "position_ids": _list_array(positions, row_lengths),
    })
