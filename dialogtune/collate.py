"""Batches from prepared rows.

Causal LMs, `flatten=True` (the default whenever the model takes segment attention, see
attention.py): the batch's rows are laid end to end as one row with no padding at all;
`position_ids` restart at 0 for every example, and attention runs within each example.

Causal LMs, `flatten=False`: rows are padded to the longest in the batch; pads get label -100
and positions restarting at 0, and there is no attention mask. transformers builds a
block-diagonal causal mask from `position_ids`, so packed examples (and the padding) never
attend to each other.

Either way the first label of every example is -100 (tokenize.py), so the shift in the loss
never makes one example predict the next.

Encoder-decoder models (BART, T5): each row must be one example whose trained tokens are its
end (a reply after its context, as `context: {rounds: N}` or `summarize` make): the context is
the encoder input, the trained tokens the decoder labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dialogtune.errors import DataError
from dialogtune.tokenize import IGNORE_INDEX


@dataclass
class CausalCollator:
    pad_token_id: int
    flatten: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.flatten:
            return {key: torch.from_numpy(np.concatenate([np.asarray(r[key], dtype=np.int64) for r in rows]))[None]
                    for key in ("input_ids", "labels", "position_ids")}
        width = max(len(r["input_ids"]) for r in rows)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        positions = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = row["input_ids"]
            labels[i, :n] = row["labels"]
            positions[i, :n] = row["position_ids"]
            positions[i, n:] -= n  # the padding is a separate "sequence": 0, 1, 2, ...
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions)}


@dataclass
class Seq2SeqCollator:
    pad_token_id: int

    @staticmethod
    def split(row: dict) -> tuple[list[int], list[int]]:
        labels = np.asarray(row["labels"])
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        if len(trained) == 0 or trained[-1] - trained[0] + 1 != len(trained):
            raise DataError(
                "an encoder-decoder model needs one trained reply at the end of each example; prepare with"
                " context: {rounds: N} (or the summarize task) and pack: false")
        ids = list(row["input_ids"])
        return ids[: trained[0]], ids[trained[0] : trained[-1] + 1]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [self.split(r) for r in rows]
        src_width = max(len(s) for s, _ in pairs)
        tgt_width = max(len(t) for _, t in pairs)
        ids = torch.full((len(rows), src_width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), src_width), dtype=torch.long)
        labels = torch.full((len(rows), tgt_width), IGNORE_INDEX, dtype=torch.long)
        for i, (source, target) in enumerate(pairs):
            ids[i, : len(source)] = torch.tensor(source)
            mask[i, : len(source)] = 1
            labels[i, : len(target)] = torch.tensor(target)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
