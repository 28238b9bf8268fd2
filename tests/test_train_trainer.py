"""Checkpoints you can trust: a run killed at any moment resumes to exactly the losses of an
uninterrupted run; a save that dies half-way leaves the previous checkpoint usable."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dialogtune.config import TrainJobConfig, build_config
from dialogtune.train.run import train
from dialogtune.train.trainer import DialogTrainer, newest_checkpoint

STEPS = 14  # 24 conversations, 18 for training, batch 3: 6 steps an epoch; the run spans 3 epochs


def write_job(directory: Path, model_dir: Path, **overrides) -> Path:
    from test_train_run import write_chats

    directory.mkdir(parents=True, exist_ok=True)
    data = write_chats(directory / "chats.jsonl")
    config = {
        "data": {"path": str(data)}, "task": {"as": "assistant"}, "split": {"validation": 0.25},
        "model": {"name": str(model_dir)}, "template": {"name": "chatml"}, "max_length": 128,
        "output": str(directory / "prepared"), "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state must resume too
        "train": {"max_steps": STEPS, "learning_rate": 0.01, "per_device_train_batch_size": 3,
                  "logging_steps": 1, "save_strategy": "steps", "save_steps": 4, "eval_strategy": "no",
                  "report_to": []},
        "run_dir": str(directory / "run"), "samples": 0,
    }
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump({**config, **overrides}))
    return path


def step_losses(run: Path) -> dict[int, float]:
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]  # a step logged twice (before a kill): the last wins
    return losses


def dialogtune(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.Popen([sys.executable, "-m", "dialogtune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def run_until_checkpoint(job: Path, step: int, sig: int) -> subprocess.Popen:
    """Start training and send `sig` as soon as checkpoint-`step` is complete."""
    process = dialogtune("train", str(job))
    target = job.parent / "run" / "checkpoints" / f"checkpoint-{step}"
    deadline = time.monotonic() + 240
    while not target.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.002)
    process.send_signal(sig)
    process.wait(timeout=120)
    return process


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> dict[int, float]:
    job = write_job(tmp_path_factory.mktemp("reference"), tiny_model_dir)
    process = dialogtune("train", str(job))
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    losses = step_losses(job.parent / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def assert_same_losses(run: Path, reference: dict[int, float]) -> None:
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=1e-6), step


def test_sigkill_then_resume_in_the_second_epoch_gives_identical_losses(tmp_path, tiny_model_dir, reference):
    job = write_job(tmp_path, tiny_model_dir)
    killed = run_until_checkpoint(job, 8, signal.SIGKILL)  # step 8 lies in the second epoch (steps 7-12)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert newest_checkpoint(run / "checkpoints").name.startswith("checkpoint-")
    resumed = dialogtune("train", str(job), "--resume")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert_same_losses(run, reference)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir, reference):
    job = write_job(tmp_path, tiny_model_dir)
    stopped = run_until_checkpoint(job, 4, signal.SIGTERM)
    output = stopped.stdout.read()
    assert stopped.returncode == 143, output
    assert "stopped by SIGTERM at step" in output and "continue with --resume" in output
    step = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint-{step}").exists()
    resumed = dialogtune("train", str(job), "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert_same_losses(tmp_path / "run", reference)


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint(tmp_path, tiny_model_dir, reference, monkeypatch):
    job = write_job(tmp_path, tiny_model_dir)
    config = build_config(yaml.safe_load(job.read_text()), schema=TrainJobConfig)
    original = DialogTrainer._save_optimizer_and_scheduler

    def crash_on_second_save(self, output_dir):
        if self.state.global_step == 8:  # the model is already written to the staging directory
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, output_dir)

    monkeypatch.setattr(DialogTrainer, "_save_optimizer_and_scheduler", crash_on_second_save)
    with pytest.raises(OSError, match=r"could not write checkpoint checkpoint-8 under .*checkpoints \(No space left"
                                      r" on device\); the previous checkpoints are untouched"):
        train(config, quiet=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert newest_checkpoint(checkpoints) == checkpoints / "checkpoint-4"
    assert (checkpoints / "checkpoint-4" / "optimizer.pt").exists()
    monkeypatch.undo()
    resumed = dialogtune("train", str(job), "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert_same_losses(tmp_path / "run", reference)


def eval_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and r["step"] > 0}


def test_the_best_checkpoint_from_before_a_stop_survives_the_resumed_run(tmp_path, tiny_model_dir):
    from test_train_run import job

    from dialogtune.config import VALIDATION_METRICS

    # Ranked with greater_is_better, the best checkpoint is the one with the highest validation
    # loss: the earliest, as loss falls. So the runs after the resume never beat it.
    ranked = {"every": 2, "keep_best": 1, "greater_is_better": True}
    train(job(tmp_path, tiny_model_dir, eval=ranked, samples=0, train={"max_steps": 4}), quiet=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    train(job(tmp_path, tiny_model_dir, eval=ranked, samples=0, train={"max_steps": 8}), resume=True, quiet=True)
    losses = eval_losses(tmp_path / "run")
    assert sorted(losses) == [2, 4, 6, 8]
    assert max(losses, key=losses.get) == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-8"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(VALIDATION_METRICS) <= set(r) for r in records if "eval_loss" in r)


def test_train_puts_the_callers_signal_handlers_back(tmp_path, tiny_model_dir, monkeypatch):
    from test_train_run import job

    def callers(signum, frame):
        pass

    config = job(tmp_path, tiny_model_dir, train={"max_steps": 1}, eval={"every": None}, samples=0)
    before = {sig: signal.signal(sig, callers) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        train(config, quiet=True)
        assert signal.getsignal(signal.SIGTERM) is callers and signal.getsignal(signal.SIGINT) is callers
        during = []

        def failing_step(self, *args, **kwargs):
            during.append(signal.getsignal(signal.SIGTERM))
            raise RuntimeError("a step failed")

        monkeypatch.setattr(DialogTrainer, "training_step", failing_step)
        with pytest.raises(RuntimeError, match="a step failed"):
            train(config, overwrite=True, quiet=True)
        assert during and during[0] is not callers  # training had its own handler, and gave it back:
        assert signal.getsignal(signal.SIGTERM) is callers and signal.getsignal(signal.SIGINT) is callers
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_the_best_checkpoint_survives_a_kill_and_the_resumed_run(tmp_path, tiny_model_dir):
    # As above, ranked so that the earliest checkpoint is the best; the process is killed (no
    # chance to save anything) right after checkpoint 4, then resumed to step 8.
    job = write_job(tmp_path, tiny_model_dir, eval={"every": 2, "keep_best": 1, "greater_is_better": True},
                    train={"max_steps": 8, "learning_rate": 0.01, "per_device_train_batch_size": 3,
                           "logging_steps": 1, "report_to": []})
    killed = run_until_checkpoint(job, 4, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-2", "checkpoint-4"]
    resumed = dialogtune("train", str(job), "--resume")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    losses = eval_losses(tmp_path / "run")
    assert sorted(losses) == [2, 4, 6, 8] and max(losses, key=losses.get) == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-8"]


def test_the_loss_runs_in_the_training_precision(tmp_path, tiny_model_dir):
    """bf16 training computes the backbone in bf16: Accelerate's autocast is on the model's forward,
    which the fused loss does not call, so the trainer enters it around the loss itself."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from dialogtune.collate import CausalCollator

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to=[])
    trainer = DialogTrainer(model=model, args=args, train_dataset=[], data_collator=None)
    batch = CausalCollator(pad_token_id=0)([{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8],
                                                 "position_ids": [0, 1, 2, 3]}])
    with trainer.compute_loss_context_manager():  # as Trainer.training_step runs each micro-batch
        trainer.compute_loss(model, batch)
    assert seen == [torch.bfloat16]
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # the weights stay fp32
