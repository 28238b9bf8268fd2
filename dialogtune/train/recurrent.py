"""Recurrent training of a memory model (`task: memory`): dialogues streamed turn by turn.

Each batch row is a stream: it holds one dialogue at a time and feeds its next turn at every
timestep, with the memory it wrote at the turn before, across sessions. A stream that finishes
its dialogue takes the next one from a shared queue (the train dialogues shuffled per epoch, by
the seed) and its memory is reset (also at each new session with `memory.reset: session`).

Truncated back-propagation through time: `memory.time_horizon` timesteps make one window, one
backward and one optimizer step. Within a window the step losses (each a mean over its trained
tokens) are weighted 2^t and normalised, so later steps, whose memory has read more, count more;
at the window's edge the memory is detached, so gradients never reach further back.

A step reads the last `memory.window` tokens of the dialogue before the turn (earlier sessions
included), the turn's prefix, and learns the turn's text: beyond the window, only the memory
remembers. With `memory.slots: 0` the same loop trains the model without memory (the baseline).

Checkpoints hold everything the next window depends on: the trainable weights, optimizer,
scheduler, random states, the queue (order and position), each stream's dialogue and turn, and
the memory each stream carries, so a resumed run takes exactly the steps an unbroken one would.
Validation streams every validation dialogue once without windows or gradients, and reports
loss and perplexity weighted by tokens, overall and per session.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dialogtune.config import MemoryConfig
from dialogtune.files import staged_dir, write_json
from dialogtune.memory.inputs import TurnInputs
from dialogtune.memory.streams import Streams, StreamState
from dialogtune.train.trainer import CHECKPOINT_PREFIX, checkpoint_step, newest_checkpoint

STATE_FILE = "recurrent_state.json"


# -- the loop -----------------------------------------------------------------------
def step_weights(steps: int) -> list[float]:
    """2^t over a window's steps, normalised to sum to 1."""
    raw = [2.0**t for t in range(steps)]
    return [w / sum(raw) for w in raw]


@dataclass
class Schedule:
    """What the loop reads of TrainingArguments."""

    streams: int
    eval_streams: int
    max_steps: int  # optimizer steps (windows); derived from epochs when train.max_steps is unset
    epochs: int | None  # None: as many as max_steps needs
    seed: int
    logging_steps: int
    save_every: int | None  # also evaluates; None: at the end only
    max_grad_norm: float
    max_bad_steps: int = 3  # non-finite windows in a row before the run stops
    keep_best: int = 2  # checkpoints kept by validation loss, besides the newest


class RecurrentTrainer:
    def __init__(self, model, optimizer, scheduler, train: list[dict], validation: list[dict] | None,
                 inputs: TurnInputs, memory: MemoryConfig, schedule: Schedule, run: Path, log=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_dialogues, self.validation = train, validation
        self.inputs, self.memory_config, self.schedule, self.run = inputs, memory, schedule, run
        self.device = next(model.parameters()).device
        self.streams = Streams(train, schedule.streams, schedule.seed, schedule.epochs,
                               reset_each_session=memory.reset == "session")
        self.memory: torch.Tensor | None = None  # what each stream carries into the next window
        self.global_step = 0
        self.tokens_seen = 0
        self.trained_tokens_seen = 0
        self.losses: list[float] = []  # each optimizer step's loss, for logging and tests
        self.bad_steps = 0  # windows whose loss or gradient was not finite (not applied)
        self.bad_in_a_row = 0
        self.stop_requested: str | None = None  # a signal's name: save and stop after this window
        self.log = log or (lambda record: None)

    def window(self) -> float | None:
        """One truncated-BPTT window: up to time_horizon timesteps, one optimizer step.
        Returns the window's loss, or None when the data ran out. Timesteps with nothing to
        learn (turns of speakers not trained) only carry the memory on: a window without any
        trained token is not a step, and the next one is taken."""
        while (loss := self._window()) == "nothing trained":
            pass
        return loss

    def _window(self) -> float | str | None:
        self.model.train()
        weighted: list[tuple[torch.Tensor, torch.Tensor]] = []
        memory = self.memory
        taken = 0
        for _ in range(self.memory_config.time_horizon):
            nxt = self.streams.next()
            if nxt is None:
                break
            taken += 1
            picks, resets = nxt
            rows = [self.inputs.row(self.train_dialogues[p[0]], p[1]) if p else None for p in picks]
            batch = self.inputs.batch(rows, self.device)
            out = self.model.step(batch["input_ids"], batch["attention_mask"], batch["labels"], memory,
                                  torch.tensor(resets, device=self.device))
            memory = out.memory
            self.tokens_seen += int(batch["attention_mask"].sum())
            self.trained_tokens_seen += int(out.count)
            if int(out.count):
                weighted.append((out.loss_sum, out.count))
        if not taken:
            return None
        self.memory = memory.detach()  # the window's edge: no gradient reaches back past it
        if not weighted:
            return "nothing trained"
        weights = step_weights(len(weighted))
        loss = sum(w * (s / c) for w, (s, c) in zip(weights, weighted))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                              self.schedule.max_grad_norm or float("inf"))
        if torch.isfinite(loss) and torch.isfinite(norm):
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:  # a non-finite loss or gradient is not applied; too many in a row stop the run
            self.bad_steps += 1
            self.bad_in_a_row += 1
            self.memory = None  # nor is a memory it may have poisoned carried on: every stream starts afresh
        with warnings.catch_warnings():  # torch warns of a scheduler step without an optimizer step: meant
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def train(self, stop_at: int | None = None, quiet: bool = False) -> None:
        """Windows until max_steps (or `stop_at`, for tests) or the data runs out; logs,
        evaluates and saves checkpoints on the way."""
        until = min(self.schedule.max_steps, stop_at) if stop_at else self.schedule.max_steps
        bar = tqdm(total=until, initial=self.global_step, desc="train (memory)", unit=" steps",
                   disable=quiet or None, dynamic_ncols=True)
        started, tokens_before = time.perf_counter(), self.tokens_seen
        logged: list[float] = []
        epoch = self.streams.state.epoch
        while self.global_step < until and not self.stop_requested:
            loss = self.window()
            if loss is None or self.bad_in_a_row >= self.schedule.max_bad_steps:
                break
            logged.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.global_step % self.schedule.logging_steps == 0:
                seconds = max(time.perf_counter() - started, 1e-9)
                self.log({"step": self.global_step, "epoch": self.streams.state.epoch,
                          "loss": round(sum(logged) / len(logged), 4),
                          "learning_rate": self.scheduler.get_last_lr()[0],
                          "tokens_per_s": round((self.tokens_seen - tokens_before) / seconds, 1)})
                logged = []
            every = self.schedule.save_every
            # Unset: at each epoch's end, seen as the queue moving on to the next epoch.
            due = self.global_step % every == 0 if every else self.streams.state.epoch != epoch
            epoch = self.streams.state.epoch
            if due and self.global_step < until:
                report = self.evaluate()
                self.log({"step": self.global_step, **report})
                self.save_checkpoint(report.get("eval_loss"))
        bar.close()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss and perplexity of the validation dialogues, streamed once with
        memory carried (no windows), overall and per session."""
        if not self.validation:
            return {}
        was_training = self.model.training
        self.model.eval()
        streams = Streams(self.validation, self.schedule.eval_streams, seed=0, epochs=1, shuffle=False,
                          reset_each_session=self.memory_config.reset == "session")
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        memory = None
        while (nxt := streams.next()) is not None:
            picks, resets = nxt
            rows = [self.inputs.row(self.validation[p[0]], p[1]) if p else None for p in picks]
            batch = self.inputs.batch(rows, self.device)
            out = self.model.step(batch["input_ids"], batch["attention_mask"], batch["labels"], memory,
                                  torch.tensor(resets, device=self.device), per_row=True)
            memory = out.memory
            for pick, row_sum, row_count in zip(picks, out.loss_sum.tolist(), out.count.tolist()):
                if pick is not None and row_count:
                    session = self.validation[pick[0]]["sessions"][pick[1]]
                    sums[session] = sums.get(session, 0.0) + row_sum
                    counts[session] = counts.get(session, 0) + row_count
        self.model.train(was_training)
        total, count = sum(sums.values()), sum(counts.values())
        loss = total / max(count, 1)
        out: dict[str, float] = {"eval_loss": round(loss, 5), "eval_perplexity": round(math.exp(min(loss, 50)), 4),
                                 "eval_tokens": count}
        for session in sorted(sums):
            session_loss = sums[session] / counts[session]
            out[f"eval_perplexity_session_{session}"] = round(math.exp(min(session_loss, 50)), 4)
        return out

    # -- checkpoints ------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, eval_loss: float | None = None) -> Path:
        """checkpoints/checkpoint-STEP, written whole or not at all (files.staged_dir); then only
        the newest and the `keep_best` best by validation loss are kept."""
        from safetensors.torch import save_file

        root = self.run / "checkpoints"
        target = root / f"{CHECKPOINT_PREFIX}{self.global_step}"
        with staged_dir(target) as staging:
            save_file(self.trainable_state(), str(staging / "trainable.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "memory": self.memory.cpu() if self.memory is not None else None,
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                        "numpy_rng": np.random.get_state()}, staging / "training.pt")
            write_json(staging / STATE_FILE, {
                "global_step": self.global_step, "tokens_seen": self.tokens_seen, "bad_steps": self.bad_steps,
                "bad_in_a_row": self.bad_in_a_row, "eval_loss": eval_loss,
                "trained_tokens_seen": self.trained_tokens_seen, "losses": self.losses,
                "streams": asdict(self.streams.state)})
        prune_checkpoints(root, self.schedule.keep_best)
        return target

    def load_checkpoint(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(checkpoint / "trainable.safetensors"))
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)
        saved = torch.load(checkpoint / "training.pt", weights_only=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.memory = saved["memory"].to(self.device) if saved["memory"] is not None else None
        torch.set_rng_state(saved["torch_rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():  # dropout on a GPU draws from these
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        random.setstate(saved["python_rng"])
        np.random.set_state(saved["numpy_rng"])
        state = json.loads((checkpoint / STATE_FILE).read_text())
        self.global_step = state["global_step"]
        self.tokens_seen, self.trained_tokens_seen = state["tokens_seen"], state["trained_tokens_seen"]
        self.losses = state["losses"]
        self.bad_steps, self.bad_in_a_row = state.get("bad_steps", 0), state.get("bad_in_a_row", 0)
        self.streams.state = StreamState(**state["streams"])


def prune_checkpoints(root: Path, keep_best: int) -> None:
    """Delete all checkpoints but the newest and the `keep_best` with the lowest validation loss
    (each checkpoint's state records its own)."""
    losses = {path: json.loads((path / STATE_FILE).read_text()).get("eval_loss")
              for path in root.iterdir() if checkpoint_step(path) is not None}
    best = sorted((path for path, loss in losses.items() if loss is not None), key=losses.get)[:keep_best]
    keep = {newest_checkpoint(root), *best}
    for path in losses:
        if path not in keep:
            shutil.rmtree(path)


def planned_steps(dialogues: list[dict], streams: int, horizon: int, epochs: int, seed: int) -> int:
    """Optimizer steps for `epochs` passes, by running the streams over the dialogues as training
    will (streams finish unevenly at the end: an estimate from the turn count would stop early)."""
    timesteps = 0
    queue = Streams(dialogues, streams, seed, epochs)
    while queue.next() is not None:
        timesteps += 1
    return max(1, math.ceil(timesteps / horizon))


def describe(schedule: Schedule) -> dict[str, Any]:
    return asdict(schedule)
