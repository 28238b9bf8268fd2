"""The recurrent loop: truncated BPTT windows, token-weighted validation per session, and
checkpoints that resume exactly."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import tiny_llama

from dialogtune.config import MemoryConfig
from dialogtune.memory.causal import CausalMemoryModel
from dialogtune.memory.inputs import TurnInputs
from dialogtune.train.recurrent import RecurrentTrainer, Schedule, newest_checkpoint, step_weights


def synthetic_dialogues(count: int, turns: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        out.append({"prefix_ids": [[rng.randrange(10, 50)] for _ in range(turns)],
                    "text_ids": [[rng.randrange(50, 300) for _ in range(rng.randrange(2, 6))] for _ in range(turns)],
                    "sessions": [1 + t * 2 // turns for t in range(turns)],
                    "trained": [t % 3 != 1 for t in range(turns)]})
    return out


def make_trainer(tokenizer, run, horizon=3, max_steps=6, streams=2, slots=4, seed=0, validation=None):
    torch.manual_seed(seed)
    model = CausalMemoryModel(tiny_llama(tokenizer), slots=slots)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 20)
    schedule = Schedule(streams=streams, eval_streams=2, max_steps=max_steps, epochs=None, seed=seed,
                        logging_steps=1, save_every=None, max_grad_norm=1.0)
    memory = MemoryConfig(slots=slots, window=6, time_horizon=horizon)
    return RecurrentTrainer(model, optimizer, scheduler, synthetic_dialogues(5, 7, seed=1), validation,
                            TurnInputs(window=6, encoder_decoder=False, pad_token_id=2), memory, schedule, run)


def test_later_steps_of_a_window_weigh_more():
    assert step_weights(3) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert sum(step_weights(8)) == pytest.approx(1.0)


def test_gradients_reach_the_initial_memory_only_in_windows_where_a_stream_resets(byte_tokenizer, tmp_path):
    trainer = make_trainer(byte_tokenizer, tmp_path, horizon=3)
    reached = []  # (window, gradient norm) each time a backward reaches memory_init
    trainer.model.memory_init.register_hook(lambda grad: reached.append((trainer.global_step, float(grad.norm()))))
    trainer.window()  # timesteps 1-3: every stream starts a dialogue, so its memory is memory_init
    assert trainer.memory.requires_grad is False and trainer.memory.grad_fn is None  # detached at the edge
    trainer.window()  # timesteps 4-6: the 7-turn dialogues go on, no reset: the edge cut the path
    assert trainer.global_step == 2
    assert len(reached) == 1 and reached[0][0] == 0 and reached[0][1] > 0


def test_validation_is_token_weighted_per_session_and_independent_of_batching(byte_tokenizer, tmp_path):
    validation = synthetic_dialogues(3, 5, seed=7)
    trainer = make_trainer(byte_tokenizer, tmp_path, validation=validation)
    report = trainer.evaluate()
    # The same by hand: each dialogue alone, turn by turn, memory carried, sums per session.
    sums, counts = {}, {}
    inputs = trainer.inputs
    with torch.no_grad():
        for dialogue in validation:
            memory = None
            for turn in range(len(dialogue["trained"])):
                batch = inputs.batch([inputs.row(dialogue, turn)], "cpu")
                out = trainer.model.step(batch["input_ids"], batch["attention_mask"], batch["labels"], memory)
                memory = out.memory
                session = dialogue["sessions"][turn]
                sums[session] = sums.get(session, 0.0) + float(out.loss_sum)
                counts[session] = counts.get(session, 0) + int(out.count)
    loss = sum(sums.values()) / sum(counts.values())
    assert report["eval_loss"] == pytest.approx(loss, abs=1e-4)
    assert report["eval_tokens"] == sum(counts.values())
    for session, total in sums.items():
        assert report[f"eval_perplexity_session_{session}"] == pytest.approx(
            math.exp(total / counts[session]), rel=1e-4)


def test_a_resumed_run_takes_exactly_the_steps_of_an_unbroken_one(byte_tokenizer, tmp_path):
    unbroken = make_trainer(byte_tokenizer, tmp_path / "a", max_steps=6)
    unbroken.train(quiet=True)
    first = make_trainer(byte_tokenizer, tmp_path / "b", max_steps=6)
    first.train(stop_at=3, quiet=True)
    first.save_checkpoint()
    resumed = make_trainer(byte_tokenizer, tmp_path / "b", max_steps=6, seed=0)
    # Different random state before loading: the checkpoint must restore it.
    torch.manual_seed(123)
    resumed.load_checkpoint(newest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert resumed.global_step == 3 and resumed.memory is not None
    resumed.train(quiet=True)
    assert len(unbroken.losses) == 6
    assert resumed.losses == pytest.approx(unbroken.losses, abs=1e-6)
    for (name, a), b in zip(unbroken.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    assert resumed.streams.state == unbroken.streams.state


def test_non_finite_windows_are_not_applied_and_stop_the_run(byte_tokenizer, tmp_path):
    trainer = make_trainer(byte_tokenizer, tmp_path, max_steps=10)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    real_step = trainer.model.step

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        out.loss_sum = out.loss_sum * float("nan")
        return out

    trainer.model.step = poisoned
    trainer.train(quiet=True)
    assert (trainer.global_step, trainer.bad_steps) == (3, 3)  # schedule.max_bad_steps in a row
    for name, parameter in trainer.model.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, before[name]), name


def test_windows_without_a_trained_token_are_not_steps(byte_tokenizer, tmp_path):
    """Every third turn is not trained: with one stream and one turn a window, those timesteps
    carry the memory on but are neither steps nor logged losses."""
    trainer = make_trainer(byte_tokenizer, tmp_path, horizon=1, max_steps=6, streams=1)
    trainer.train(quiet=True)
    assert trainer.global_step == 6 and len(trainer.losses) == 6 and min(trainer.losses) > 0
    # Turns 0, 2, 3, 5, 6 of each 7-turn dialogue are trained: the 6th trained turn is the second
    # dialogue's first, so 8 timesteps were taken and the stream waits at that dialogue's turn 1.
    assert trainer.streams.state.position == 2 and trainer.streams.state.rows[0][1] == 1


def test_checkpoints_keep_the_newest_and_the_best_by_validation_loss(byte_tokenizer, tmp_path):
    import json

    trainer = make_trainer(byte_tokenizer, tmp_path, max_steps=10)
    trainer.schedule.keep_best = 1
    for loss in (3.0, 2.0, 2.5, None):
        trainer.window()
        trainer.save_checkpoint(loss)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["checkpoint-2", "checkpoint-4"]  # the best (2.0) and the newest
    assert json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "recurrent_state.json").read_text())[
        "eval_loss"] == 2.0


def test_a_signal_stops_after_the_window_and_is_resumable(byte_tokenizer, tmp_path):
    import os
    import signal

    from dialogtune.train.trainer import stop_on_signals

    trainer = make_trainer(byte_tokenizer, tmp_path, max_steps=6)
    real_window = trainer.window

    def window_then_signal():
        loss = real_window()
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    trainer.window = window_then_signal
    with stop_on_signals(trainer):
        trainer.train(quiet=True)
    assert (trainer.stop_requested, trainer.global_step) == ("SIGTERM", 2)
