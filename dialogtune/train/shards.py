"""The prepared train split as training reads it: loaded (memory-mapped), or with `stream:` as a
stream over its Arrow shards, shuffled through a seeded buffer.

    train_set = open_train_split(prepared / "train", config)

The stream is datasets' `IterableDataset` (`to_iterable_dataset`, `shuffle(seed, buffer_size)`;
epoch e shuffles with seed + e). It keeps the split's row count as its length, so Trainer counts
epochs and steps as for a loaded split, and its resume is exact: it skips the batches a
checkpoint's epoch already consumed, in the same order (tests/test_train_shards.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dialogtune.config import TrainJobConfig


class SizedStream(torch.utils.data.IterableDataset):
    """A datasets IterableDataset with the number of rows it yields an epoch: what Trainer needs
    to plan epochs, and accelerate's `set_epoch` passed on to the shuffle."""

    def __init__(self, stream, rows: int):
        self.stream = stream
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __iter__(self):
        return iter(self.stream)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


def open_train_split(directory: Path, config: TrainJobConfig):
    """The train split for Trainer: a memory-mapped `datasets.Dataset`, or with `stream:` a
    shuffled stream over its shards (rows are read a batch at a time, never the whole split)."""
    import datasets

    rows = datasets.load_from_disk(str(directory))  # memory-mapped: nothing is read yet
    if config.stream is None:
        return rows
    # One stream shard per Arrow file: the shuffle also permutes the order the files are read in.
    stream = rows.to_iterable_dataset(num_shards=len(rows.cache_files))
    stream = stream.shuffle(seed=config.stream.seed, buffer_size=config.stream.shuffle_buffer)
    return SizedStream(stream, len(rows))
