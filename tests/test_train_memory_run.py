"""`dialogtune train` with task: memory on MSC's release format: the run directory, exact resume
through the command's own path, and the errors a user can meet."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FIXTURES

from dialogtune.config import TrainJobConfig, build_config
from dialogtune.errors import RunError
from dialogtune.train.memory_run import train_memory
from dialogtune.train.run import train


def memory_job(tmp_path, model_dir, **sections) -> TrainJobConfig:
    raw = {"data": {"path": str(FIXTURES / "msc_parlai.jsonl")}, "task": {"name": "memory"},
           "split": {"validation": 0.34, "seed": 0}, "model": {"name": str(model_dir)}, "max_length": 64,
           "output": str(tmp_path / "prepared"), "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
           "memory": {"slots": 4, "window": 16, "time_horizon": 3},
           "train": {"max_steps": 6, "learning_rate": 0.01, "per_device_train_batch_size": 2, "logging_steps": 1,
                     "warmup_steps": 0, "lr_scheduler_type": "linear", "report_to": []},
           "eval": {"every": 3}, "run_dir": str(tmp_path / "run"), "samples": 0}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return build_config(raw, schema=TrainJobConfig)


def test_a_memory_run_learns_and_leaves_a_loadable_run(tmp_path, tiny_model_dir):
    summary = train(memory_job(tmp_path, tiny_model_dir), quiet=True)
    assert summary["steps"] == 6
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert set(summary["eval_after"]) >= {"eval_perplexity_session_1", "eval_perplexity_session_2",
                                          "eval_perplexity_session_3"}
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    info = json.loads((run / "final" / "dialogtune.json").read_text())
    assert info["task"] == "memory"
    assert info["memory"] == {"kind": "causal", "slots": 4, "window": 16, "time_horizon": 3, "reset": "dialogue",
                              "speakers": ["A", "B"], "as": []}
    assert {"adapter_model.safetensors", "memory.safetensors", "memory.json"} <= {
        p.name for p in (run / "final").iterdir()}
    assert json.loads((run / "run.json").read_text())["identity"]["memory"]["slots"] == 4


def test_a_run_stopped_and_resumed_ends_where_an_unbroken_one_does(tmp_path, tiny_model_dir):
    """LoRA dropout on: the random state is part of what a checkpoint must restore."""
    whole = train(memory_job(tmp_path / "a", tiny_model_dir, eval={"every": None}), quiet=True)
    stopped = train_memory(memory_job(tmp_path / "b", tiny_model_dir, eval={"every": None}), quiet=True, stop_at=4)
    assert stopped == {"interrupted": "stop_at", "step": 4}
    resumed = train(memory_job(tmp_path / "b", tiny_model_dir, eval={"every": None}), resume=True, quiet=True)
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / d / "run" / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for d in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert resumed["eval_loss_after"] == pytest.approx(whole["eval_loss_after"], abs=1e-6)


def test_a_different_memory_shape_is_not_resumed(tmp_path, tiny_model_dir):
    train_memory(memory_job(tmp_path, tiny_model_dir), quiet=True, stop_at=1)
    with pytest.raises(RunError, match=r"memory differ"):
        train(memory_job(tmp_path, tiny_model_dir, memory={"slots": 8}), resume=True, quiet=True)


def test_bart_memory_needs_full_training(tmp_path, tiny_bart_dir):
    with pytest.raises(RunError, match="set method: full"):
        train(memory_job(tmp_path, tiny_bart_dir), quiet=True)


def test_bart_trains_as_membart_and_its_run_chats(tmp_path, tiny_bart_dir):
    from dialogtune.memory.bart import MemBartForConditionalGeneration
    from dialogtune.memory.conversation import MemoryConversation, load_memory_run

    summary = train(memory_job(tmp_path, tiny_bart_dir, method="full", train={"learning_rate": 0.003}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    run = load_memory_run(tmp_path / "run")
    assert isinstance(run.model, MemBartForConditionalGeneration) and run.model.memory_slots == 4
    assert run.inputs.encoder_decoder and run.inputs.window == 16
    conversation = MemoryConversation(run)
    conversation.read("A", "How are the twins?")
    first = conversation.memory.clone()
    conversation.reply("B", do_sample=False, max_new_tokens=5)
    assert conversation.turns_read == 2 and not torch.equal(first, conversation.memory)


def test_the_train_command_shows_memory_samples_and_perplexity_by_session(tmp_path, tiny_model_dir, capsys):
    from dialogtune.train_summary import finish_run

    config = memory_job(tmp_path, tiny_model_dir, samples=1)
    summary = finish_run(config, train(config, quiet=True))
    sample = summary["samples"][0]
    assert set(sample) == {"context", "reply", "reference"}
    assert sample["reference"] and sample["context"].startswith(("A:", "B:", "[session"))
    printed = capsys.readouterr().out
    assert "validation perplexity by session: 1: " in printed and "3: " in printed


def test_a_model_without_the_positions_a_step_needs_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(RunError, match=r"needs 572 positions \(2 x memory.slots \(4\) \+ memory.window \(500\) \+"
                                       r" max_length \(64\)\), and .* has 512; lower memory.window or max_length"):
        train(memory_job(tmp_path, tiny_model_dir, memory={"window": 500}), quiet=True)


def test_epochs_must_be_whole(tmp_path, tiny_model_dir):
    with pytest.raises(RunError, match=r"num_train_epochs: 1.5: .* takes whole epochs"):
        train(memory_job(tmp_path, tiny_model_dir, train={"max_steps": -1, "num_train_epochs": 1.5}), quiet=True)
