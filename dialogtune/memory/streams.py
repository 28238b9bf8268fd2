"""Streams of dialogues for recurrent training and validation.

Each batch row is a stream holding one dialogue at a time; at every timestep it feeds its next
turn. A finished stream takes the next dialogue from a shared queue (the dialogues shuffled per
epoch by the seed) and its memory resets; with `reset_each_session` also where a session starts.
`StreamState` is plain data (JSON) so a checkpoint resumes the data exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class StreamState:
    """Where every stream and the queue are: all a resumed run needs to continue the data."""

    order: list[int]  # this epoch's queue: dialogue indices, shuffled by seed and epoch
    position: int = 0  # the next queue entry to hand out
    epoch: int = 0
    rows: list[list[int] | None] = field(default_factory=list)  # per stream [dialogue, next turn], None = idle


class Streams:
    def __init__(self, dialogues: list[dict], streams: int, seed: int, epochs: int | None, shuffle: bool = True,
                 reset_each_session: bool = False, state: StreamState | None = None):
        self.dialogues = dialogues
        self.seed, self.epochs, self.shuffle = seed, epochs, shuffle
        self.reset_each_session = reset_each_session
        self.state = state or StreamState(order=self._order(0), rows=[None] * streams)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dialogues)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _take(self) -> int | None:
        state = self.state
        if state.position >= len(state.order):
            if self.epochs is not None and state.epoch + 1 >= self.epochs:
                return None
            state.epoch += 1
            state.order, state.position = self._order(state.epoch), 0
        state.position += 1
        return state.order[state.position - 1]

    def next(self) -> tuple[list[tuple[int, int] | None], list[bool]] | None:
        """Every stream's (dialogue, turn) for the next timestep and whether its memory resets;
        None once every stream is idle (the data is done)."""
        picks: list[tuple[int, int] | None] = []
        resets: list[bool] = []
        for i, row in enumerate(self.state.rows):
            reset = False
            if row is None or row[1] >= len(self.dialogues[row[0]]["trained"]):
                taken = self._take()
                row = [taken, 0] if taken is not None else None
                reset = True
            elif self.reset_each_session:
                sessions = self.dialogues[row[0]]["sessions"]
                reset = sessions[row[1]] != sessions[row[1] - 1]
            self.state.rows[i] = row
            if row is None:
                picks.append(None)
            else:
                picks.append((row[0], row[1]))
                row[1] += 1
            resets.append(reset)
        if all(p is None for p in picks):
            return None
        return picks, resets
