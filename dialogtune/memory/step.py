"""What one turn of a memory model returns, whichever the model (causal or BART)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MemoryStep:
    loss_sum: torch.Tensor  # summed cross-entropy over the trained tokens (float32 scalar)
    count: torch.Tensor  # how many tokens were trained (long scalar)
    logits: torch.Tensor | None  # when asked for (tests, inspection): they cost a vocabulary per position
    memory: torch.Tensor  # the memory after this turn, [batch, slots, width]; differentiable
