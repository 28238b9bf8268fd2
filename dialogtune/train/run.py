"""`dialogtune train CONFIG.yaml`: prepare (cached), fine-tune, save a run directory.

    dialogtune train examples/sgd_respond.yaml
    dialogtune train job.yaml --set train.max_steps=200 --resume

A run directory holds checkpoints/ (atomic; model or adapter, optimizer, scheduler, RNG and
data position), final/ (loadable by plain transformers/PEFT, with the tokenizer, the exact
chat template used in training and dialogtune.json), metrics.jsonl, loss.png, tensorboard/,
run.json (the resolved config and TrainingArguments) and summary.json.

Training stops at the run directory: sample replies and the evaluation report are the command
layer's (dialogtune.train_summary), since training never imports inference or evaluation.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import dialogtune
from dialogtune.collate import CausalCollator, Seq2SeqCollator
from dialogtune.config import TrainJobConfig, check_passed_through
from dialogtune.errors import ConfigError, DataError, RunError
from dialogtune.files import write_json
from dialogtune.loss import core_model
from dialogtune.models import load_tokenizer
from dialogtune.prepare import prepare, tokenizer_hash
from dialogtune.records import PreparedInfo
from dialogtune.train.attention import restore_attention, use_segment_attention
from dialogtune.train.distributed import (
    check_engine,
    check_final_model_gathers,
    engine_arguments,
    launched_processes,
    processes_on_cpu,
)
from dialogtune.train.malloc import keep_freed_memory
from dialogtune.train.model import load_model, pick_precision
from dialogtune.train.report import MetricsWriter, read_metrics
from dialogtune.train.trainer import STAGING, DialogTrainer, EvaluateAtStart, newest_checkpoint

# Keys of `train:` that dialogtune sets itself (each has its own config key or is derived).
PROTECTED = {
    "output_dir": "; set run_dir instead", "bf16": "; set precision instead", "fp16": "; set precision instead",
    "save_total_limit": "; set eval.keep_best instead", "metric_for_best_model": "; set eval.metric instead",
    "greater_is_better": "; set eval.greater_is_better instead",
    "load_best_model_at_end": "; set eval.keep_best instead", "remove_unused_columns": "",
    "resume_from_checkpoint": "; set resume instead", "fsdp": "; set distributed instead",
    "fsdp_config": "; set distributed instead", "deepspeed": "; set distributed instead",
    "use_cpu": "; several processes without a GPU use the CPU by themselves",
}
# What a resumed run must share with the run it continues (`stream` too: it sets the data order).
RUN_IDENTITY = ("model", "method", "lora", "quantization_bits", "task", "template", "max_length", "pack", "stream")


def run_identity(config: TrainJobConfig) -> dict[str, Any]:
    dump = config.model_dump(mode="json", by_alias=True)
    identity = {key: dump[key] for key in RUN_IDENTITY}
    if config.task.name == "memory":  # the memory's shape and window are part of what was trained
        identity["memory"] = dump["memory"]
    return identity


def check_run_dir(run: Path, config: TrainJobConfig, overwrite: bool, resume: bool) -> None:
    if not run.exists() or not any(run.iterdir()):
        return
    if overwrite:
        shutil.rmtree(run)
        return
    recorded = run / "run.json"
    if not recorded.exists():
        raise RunError(f"{run}: exists and is not a dialogtune run; choose another run_dir or pass --overwrite")
    if not resume:
        raise RunError(f"{run}: already holds a run; pass --resume to continue it or --overwrite to start over")
    previous = json.loads(recorded.read_text()).get("identity", {})
    differs = [key for key, value in run_identity(config).items() if previous.get(key) != value]
    if differs:
        raise RunError(f"{run}: holds a different run ({', '.join(differs)} differ); --overwrite to start over")


def training_arguments(config: TrainJobConfig, run: Path, precision: str, has_validation: bool):
    from transformers import TrainingArguments

    protected = PROTECTED if launched_processes() > 1 else {k: v for k, v in PROTECTED.items() if k != "use_cpu"}
    check_passed_through(config.train, TrainingArguments, protected, "dialogtune")
    train_keys = dict(config.train)
    every = config.eval.every
    defaults: dict[str, Any] = {
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "learning_rate": 2e-4,
        "num_train_epochs": 1, "warmup_steps": 0.03, "lr_scheduler_type": "cosine", "weight_decay": 0.0,
        "max_grad_norm": 1.0, "logging_steps": 5, "seed": 0, "data_seed": 0, "report_to": ["tensorboard"],
        "dataloader_pin_memory": torch.cuda.is_available(),
        "save_strategy": "steps" if every else "epoch", "disable_tqdm": False,
        "eval_strategy": ("steps" if every else "epoch") if has_validation else "no",
    }
    if every:
        defaults.update(save_steps=every, eval_steps=every)
    if config.stream is not None:
        # Each process reads the stream and keeps its share of every step's rows. Accelerate's
        # default for streams (the main process reads and sends the batches) needs batches of one
        # shape, which padding-free batches are not.
        train_keys["accelerator_config"] = {"dispatch_batches": False, **train_keys.get("accelerator_config", {})}
    try:
        return TrainingArguments(
            output_dir=str(run / "checkpoints"),
            remove_unused_columns=False, save_total_limit=None, bf16=precision == "bf16", fp16=precision == "fp16",
            **engine_arguments(config.distributed), **{**defaults, **train_keys})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"train: {err}") from err


def check_tokenizer(manifest: PreparedInfo, tokenizer, model_name: str, prepared: Path) -> None:
    made_with = manifest.tokenizer
    if made_with.hash != tokenizer_hash(tokenizer):
        raise DataError(f"{prepared} was prepared with the tokenizer of {made_with.name_or_path!r}, not that of"
                        f" {model_name!r}; prepare it again for this model (dialogtune prepare --model {model_name})")


def train(config: TrainJobConfig, *, overwrite: bool = False, resume: bool = False, quiet: bool = False) -> dict:
    """Train and save the run; return its summary (also written to summary.json). A run stopped
    by a signal returns {interrupted, step, checkpoint}; processes other than the main one
    of a multi-process run return {steps} alone."""
    if config.task.name == "memory":  # streams of whole dialogues, not batches of examples
        if launched_processes() > 1:
            raise RunError("task: memory trains in one process (each stream's memory is carried from one step to"
                           " the next); start it with `dialogtune train`, not torchrun or accelerate launch")
        from dialogtune.train.memory_run import train_memory

        return train_memory(config, overwrite=overwrite, resume=resume, quiet=quiet)
    from accelerate import PartialState

    started = time.perf_counter()
    state = PartialState(cpu=processes_on_cpu())  # under torchrun or `accelerate launch`, one of several
    run = Path(config.run_dir)
    resume = resume or config.resume == "auto"
    if state.is_main_process:
        check_run_dir(run, config, overwrite, resume)
    precision = pick_precision(config.precision)
    with state.main_process_first():  # one process prepares; the others then find it cached
        prepared = prepare(config, quiet=quiet or not state.is_main_process)
    manifest = PreparedInfo.load(prepared.directory)
    tokenizer = load_tokenizer(config.model.name)
    check_tokenizer(manifest, tokenizer, config.model.name, prepared.directory)

    import datasets

    from dialogtune.train.shards import open_train_split

    train_set = open_train_split(prepared.directory / "train", config)  # loaded, or a stream with `stream:`
    has_validation = (prepared.directory / "validation").exists()
    eval_set = datasets.load_from_disk(str(prepared.directory / "validation")) if has_validation else None
    args = training_arguments(config, run, precision, has_validation)
    # transformers' TensorBoard callback takes its directory from this variable.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str((run / "tensorboard").resolve())
    from transformers import set_seed

    set_seed(args.seed)  # before the model: LoRA's initial weights are drawn as it is built
    model = load_model(config)
    pad = manifest.tokenizer.pad_token_id
    seq2seq = model.config.is_encoder_decoder
    if seq2seq and manifest.pack:
        raise RunError("an encoder-decoder model cannot train on packed rows; prepare with pack: false")
    # Padding-free batches with attention inside each example, where the model passes the check.
    segments = not seq2seq and use_segment_attention(core_model(model))
    collator = Seq2SeqCollator(pad) if seq2seq else CausalCollator(pad, flatten=segments)
    if not torch.cuda.is_available():
        keep_freed_memory()

    run.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        shutil.rmtree(run / "checkpoints" / STAGING, ignore_errors=True)  # leftovers of a killed save
        write_run_record(run, config, args, prepared.directory, manifest, precision)
    trainer = DialogTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            data_collator=collator, processing_class=tokenizer, keep_best=config.eval.keep_best,
                            best_metric=config.eval.metric, greater_is_better=config.eval.greater_is_better,
                            max_bad_steps=config.max_bad_steps, callbacks=[MetricsWriter(run)])
    check_engine(config.distributed, engine_name(trainer))
    check_final_model_gathers(getattr(trainer.accelerator.state, "deepspeed_plugin", None))
    checkpoint = newest_checkpoint(run / "checkpoints") if resume else None
    at_start = EvaluateAtStart(trainer) if eval_set is not None and checkpoint is None else None
    if at_start:
        trainer.add_callback(at_start)
    with trainer.stopping_on_signals():
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if at_start:
        before = at_start.metrics["eval_loss"]
    else:  # resumed: the first run's, from its log
        before = next((r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r), None)
    if trainer.stopped_for_bad_steps:
        raise RunError(f"stopped at step {trainer.state.global_step}: {trainer.max_bad_steps} optimizer steps in a row"
                       " had a non-finite loss or gradient (skipped, not applied); lower train.learning_rate, check"
                       f" the data, or raise max_bad_steps. Checkpoints so far are in {run / 'checkpoints'}")
    if trainer.stopped_by:  # a signal after the last step's end changes nothing: the run is complete
        return {"interrupted": trainer.stopped_by, "step": trainer.state.global_step,
                "checkpoint": str(newest_checkpoint(run / "checkpoints"))}
    after = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    restore_attention(core_model(trainer.model))  # the saved model is loaded for generation: standard attention
    # A sharded model (FSDP, ZeRO-3) is gathered whole by all processes together; rank 0 saves it.
    sharded = engine_name(trainer) in ("fsdp", "deepspeed-zero3")
    whole = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    tokens, trained_tokens = trainer.tokens_across_processes()
    if not state.is_main_process:  # the other processes are done: saving and reporting is rank 0's
        return {"steps": trainer.state.global_step}
    from dialogtune.train.export import save_final

    final = save_final(trainer.model, tokenizer, manifest, config, run, state_dict=whole)
    seconds = time.perf_counter() - started
    runtime = max(output.metrics.get("train_runtime", seconds), 1e-9)
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    summary = {
        "run_dir": str(run), "final": str(final), "steps": trainer.state.global_step, "seconds": round(seconds, 1),
        "train_seconds": round(runtime, 1), "tokens": tokens, "trained_tokens": trained_tokens,
        "tokens_per_s": round(tokens / runtime, 1), "trained_tokens_per_s": round(trained_tokens / runtime, 1),
        "peak_memory_mb": peak_memory_mb(), "train_loss_last": losses[-1] if losses else None,
        "eval_loss_before": before, "eval_loss_after": after, "skipped_steps": trainer.bad_steps,
        "precision": precision, "segment_attention": segments, "processes": state.num_processes,
        "engine": engine_name(trainer),
    }
    write_json(run / "summary.json", summary)
    return summary


def write_run_record(run: Path, config: TrainJobConfig, args, prepared: Path, manifest: PreparedInfo,
                     precision: str, **extra: Any) -> None:
    """run.json: the job as resolved (config defaults filled in) and the TrainingArguments it
    became (dialogtune's defaults, then `train:`), so the run can be reproduced from its directory;
    `extra`: what a kind of run adds (a memory run: its recurrent schedule)."""
    write_json(run / "run.json", {
        "dialogtune_version": dialogtune.__version__, "identity": run_identity(config),
        "prepared": str(prepared), "prepared_fingerprint": manifest.fingerprint, "precision": precision,
        "config": config.model_dump(mode="json", by_alias=True), "training_arguments": args.to_dict(), **extra})


def engine_name(trainer: DialogTrainer) -> str:
    if trainer.is_fsdp_enabled:
        return "fsdp"
    if trainer.is_deepspeed_enabled:
        return f"deepspeed-zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if trainer.accelerator.num_processes > 1 else "single"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
