"""Several processes: two CPU processes (gloo) under torchrun train exactly what one process
trains with the same global batch; the engine's TrainingArguments; what is refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from test_train_run import write_chats

from dialogtune.config import DistributedConfig, TrainJobConfig, build_config
from dialogtune.errors import ConfigError, RunError
from dialogtune.train import distributed
from dialogtune.train.run import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_job(directory, model_dir, run: str, batch: int, **sections):
    """A full fine-tuning job on the tiny model: logged every step, no validation, plain SGD so
    that the weights after a step show the gradient itself."""
    data = write_chats(directory / "chats.jsonl", count=32)
    raw = {
        "data": {"path": str(data)}, "task": {"as": "assistant"}, "split": {"validation": 0},
        "model": {"name": str(model_dir)}, "template": {"name": "chatml"}, "max_length": 128,
        "output": str(directory / "prepared"), "method": "full", "samples": 0, "run_dir": str(directory / run),
        "train": {"max_steps": 3, "learning_rate": 0.05, "optim": "sgd", "weight_decay": 0.0,
                  "per_device_train_batch_size": batch, "logging_steps": 1, "warmup_steps": 0,
                  "lr_scheduler_type": "constant", "report_to": [], "save_strategy": "no"},
        **sections,
    }
    path = directory / f"{run}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(config_path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "dialogtune", "train", str(config_path), *extra]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def step_losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def final_weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.parametrize("stream", [None, True], ids=["loaded", "streamed"])
def test_two_processes_train_what_one_trains_with_the_same_global_batch(tmp_path, tiny_model_dir, stream):
    one = write_job(tmp_path, tiny_model_dir, "one", batch=4, stream=stream)
    two = write_job(tmp_path, tiny_model_dir, "two", batch=2, stream=stream)
    launch(one, 1)
    launch(two, 2)
    single, double = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(single) == len(double) == 3
    assert single[0] != single[-1]  # the steps moved the model
    assert double == pytest.approx(single, abs=1e-5)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    # Each process counts its own batches; the run reports both processes' tokens together.
    assert summary_two["processes"] == 2 and summary_two["engine"] == "ddp"
    assert summary_two["segment_attention"] is True  # padding-free rows, attention inside each example
    assert summary_two["trained_tokens"] == summary_one["trained_tokens"] > 0
    # Only the main process writes: one line per logged step, not one per process.
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == \
        len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())


def test_lora_with_validation_resumes_across_processes_as_an_unbroken_run(tmp_path, tiny_model_dir):
    lora = {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "split": {"validation": 0.15},
            "eval": {"every": 2}}  # 5 validation rows: not a whole number of batches on 2 processes
    steps = {"max_steps": 4, "learning_rate": 0.02, "optim": "adamw_torch", "save_strategy": "steps"}

    def lora_job(run, batch, **train_keys):
        path = write_job(tmp_path, tiny_model_dir, run, batch=batch, **lora)
        raw = yaml.safe_load(path.read_text())
        raw["train"].update(steps, **train_keys)
        path.write_text(yaml.safe_dump(raw))
        return path

    launch(lora_job("whole", 2), 2)
    launch(lora_job("broken", 2, max_steps=2), 2)
    shutil.copytree(tmp_path / "broken", tmp_path / "moved")
    launch(lora_job("broken", 2), 2, "--resume")
    # DDP checkpoints hold whole states: one process with the same global batch continues them.
    launch(lora_job("moved", 4), 1, "--resume")
    launch(lora_job("single", 4), 1)
    whole, broken = step_losses(tmp_path / "whole"), step_losses(tmp_path / "broken")
    assert len(whole) == 4 and broken == pytest.approx(whole, abs=1e-6)
    assert step_losses(tmp_path / "moved") == pytest.approx(whole, abs=1e-5)
    # Validation is token-weighted over both processes' shares, no row counted twice: one process
    # computes the same.
    def evaluations(run, key):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [record[key] for record in map(json.loads, lines) if key in record]

    assert len(datasets.load_from_disk(str(tmp_path / "prepared" / "validation"))) == 5
    assert evaluations("whole", "eval_tokens") == evaluations("single", "eval_tokens")
    assert evaluations("whole", "eval_loss") == pytest.approx(evaluations("single", "eval_loss"), abs=1e-5)
    assert step_losses(tmp_path / "single") == pytest.approx(whole, abs=1e-5)
    saved = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    assert saved == ["checkpoint-2", "checkpoint-4"]  # one checkpoint per save, written by all, published once


def test_a_signal_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, tiny_model_dir):
    import psutil

    config_path = write_job(tmp_path, tiny_model_dir, "run", batch=2)
    raw = yaml.safe_load(config_path.read_text())
    raw["train"].update(max_steps=100_000, save_strategy="steps", save_steps=100_000)
    config_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "dialogtune", "train", str(config_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert time.monotonic() < deadline and launcher.poll() is None, "training did not start"
            time.sleep(0.2)
        ranks = {int(child.environ().get("RANK", -1)): child
                 for child in psutil.Process(launcher.pid).children(recursive=True)}
        ranks[1].send_signal(signal.SIGTERM)  # the main process (rank 0) is not told
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    # Both processes stopped for it (each says so), at the same step, after saving that step.
    stops = re.findall(r"stopped by SIGTERM at step (\d+); checkpoint (\S+)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]
    step, checkpoint = int(stops[0][0]), Path(stops[0][1])
    assert checkpoint.name == f"checkpoint-{step}" and (checkpoint / "trainer_state.json").exists()


def engine(monkeypatch, processes: int, **distributed_keys):
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    return distributed.engine_arguments(DistributedConfig(**distributed_keys))


def test_one_process_gets_no_engine_arguments(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.engine_arguments(DistributedConfig(strategy="fsdp")) == {}


def test_cpu_processes_are_told_to_join_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine(monkeypatch, 2) == {"use_cpu": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine(monkeypatch, 2) == {}


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharding_engines_on_cpu_processes_are_refused_not_run_as_ddp(monkeypatch, strategy):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"{strategy} needs GPUs .Accelerate runs CPU processes with DDP only"):
        engine(monkeypatch, 2, strategy=strategy)


def test_an_engine_other_than_the_one_asked_for_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.check_engine(DistributedConfig(strategy="fsdp"), "fsdp")
    distributed.check_engine(DistributedConfig(strategy="deepspeed", zero_stage=2), "deepspeed-zero2")
    with pytest.raises(ConfigError, match="strategy: fsdp was asked for, but Accelerate set up ddp"):
        distributed.check_engine(DistributedConfig(strategy="fsdp"), "ddp")


def test_fsdp_shards_fully_by_decoder_layer(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    arguments = engine(monkeypatch, 8, strategy="fsdp", activation_checkpointing=True)
    assert arguments["fsdp"] is True
    assert arguments["fsdp_config"] == {
        "version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "activation_checkpointing": True, "cpu_offload": False, "state_dict_type": "FULL_STATE_DICT"}


def test_deepspeed_zero_config_leaves_batch_and_precision_to_training_arguments(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "deepspeed", type(sys)("deepspeed"))  # the config needs only its presence
    arguments = engine(monkeypatch, 4, strategy="deepspeed", zero_stage=3, cpu_offload=True)
    zero = arguments["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert {arguments["deepspeed"][k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                "train_batch_size", "gradient_clipping")} == {"auto"}
    stage_two = engine(monkeypatch, 4, strategy="deepspeed", zero_stage=2)["deepspeed"]["zero_optimization"]
    assert stage_two["stage"] == 2 and "offload_param" not in stage_two
    assert "stage3_gather_16bit_weights_on_model_save" not in stage_two
    # Buckets set, not left at DeepSpeed's 5e8 elements (~9 GB with overlap_comm): "auto" is what
    # transformers fills from the hidden size; ZeRO-2's all-gather bucket has no "auto".
    assert zero["overlap_comm"] is True
    assert {k: zero[k] for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                 "stage3_param_persistence_threshold")} == dict.fromkeys(
        ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"), "auto")
    assert "allgather_bucket_size" not in zero
    assert (stage_two["reduce_bucket_size"], stage_two["allgather_bucket_size"]) == ("auto", 50_000_000)
    assert "stage3_prefetch_bucket_size" not in stage_two


def test_deepspeed_without_the_package_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        engine(monkeypatch, 2, strategy="deepspeed")


def test_the_launchers_engine_is_used_and_another_strategy_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert engine(monkeypatch, 2) == {}  # Accelerate builds FSDP from the launcher's config
    assert engine(monkeypatch, 2, strategy="fsdp") == {}
    with pytest.raises(ConfigError, match="launcher's Accelerate config runs fsdp"):
        engine(monkeypatch, 2, strategy="deepspeed", zero_stage=2)


@pytest.mark.parametrize(("keys", "message"), [
    ({"cpu_offload": True}, "cpu_offload applies to strategy fsdp or deepspeed, not ddp"),
    ({"strategy": "fsdp", "zero_stage": 2}, "zero_stage applies to strategy deepspeed, not fsdp"),
    ({"strategy": "deepspeed", "activation_checkpointing": True},
     ("activation_checkpointing applies to strategy fsdp, not deepspeed; for ddp and deepspeed set"
      " train.gradient_checkpointing")),
])
def test_a_key_the_strategy_would_ignore_is_refused(keys, message):
    with pytest.raises(ConfigError) as err:
        build_config({"data": {"path": "x"}, "distributed": keys}, schema=TrainJobConfig)
    assert message in str(err.value)


def test_a_resolved_config_validates_again():
    for keys in ({}, {"strategy": "fsdp", "cpu_offload": True}, {"strategy": "deepspeed", "zero_stage": 2}):
        resolved = build_config({"data": {"path": "x"}, "distributed": keys}, schema=TrainJobConfig)
        again = build_config(resolved.model_dump(mode="json", by_alias=True), schema=TrainJobConfig)
        assert again.distributed == resolved.distributed


def test_keys_the_launchers_engine_would_ignore_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="cpu_offload would be ignored: the launcher's Accelerate config sets up fsdp"):
        engine(monkeypatch, 2, strategy="fsdp", cpu_offload=True)


def test_zero3_that_cannot_gather_the_final_model_is_refused_before_training():
    class Plugin:
        zero_stage, zero3_save_16bit_model = 3, False

    with pytest.raises(ConfigError, match="cannot save the final model; set zero3_save_16bit_model: true"):
        distributed.check_final_model_gathers(Plugin())
    Plugin.zero3_save_16bit_model = True
    distributed.check_final_model_gathers(Plugin())
    distributed.check_final_model_gathers(None)


def test_engine_keys_in_train_point_to_the_distributed_section(tmp_path, tiny_model_dir):
    config_path = write_job(tmp_path, tiny_model_dir, "run", batch=2)
    raw = yaml.safe_load(config_path.read_text())
    raw["train"]["fsdp"] = "full_shard"
    with pytest.raises(ConfigError, match="set distributed instead"):
        train(build_config(raw, schema=TrainJobConfig), quiet=True)
    del raw["train"]["fsdp"]
    raw["train"]["use_cpu"] = True  # one process may ask for the CPU
    assert train(build_config(raw, schema=TrainJobConfig), quiet=True)["steps"] == 3


def test_resuming_with_the_stream_switched_is_refused(tmp_path, tiny_model_dir):
    config_path = write_job(tmp_path, tiny_model_dir, "run", batch=2)
    raw = yaml.safe_load(config_path.read_text())
    train(build_config(raw, schema=TrainJobConfig), quiet=True)
    with pytest.raises(RunError, match=r"holds a different run \(stream differ"):
        train(build_config({**raw, "stream": True}, schema=TrainJobConfig), resume=True, quiet=True)


def test_memory_runs_refuse_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = build_config({"data": {"path": "x"}, "task": {"name": "memory"}}, schema=TrainJobConfig)
    with pytest.raises(RunError, match="task: memory trains in one process"):
        train(config, quiet=True)
