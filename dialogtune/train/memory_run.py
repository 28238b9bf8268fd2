"""`dialogtune train` for `task: memory`: the run around the recurrent loop.

Same run directory as every other task (run.json, metrics.jsonl, loss.png, checkpoints/,
final/, summary.json); final/ holds the memory model (a LoRA adapter or the full model, plus
memory.safetensors and memory.json) and dialogtune.json with the window and memory settings,
so chat and serve build each turn's input exactly as training did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch

import dialogtune
from dialogtune.config import TrainJobConfig
from dialogtune.errors import RunError
from dialogtune.files import staged_dir, write_json
from dialogtune.models import load_tokenizer, resolve
from dialogtune.prepare import prepare
from dialogtune.records import PreparedInfo, RunInfo
from dialogtune.train.recurrent import (
    RecurrentTrainer,
    Schedule,
    TurnInputs,
    newest_checkpoint,
    planned_steps,
)
from dialogtune.train.report import plot_losses, read_metrics
from dialogtune.train.trainer import stop_on_signals


def build_memory_model(config: TrainJobConfig, tokenizer):
    """The model to train: BART with MemBart's memory (full fine-tuning), or any causal LM with
    memory slots (LoRA, QLoRA or full on the base; the memory parameters always in full)."""
    from transformers import AutoConfig

    from dialogtune.train.model import load_model

    slots = config.memory.slots
    model_config = AutoConfig.from_pretrained(resolve(config.model.name))
    check_positions(config, model_config)
    if model_config.is_encoder_decoder:
        if model_config.model_type != "bart":
            raise RunError(f"task: memory on an encoder-decoder model needs BART (MemBart); {config.model.name!r} is"
                           f" {model_config.model_type}. Use a BART checkpoint or a decoder-only model")
        if config.method != "full":
            raise RunError("task: memory with BART trains the whole model (MemBart's memory sits inside every"
                           " encoder layer); set method: full")
        if config.memory.window == 0:
            raise RunError("memory.window: 0 with BART: its memory is written by the encoder, which reads a turn's"
                           " words only as the next turns' history window; give it a window (e.g. 128)")
        from dialogtune.memory.bart import MemBartForConditionalGeneration

        return MemBartForConditionalGeneration.from_bart(load_model(config), memory_len=slots)
    from dialogtune.loss import transforms_logits
    from dialogtune.memory.causal import PRIMER, CausalMemoryModel

    if transforms_logits(model_config):
        raise RunError(f"task: memory computes its loss from the output layer directly, and {config.model.name!r}"
                       " transforms its logits after it (soft-capping or scaling); choose another model")

    primer = tokenizer(PRIMER, add_special_tokens=False).input_ids
    return CausalMemoryModel(load_model(config), slots, primer_ids=primer)


def check_positions(config: TrainJobConfig, model_config) -> None:
    """A step reads memory slots (twice for a causal model: read and write), the history window
    and a turn of up to max_length tokens: refuse a model with fewer positions than that."""
    positions = getattr(model_config, "max_position_embeddings", None)
    memory = config.memory
    if model_config.is_encoder_decoder:
        needed = memory.window + config.max_length + 2  # <s> history prefix </s>
        what = f"memory.window ({memory.window}) + max_length ({config.max_length}) + 2"
    else:
        needed = 2 * memory.slots + memory.window + config.max_length
        what = f"2 x memory.slots ({memory.slots}) + memory.window ({memory.window}) + max_length ({config.max_length})"
    if positions is not None and needed > positions:
        raise RunError(f"a step of this memory model needs {needed} positions ({what}), and {config.model.name!r} has"
                       f" {positions}; lower memory.window or max_length")


def turn_inputs(config: TrainJobConfig, tokenizer, manifest: PreparedInfo, encoder_decoder: bool) -> TurnInputs:
    return TurnInputs(window=config.memory.window, encoder_decoder=encoder_decoder,
                      pad_token_id=manifest.tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id if encoder_decoder else None,
                      eos_token_id=tokenizer.eos_token_id if encoder_decoder else None)


def memory_settings(config: TrainJobConfig, encoder_decoder: bool, speakers: list[str]) -> dict:
    """What use needs to build turns as training did (dialogtune.json's `memory`)."""
    return {"kind": "bart" if encoder_decoder else "causal", **config.memory.model_dump(), "speakers": speakers,
            "as": [s for s in config.task.speakers_as or [] if s != "*"]}


def train_memory(config: TrainJobConfig, *, overwrite: bool = False, resume: bool = False, quiet: bool = False,
                 stop_at: int | None = None) -> dict:
    """Train and save the run; `stop_at` stops after that many optimizer steps with a checkpoint
    (what a killed run leaves), for resume tests."""
    import datasets
    from transformers import get_scheduler, set_seed

    from dialogtune.train.model import pick_precision
    from dialogtune.train.run import (
        check_run_dir,
        check_tokenizer,
        peak_memory_mb,
        training_arguments,
        write_run_record,
    )

    started = time.perf_counter()
    run = Path(config.run_dir)
    resume = resume or config.resume == "auto"
    check_run_dir(run, config, overwrite, resume)
    precision = pick_precision(config.precision)
    if precision == "fp16":
        raise RunError("task: memory trains in fp32 or bf16 (fp16 would need loss scaling through the recurrence);"
                       " set precision: bf16 or auto")
    prepared = prepare(config, quiet=quiet)
    manifest = PreparedInfo.load(prepared.directory)
    if manifest.task != "memory":
        raise RunError(f"{prepared.directory} was prepared for task {manifest.task}, not memory")
    tokenizer = load_tokenizer(config.model.name)
    check_tokenizer(manifest, tokenizer, config.model.name, prepared.directory)
    train_rows = datasets.load_from_disk(str(prepared.directory / "train")).to_list()
    has_validation = (prepared.directory / "validation").exists()
    validation_rows = datasets.load_from_disk(str(prepared.directory / "validation")).to_list() \
        if has_validation else None
    args = training_arguments(config, run, precision, has_validation)
    set_seed(args.seed)
    model = build_memory_model(config, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    encoder_decoder = bool(model.config.is_encoder_decoder)
    epochs = None if args.max_steps > 0 else int(args.num_train_epochs)
    if epochs is not None and (epochs != args.num_train_epochs or epochs < 1):
        raise RunError(f"train.num_train_epochs: {args.num_train_epochs}: memory training streams whole dialogues,"
                       " so it takes whole epochs (1, 2, ...); for part of one, set train.max_steps")
    max_steps = args.max_steps if args.max_steps > 0 else planned_steps(
        train_rows, args.per_device_train_batch_size, config.memory.time_horizon, epochs, args.seed)
    schedule = Schedule(streams=args.per_device_train_batch_size, eval_streams=args.per_device_eval_batch_size,
                        max_steps=max_steps, epochs=epochs, seed=args.seed,
                        logging_steps=max(1, int(args.logging_steps)), save_every=config.eval.every,
                        max_grad_norm=args.max_grad_norm, max_bad_steps=config.max_bad_steps,
                        keep_best=config.eval.keep_best)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(max_steps),
                              num_training_steps=max_steps)
    run.mkdir(parents=True, exist_ok=True)
    metrics_path = run / "metrics.jsonl"

    def log(record: dict) -> None:
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if any(key.startswith("eval_") for key in record):
            plot_losses(metrics_path, run / "loss.png")

    trainer = RecurrentTrainer(model, optimizer, scheduler, train_rows, validation_rows,
                               turn_inputs(config, tokenizer, manifest, encoder_decoder), config.memory, schedule,
                               run, log=log)
    write_run_record(run, config, args, prepared.directory, manifest, precision,
                     recurrent_schedule=dataclasses.asdict(schedule))
    checkpoint = newest_checkpoint(run / "checkpoints") if resume else None
    before: dict = {}
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
        before = next((r for r in read_metrics(metrics_path) if "eval_loss" in r), {})

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    if checkpoint is None:
        with autocast():  # the same precision as every later evaluation
            before = trainer.evaluate()
        if before:
            log({"step": 0, **before})

    loop_started, tokens_before, trained_before = time.perf_counter(), trainer.tokens_seen, trainer.trained_tokens_seen
    with autocast(), stop_on_signals(trainer):
        trainer.train(stop_at=stop_at, quiet=quiet)
    if trainer.stop_requested:  # a signal: saved where it stopped, to --resume from
        return {"interrupted": trainer.stop_requested, "step": trainer.global_step,
                "checkpoint": str(trainer.save_checkpoint())}
    train_seconds = max(time.perf_counter() - loop_started, 1e-9)
    if trainer.bad_in_a_row >= schedule.max_bad_steps:
        trainer.save_checkpoint()
        raise RunError(f"stopped at step {trainer.global_step}: {schedule.max_bad_steps} windows in a row had a"
                       " non-finite loss or gradient (not applied); lower train.learning_rate or memory.time_horizon,"
                       f" or raise max_bad_steps. Checkpoints so far are in {run / 'checkpoints'}")
    if stop_at is not None and trainer.global_step >= stop_at and stop_at < max_steps:
        trainer.save_checkpoint()
        return {"interrupted": "stop_at", "step": trainer.global_step}
    with autocast():
        after = trainer.evaluate()
    trainer.save_checkpoint(after.get("eval_loss"))
    if after:
        log({"step": trainer.global_step, **after})
    plot_losses(metrics_path, run / "loss.png")
    speakers = list(prepared.stats.get("speakers", {}))
    final = save_memory_final(model, tokenizer, manifest, config, run, encoder_decoder, speakers)
    seconds = time.perf_counter() - started
    summary = {
        "run_dir": str(run), "final": str(final), "steps": trainer.global_step, "seconds": round(seconds, 1),
        "tokens": trainer.tokens_seen, "trained_tokens": trainer.trained_tokens_seen,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round((trainer.tokens_seen - tokens_before) / train_seconds, 1),
        "trained_tokens_per_s": round((trainer.trained_tokens_seen - trained_before) / train_seconds, 1),
        "skipped_steps": trainer.bad_steps,
        "train_loss_last": trainer.losses[-1] if trainer.losses else None,
        "eval_before": before, "eval_after": after, "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"), "precision": precision, "peak_memory_mb": peak_memory_mb(),
        "memory": memory_settings(config, encoder_decoder, speakers), "streams": schedule.streams,
    }
    write_json(run / "summary.json", summary)
    return summary


def save_memory_final(model, tokenizer, manifest: PreparedInfo, config: TrainJobConfig, run: Path,
                      encoder_decoder: bool, speakers: list[str]) -> Path:
    final = run / "final"
    with staged_dir(final) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = RunInfo.of_training(manifest, version=dialogtune.__version__, method=config.method,
                                   base_model=config.model.name, base_model_path=resolve(config.model.name),
                                   system_prompt=None, instruction=None)
        dataclasses.replace(info, memory=memory_settings(config, encoder_decoder, speakers)).save(staging)
    return final
