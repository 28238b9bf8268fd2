"""A turn of a dialogue as the token rows a memory model's step reads: the same for recurrent
training, validation, chat and serve, so use builds exactly what training saw.

A dialogue here is a prepared row (`prefix_ids`, `text_ids`, `sessions`, `trained`, one entry
per turn, see `dialogtune.prepare_memory`). A step for turn t reads the last `window` tokens of
the turns before it, then the turn's prefix; it learns the turn's text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dialogtune.tokenize import IGNORE_INDEX


@dataclass
class TurnInputs:
    """How a step's token rows are formed: causal (history + prefix + text, text learned) or
    encoder-decoder (encoder: history + prefix; decoder: text + eos)."""

    window: int
    encoder_decoder: bool
    pad_token_id: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def history(self, dialogue: dict, turn: int) -> list[int]:
        """The last `window` tokens of the dialogue before `turn`."""
        out: list[int] = []
        for index in range(turn - 1, -1, -1):  # from the turn backwards, until the window is full
            out[:0] = dialogue["prefix_ids"][index] + dialogue["text_ids"][index]
            if len(out) >= self.window:
                break
        return out[-self.window:] if self.window else []

    def row(self, dialogue: dict, turn: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one stream's step."""
        prefix, text = dialogue["prefix_ids"][turn], dialogue["text_ids"][turn]
        trained = dialogue["trained"][turn]
        history = self.history(dialogue, turn)
        if self.encoder_decoder:
            source = ([self.bos_token_id] if self.bos_token_id is not None else []) + history + prefix
            source += [self.eos_token_id] if self.eos_token_id is not None else []
            target = text + ([self.eos_token_id] if self.eos_token_id is not None else [])
            return source, target if trained else [IGNORE_INDEX] * len(target)
        ids = history + prefix + text
        labels = [IGNORE_INDEX] * (len(history) + len(prefix)) + (text if trained else [IGNORE_INDEX] * len(text))
        return ids, labels

    def batch(self, rows: list[tuple[list[int], list[int]] | None], device) -> dict[str, torch.Tensor]:
        """Right-padded tensors; an idle stream (None) is one pad token, never trained."""
        rows = [r if r is not None else ([self.pad_token_id], [IGNORE_INDEX]) for r in rows]
        length = max(len(ids) for ids, _ in rows)
        target_length = max(len(labels) for _, labels in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), target_length if self.encoder_decoder else length), IGNORE_INDEX)
        for i, (row_ids, row_labels) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            mask[i, : len(row_ids)] = 1
            labels[i, : len(row_labels)] = torch.tensor(row_labels)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
