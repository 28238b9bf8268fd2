"""`dialogtune eval`: evaluate a run (or any chat model) on held-out data by what it generates.

    dialogtune eval runs/samsum --data samsum_test.jsonl --task summarize
    dialogtune eval runs/sgd_respond --data examples/sgd_respond.yaml --limit 200
    dialogtune eval --compare smollm2-135m-instruct runs/samsum --data samsum_test.jsonl --task summarize

The data is prepared as for training (same tokenizer and template as the model) but whole: no
example is split or rejected for its length. Every trained turn is a sample: its context the
prompt, the turn (its text as the data has it) the reference. A context longer than the model
can read is cut from the left, keeping the whole system message, the summarize instruction and
the end; report.json counts what was cut. What a model can read: a decoder-only model holds
prompt and reply in one context, so its context length less max_new_tokens; an encoder-decoder
reads the prompt with its encoder and writes the reply in the decoder's own positions, so its
whole context length.
Every model in a comparison is scored on the same samples (the same references, in the same
order), or the comparison is refused: all sample sets are prepared and compared first (that
needs each model's tokenizer and template, not its weights), then the models are scored one at
a time, each freed before the next loads.
Generation is greedy unless sampling flags say otherwise, batched, streamed to
predictions.jsonl as it goes, and resumable: a rerun skips the samples already done by the
same model with the same decoding settings and prompt.
Writes report.json (every metric, the model, a data fingerprint, the decoding settings, the
sample count, what was cut), report.md (a table and the 10 best and 10 worst samples) and
predictions.jsonl.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dialogtune.config import build_config, load_yaml
from dialogtune.errors import ConfigError, DataError
from dialogtune.evaluate import metrics
from dialogtune.evaluate.perplexity import SampleLoss, sample_losses
from dialogtune.evaluate.report import (
    MAIN_METRICS,
    build_report,
    cut_line,
    format_table,
    plot_comparison,
    report_markdown,
)
from dialogtune.evaluate.samples import ContextFit, Sample, samples_of
from dialogtune.files import write_json, write_jsonl, write_text
from dialogtune.generate import generate_replies
from dialogtune.infer import ChatModel, Prompting, Sampling, load_chat_model, load_prompting
from dialogtune.prepare import prepare
from dialogtune.readers._io import iter_jsonl
from dialogtune.records import PreparedInfo

# Evaluation prepares whole examples; fitting them into a model's context is done per model, per sample.
NO_LENGTH_LIMIT = 1 << 30


def prepare_for(prompting: Prompting, data: str | dict, task: str, split_name: str, out: Path) -> tuple[Path, str]:
    """Prepare the evaluation data with the model's own tokenizer and training template.
    `data` is a job YAML, a data file, or (from `train`) a job config as a dict."""
    info = prompting.info
    source = Path(data) if isinstance(data, str) else Path("config")
    if isinstance(data, dict):
        raw = {k: v for k, v in data.items() if k != "output"}
    elif source.suffix in (".yaml", ".yml"):
        raw = load_yaml(source)
        raw.pop("output", None)
    elif source.exists():
        raw = {"data": {"path": [str(source)]}, "split": {"validation": 0}}
        split_name = "train"  # a plain file is all evaluation data
    else:
        raise DataError(f"{data}: no such file (give a YAML job config or a data file)")
    raw["task"] = {**raw.get("task", {}), "name": task}
    if info and info.system_prompt:  # prompted as chat and generate prompt the run
        raw["task"].setdefault("system_prompt", info.system_prompt)
    if task == "respond":
        raw["task"].setdefault("as", [s for s in prompting.speakers_as if s] or ["assistant"])
    elif info and info.instruction:
        raw["task"]["instruction"] = info.instruction
    raw.update(model={"name": prompting.location}, output=str(out / "prepared"), pack=False,
               template={"name": "model", "end_of_turn": prompting.end_of_turn}, max_length=NO_LENGTH_LIMIT)
    config = build_config(raw, str(source))
    return prepare(config, quiet=True).directory, split_name


def task_of(data: str | dict) -> str | None:
    """The task a job config names, if the data is one."""
    if isinstance(data, str):
        if Path(data).suffix not in (".yaml", ".yml"):
            return None
        data = load_yaml(Path(data))
    task = data.get("task")
    return task.get("name") if isinstance(task, dict) else None


def prediction_key(chat: ChatModel, sampling: Sampling, index: int, prompt: list[int], reference: str) -> str:
    """What a finished prediction is valid for: this model and decoding, this sample at this
    place, with this prompt."""
    identity = [chat.location, vars(sampling), index, prompt, reference]
    return hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:16]


@dataclass
class Evaluation:
    """One model and the samples it is to be scored on: all of it but the model's weights."""

    model: str
    prompting: Prompting
    task: str
    prepared: Path
    samples: list[Sample]
    fit: ContextFit
    out: Path


def prepare_evaluation(model: str, data: str | dict, task: str | None, split: str, limit: int | None,
                       out: Path | None) -> Evaluation:
    """The model's samples, prepared with its tokenizer and template (its weights are not loaded)."""
    import datasets

    if limit is not None and limit <= 0:
        raise DataError(f"nothing to evaluate: --limit {limit} (eval.limit in a job config) selects no samples")
    prompting = load_prompting(model)
    info = prompting.info
    task = task or task_of(data) or (info.task if info else None) or "respond"
    if task not in MAIN_METRICS:
        raise DataError(f"--task {task!r}: evaluation covers {', '.join(MAIN_METRICS)}")
    out = Path(out or Path(model.rstrip("/")) / "eval" / (Path(data).stem if isinstance(data, str) else "validation"))
    out.mkdir(parents=True, exist_ok=True)
    prepared, split = prepare_for(prompting, data, task, split, out)
    if not (prepared / split).exists():
        raise DataError(f"{prepared}: no {split} split (the data has too few dialogues to hold some out?)")
    rows = datasets.load_from_disk(str(prepared / split))
    samples = samples_of(rows, prompting.tokenizer, prompting.end_of_turn, limit)
    require_samples(samples, prepared, split, len(rows))
    task_config = PreparedInfo.load(prepared).config["task"]
    fit = ContextFit(prompting.tokenizer, task_config.get("system_prompt"),
                     task_config["instruction"] if task == "summarize" else None)
    return Evaluation(model, prompting, task, prepared, samples, fit, out)


def require_samples(samples: list[Sample], prepared: Path, split: str, examples: int) -> None:
    """Scoring nothing is no result: say so rather than report a perplexity of nan."""
    if not samples:
        raise DataError(f"nothing to evaluate: the {split} split of {prepared} has no trained turns"
                        f" ({examples} examples); check the task and `as` (--as)")


def prompt_limit(chat: ChatModel | Prompting, sampling: Sampling) -> int:
    """The longest prompt the model can read: an encoder reads the prompt alone (and the decoder
    writes the reply in positions of its own); a decoder-only model must also hold the reply."""
    if chat.is_encoder_decoder:
        if sampling.max_new_tokens > chat.context_length:
            raise ConfigError(f"--max-new-tokens {sampling.max_new_tokens} is more than {chat.name} can write: its"
                              f" decoder has {chat.context_length} positions")
        return chat.context_length
    if sampling.max_new_tokens >= chat.context_length:
        raise ConfigError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt: {chat.name}"
                          f" reads at most {chat.context_length} tokens")
    return chat.context_length - sampling.max_new_tokens


def evaluate(model: str, data: str | dict, task: str | None = None, split: str = "validation", limit: int | None = None,
             out: Path | None = None, sampling: Sampling | None = None, batch_size: int = 8,
             quiet: bool = False, load_in_4bit: bool = False, load_in_8bit: bool = False) -> dict[str, Any]:
    sampling = sampling or Sampling(temperature=0, max_new_tokens=128)
    evaluation = prepare_evaluation(model, data, task, split, limit, out)
    prompt_limit(evaluation.prompting, sampling)  # refused before the weights load
    report = score(evaluation, sampling, batch_size, quiet, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    if not quiet:
        print(format_table([report]))
        print(f"report: {evaluation.out / 'report.md'}")
    return report


def score(evaluation: Evaluation, sampling: Sampling, batch_size: int, quiet: bool, *, load_in_4bit: bool = False,
          load_in_8bit: bool = False) -> dict[str, Any]:
    """Load the model, generate for every sample (resuming), score the references' loss, write the
    reports. The model is referenced from nowhere once this returns."""
    chat = load_chat_model(evaluation.prompting, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    samples = evaluation.samples
    limit = prompt_limit(chat, sampling)
    fitted = [evaluation.fit(s.context_ids, limit, s.system) for s in samples]
    prompts = [ids for ids, _ in fitted]
    started = time.perf_counter()
    results = generate_all(evaluation, chat, prompts, sampling, batch_size, quiet)
    losses = sample_losses(chat, samples, evaluation.fit, batch_size)
    prompt_cuts = [len(s.context_ids) - len(p) for s, p in zip(samples, prompts, strict=True)]
    cut = {"context_length": chat.context_length, "prompt_limit": limit,
           "samples": sum(n > 0 for n in prompt_cuts), "tokens": sum(prompt_cuts),
           "heads_dropped": sum(dropped for _, dropped in fitted),
           "loss_samples": sum(s.cut > 0 for s in losses), "loss_tokens": sum(s.cut for s in losses),
           "loss_heads_dropped": sum(s.head_dropped for s in losses)}
    report = build_report(evaluation.model, evaluation.task, results, sum(s.loss for s in losses),
                          sum(s.tokens for s in losses), evaluation.prepared, sampling, cut,
                          time.perf_counter() - started)
    sessions = per_session(samples, losses)
    if sessions:
        report["metrics_per_session"] = sessions
    write_json(evaluation.out / "report.json", report)
    write_text(evaluation.out / "report.md", report_markdown(report, results))
    if not quiet and cut_line(report):
        print(cut_line(report))
    return report


def generate_all(evaluation: Evaluation, chat: ChatModel, prompts: list[list[int]], sampling: Sampling,
                 batch_size: int, quiet: bool) -> list[dict]:
    """Every sample's prediction: those in predictions.jsonl whose prompt and reference still
    match are kept, the rest generated (shortest prompts first, so a batch wastes little on
    padding) and appended batch by batch, so an interrupted run loses at most one batch."""
    samples = evaluation.samples
    keys = [prediction_key(chat, sampling, s.index, p, s.reference) for s, p in zip(samples, prompts, strict=True)]
    path = evaluation.out / "predictions.jsonl"
    done = {}
    if path.exists():
        # A run killed in the middle of a write leaves a torn last line: it is redone, and the
        # file is rewritten without it so that what follows is appended to whole lines only.
        done = {record["key"]: record for _, record, error in iter_jsonl(path) if error is None}
        write_jsonl(path, done.values())
    todo = sorted((i for i, key in enumerate(keys) if key not in done), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc=evaluation.model, unit=" samples",
               disable=quiet or None, dynamic_ncols=True)
    with open(path, "a", encoding="utf-8") as fh:
        for begin in range(0, len(todo), batch_size):
            batch = todo[begin : begin + batch_size]
            replies = generate_replies(chat, [prompts[i] for i in batch], sampling, batch_size, quiet=True)
            for i, (reply, stopped) in zip(batch, replies, strict=True):
                record = {"index": i, "key": keys[i], "reference": samples[i].reference,
                          "context": chat.tokenizer.decode(prompts[i], skip_special_tokens=False),
                          "context_cut": len(samples[i].context_ids) - len(prompts[i]),
                          "prediction": reply, "stopped": stopped}
                done[keys[i]] = record
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            bar.update(len(batch))
    bar.close()
    results = [done[key] for key in keys]
    write_jsonl(path, results)  # in sample order, without stale predictions for prompts that changed
    return results


def per_session(samples: list[Sample], losses: list[SampleLoss]) -> dict[str, dict]:
    """Perplexity per session, for multi-session data (each trained turn counts towards its own)."""
    sessions: dict[int, list[float]] = {}
    for sample, loss in zip(samples, losses, strict=True):
        if sample.session >= 0:
            entry = sessions.setdefault(sample.session, [0.0, 0])
            entry[0] += loss.loss
            entry[1] += loss.tokens
    return {str(s): {"perplexity": round(metrics.perplexity(total, n), 4), "tokens": n}
            for s, (total, n) in sorted(sessions.items())}


@dataclass(frozen=True)
class SampleSet:
    """What a model is scored on, as far as comparing it with another needs."""

    model: str
    task: str
    keys: list[tuple[int, str]]  # (index, reference as the data has it): the same for any tokenizer
    rejects: Path

    @classmethod
    def of(cls, evaluation: Evaluation) -> SampleSet:
        return cls(evaluation.model, evaluation.task, [s.key for s in evaluation.samples],
                   evaluation.prepared / "rejects.jsonl")

    def require_same(self, other: SampleSet) -> None:
        if other.task != self.task:
            raise ConfigError(f"--compare: {self.model} would be evaluated on {self.task} and {other.model} on"
                              f" {other.task}; name one task with --task")
        if other.keys == self.keys:
            return
        first = next(i for i, (a, b) in enumerate(zip([*self.keys, None], [*other.keys, None])) if a != b)

        def at(keys: list) -> str:
            return repr(keys[first][1][:60]) if first < len(keys) else "nothing"

        raise DataError(
            f"--compare: {self.model} has {len(self.keys)} samples and {other.model} {len(other.keys)}, and they"
            f" differ from sample {first} on (reference {at(self.keys)} vs {at(other.keys)}); models can only be"
            f" compared on the same samples (see what each preparation rejected: {self.rejects}, {other.rejects})")


def compare(models: list[str], data: str, task: str | None, out: Path, split: str = "validation",
            limit: int | None = None, sampling: Sampling | None = None, batch_size: int = 8) -> list[dict]:
    """Evaluate each model on the same samples: every sample set is prepared and compared, and
    every model's room for a prompt checked, before any model loads; then one model at a time."""
    sampling = sampling or Sampling(temperature=0, max_new_tokens=128)
    evaluations = [prepare_evaluation(model, data, task, split, limit, directory)
                   for model, directory in zip(models, output_dirs(models, out), strict=True)]
    first = SampleSet.of(evaluations[0])
    for evaluation in evaluations[1:]:
        first.require_same(SampleSet.of(evaluation))
    for evaluation in evaluations:
        prompt_limit(evaluation.prompting, sampling)
    reports = []
    for evaluation in evaluations:
        reports.append(score(evaluation, sampling, batch_size, quiet=False))
        free_memory()  # the model just scored, before the next one loads
    print(format_table(reports))
    plot_comparison(reports, out / "compare.png")
    print(f"chart: {out / 'compare.png'}")
    return reports


def free_memory() -> None:
    """Collect what is no longer referenced (a model's modules hold reference cycles, which plain
    reference counting never frees) and hand the GPU's cached blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def output_dirs(models: list[str], out: Path) -> list[Path]:
    """A directory per model, by its name, numbered where names repeat (runs/a/final, runs/b/final):
    one model must never resume from another's predictions."""
    names = [Path(model.rstrip("/")).name for model in models]
    return [out / (name if names.count(name) == 1 else f"{i + 1}-{name}") for i, name in enumerate(names)]
