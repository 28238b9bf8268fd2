"""transformers.Trainer, plus what it does not do:

- the loss over trained positions only, normalised by the trained tokens of the whole
  optimizer step (every micro-batch counts, however many tokens it has);
- token-weighted validation loss and perplexity;
- checkpoints written to a staging directory and renamed into place, so a kill at any moment
  leaves the previous checkpoint whole; the best k by a validation metric are kept, and the
  newest, ranked by the scores in Trainer's log history (saved in every checkpoint's
  trainer_state.json and restored on resume, so checkpoints from before a stop keep theirs);
- a non-finite loss or gradient skips the update (counted), and stops the run after
  `max_bad_steps` in a row;
- SIGTERM/SIGINT while training: save a checkpoint at the end of the current step and stop
  cleanly; the caller's handlers are put back afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from dialogtune.loss import core_model, trained_loss
from dialogtune.tokenize import IGNORE_INDEX

STAGING = ".staging"
CHECKPOINT_PREFIX = "checkpoint-"


class DialogTrainer(Trainer):
    def __init__(self, *args, keep_best: int = 2, best_metric: str = "eval_loss", greater_is_better: bool = False,
                 max_bad_steps: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        # Ask Trainer to count the trained tokens of each whole optimizer step (`num_items_in_batch`)
        # and to leave the loss scaling to us: compute_loss divides by that count.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = not core_model(self.model).config.is_encoder_decoder
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.greater_is_better = greater_is_better
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0
        self.bad_in_a_row = 0
        self.stopped_for_bad_steps = False
        self.stop_requested: str | None = None  # a signal this process received
        self.stopped_by: str | None = None  # the signal all processes stopped for, at a step's end
        self.tokens_seen = 0
        self.trained_tokens_seen = 0
        self._last_log = (time.perf_counter(), 0, 0)
        self.add_callback(_GuardCallback(self))

    # -- loss -------------------------------------------------------------------------
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """The training precision's autocast around the loss (Trainer enters it for each
        micro-batch). Accelerate puts autocast on the model's forward only, and `trained_loss`
        runs the backbone and the output layer itself, without that forward."""
        return self.accelerator.autocast()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_sum, count = trained_loss(model, inputs)
        if model.training:
            self.tokens_seen += int(inputs["input_ids"].numel())
            self.trained_tokens_seen += int(count)
        divisor = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        loss = loss_sum / divisor
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, None) if return_outputs else loss

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataloader = self.get_eval_dataloader(self.even_for_processes(
            eval_dataset if eval_dataset is not None else self.eval_dataset))
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.args.device)
        count = torch.zeros((), dtype=torch.long, device=self.args.device)
        started = time.perf_counter()
        with torch.no_grad(), self.autocast_smart_context_manager():
            for batch in dataloader:
                loss_sum, n = trained_loss(model, self._prepare_inputs(batch))
                total += loss_sum.double()
                count += n
        total = self.accelerator.reduce(total, "sum")
        count = self.accelerator.reduce(count, "sum")
        mean = (total / count.clamp(min=1)).item()
        metrics = {f"{metric_key_prefix}_loss": mean,
                   f"{metric_key_prefix}_perplexity": math.exp(min(mean, 50.0)),
                   f"{metric_key_prefix}_tokens": int(count),
                   f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 3)}
        if was_training:
            model.train()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def even_for_processes(self, dataset):
        """The validation set with rows that train nothing appended, so that every process gets the
        same number of full batches: Accelerate would otherwise repeat real rows to even them out,
        and those would count twice in the token-weighted loss."""
        unit = self.accelerator.num_processes * self.args.per_device_eval_batch_size
        missing = -len(dataset) % unit
        if self.accelerator.num_processes == 1 or missing == 0:
            return dataset
        import datasets

        filler = dataset.select([0] * missing).to_dict()
        filler["labels"] = [[IGNORE_INDEX] * len(labels) for labels in filler["labels"]]
        return datasets.concatenate_datasets([dataset, datasets.Dataset.from_dict(filler, features=dataset.features)])

    # -- logging ----------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # every process logs at the same step: the sum over them is a collective
            now, (tokens, trained) = time.perf_counter(), self.tokens_across_processes()
            then, tokens_before, trained_before = self._last_log
            seconds = max(now - then, 1e-9)
            logs["tokens_per_s"] = round((tokens - tokens_before) / seconds, 1)
            logs["trained_tokens_per_s"] = round((trained - trained_before) / seconds, 1)
            logs["skipped_steps"] = self.bad_steps
            self._last_log = (now, tokens, trained)
        super().log(logs, start_time)

    def most_across_processes(self, value: int) -> int:
        """The largest of one number from each process (the number itself in a single process,
        with no collective and no device round trip)."""
        if self.accelerator.num_processes == 1:
            return value
        return int(self.accelerator.gather(torch.tensor([value], device=self.args.device)).max())

    def tokens_across_processes(self) -> tuple[int, int]:
        """Tokens and trained tokens of all processes together (each counts its own batches)."""
        counts = torch.tensor([self.tokens_seen, self.trained_tokens_seen], device=self.args.device)
        counts = self.accelerator.reduce(counts, "sum")
        return int(counts[0]), int(counts[1])

    # -- checkpoints ------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        root = Path(self.args.output_dir)
        staging_root = root / STAGING
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        # In a multi-process run every process writes into this one staging directory (the main
        # one the model and optimizer, each its own RNG state); so only the main process clears
        # it before and publishes it after, and only once all have finished writing.
        if self.args.should_save:
            shutil.rmtree(staging_root / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        except OSError as err:
            shutil.rmtree(staging_root / name, ignore_errors=True)
            raise OSError(f"could not write checkpoint {name} under {root} ({err.strerror or err}); the previous"
                          " checkpoints are untouched") from err
        finally:
            self.args.output_dir = str(root)
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging_root / name, final)  # atomic: a checkpoint is complete or absent
        with contextlib.suppress(OSError):
            staging_root.rmdir()
        self._keep_best_and_newest(root)

    def _keep_best_and_newest(self, root: Path) -> None:
        steps = sorted(step for step in (checkpoint_step(p) for p in root.iterdir()) if step is not None)
        if not steps:
            return
        scores = self.scores()
        ranked = sorted((s for s in steps if s in scores), key=scores.__getitem__, reverse=self.greater_is_better)
        keep = set(ranked[: self.keep_best]) | {steps[-1]}
        for step in steps:
            if step not in keep:
                shutil.rmtree(root / f"{CHECKPOINT_PREFIX}{step}", ignore_errors=True)

    def scores(self) -> dict[int, float]:
        """The ranking metric at each evaluated step, from the log history: unlike anything
        held only here, it comes back with the state of the checkpoint a run resumes from."""
        return {entry["step"]: entry[self.best_metric] for entry in self.state.log_history if self.best_metric in entry}

    # -- signals ----------------------------------------------------------------------
    def stopping_on_signals(self):
        """Within the block, SIGTERM/SIGINT ask for a save-and-stop at the end of the step."""
        return stop_on_signals(self)


@contextlib.contextmanager
def stop_on_signals(owner) -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT set `owner.stop_requested` to the signal's name, for the
    owner to save and stop at the end of its step (a second one stops at once); after it, the
    handlers the caller had are back."""

    def request_stop(signum, frame):
        if owner.stop_requested:
            raise KeyboardInterrupt
        owner.stop_requested = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler installed from C, which Python cannot put back; the default is closest.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def checkpoint_step(path: Path) -> int | None:
    if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        return int(suffix) if suffix.isdigit() else None
    return None


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (staging leftovers from a killed save are ignored)."""
    if not root.exists():
        return None
    steps = [s for s in (checkpoint_step(p) for p in root.iterdir()) if s is not None]
    return root / f"{CHECKPOINT_PREFIX}{max(steps)}" if steps else None


class _GuardCallback(TrainerCallback):
    """Skips updates with non-finite gradients and turns a stop request into save-and-stop."""

    def __init__(self, trainer: DialogTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p for p in self.trainer.model.parameters() if p.grad is not None]
        # One check for all gradients (one device round trip, not one per parameter). Sharded
        # gradients (FSDP) are checked by their holders: all processes skip or none does.
        local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        bad_here = bool(local) and not bool(torch.stack([torch.isfinite(g).all() for g in local]).all())
        if not self.trainer.most_across_processes(int(bad_here)):
            self.trainer.bad_in_a_row = 0
            return
        for p in params:  # optimizers skip parameters without a gradient: the step is a no-op
            p.grad = None
        self.trainer.bad_steps += 1
        self.trainer.bad_in_a_row += 1
        if self.trainer.bad_in_a_row >= self.trainer.max_bad_steps:
            self.trainer.stopped_for_bad_steps = True
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        # A signal may reach some processes only, or reach them at different steps: they all stop
        # at the first step end where any has it, or the others would wait in the next step's
        # gradient exchange while it waits in the checkpoint's.
        asked = signal.Signals[self.trainer.stop_requested].value if self.trainer.stop_requested else 0
        number = self.trainer.most_across_processes(asked)
        if number:
            self.trainer.stopped_by = signal.Signals(number).name
            control.should_save = True
            control.should_training_stop = True


class EvaluateAtStart(TrainerCallback):
    """The validation metrics before the first step, taken when training begins: by then the
    engine has placed the model (and, under FSDP or DeepSpeed, sharded it); before `train` it is
    still whole, on the CPU."""

    def __init__(self, trainer: DialogTrainer):
        self.trainer = trainer
        self.metrics: dict[str, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.metrics = self.trainer.evaluate()
