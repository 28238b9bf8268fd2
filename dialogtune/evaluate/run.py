"""`dialogtune eval`: evaluate a run (or any chat model) on held-out data by what it generates.

    dialogtune eval runs/samsum --data samsum_test.jsonl --task summarize
    dialogtune eval runs/sgd_respond --data examples/sgd_respond.yaml --limit 200
    dialogtune eval --compare smollm2-135m-instruct runs/samsum --data samsum_test.jsonl --task summarize

The data is prepared exactly as for training (same tokenizer and template as the model), then
every example's context up to its trained turn is a prompt and that turn the reference.
Generation is greedy unless sampling flags say otherwise, batched, streamed to
predictions.jsonl as it goes, and resumable: a rerun skips the samples already done.
Writes report.json (every metric, the model, a data fingerprint, the decoding settings, the
sample count), report.md (a table and the 10 best and 10 worst samples) and predictions.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from dialogtune.config import build_config, load_yaml
from dialogtune.errors import DataError
from dialogtune.evaluate import metrics
from dialogtune.generate import generate_replies, prompts_from_prepared
from dialogtune.infer import ChatModel, Sampling, load_chat_model
from dialogtune.prepare import prepare
from dialogtune.records import PreparedInfo

MAIN_METRICS = {"summarize": ["rouge1", "rouge2", "rougeL"], "respond": ["bleu", "rougeL", "distinct2"]}


def prepare_for(chat: ChatModel, data: str | dict, task: str, split_name: str, out: Path) -> tuple[Path, str]:
    """Prepare the evaluation data with the model's own tokenizer and training template.
    `data` is a job YAML, a data file, or (from `train`) a job config as a dict."""
    info = chat.info
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
    if task == "respond":
        raw["task"].setdefault("as", [s for s in chat.speakers_as if s] or ["assistant"])
    elif info and info.instruction:
        raw["task"]["instruction"] = info.instruction
    raw.update(model={"name": chat.location}, output=str(out / "prepared"), pack=False,
               template={"name": "model", "end_of_turn": chat.end_of_turn},
               max_length=info.max_length if info else raw.get("max_length", 1024))
    config = build_config({k: v for k, v in raw.items()}, str(source))
    return prepare(config, quiet=True).directory, split_name


def trained_token_loss(chat: ChatModel, split_dir: Path, limit: int | None) -> tuple[float, int, dict]:
    """Summed loss and count over the split's trained tokens, overall and per session (for
    multi-session data: each trained turn's tokens count towards its session)."""
    import datasets

    from dialogtune.collate import CausalCollator
    from dialogtune.loss import token_losses

    rows = datasets.load_from_disk(str(split_dir))
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    collate = CausalCollator(chat.tokenizer.pad_token_id or chat.tokenizer.eos_token_id or 0)
    total, count = 0.0, 0
    sessions: dict[int, list[float]] = {}
    with torch.no_grad():
        for begin in range(0, len(rows), 8):
            records = list(rows.select(range(begin, min(begin + 8, len(rows)))))
            batch = {k: v.to(chat.model.device) for k, v in collate(records).items()}
            losses, keep = token_losses(chat.model, batch)
            total, count = total + float(losses.sum()), count + int(keep.sum())
            per_row = losses.split(keep.sum(dim=1).tolist())
            for record, row_keep, row_losses in zip(records, keep, per_row, strict=True):
                # Runs of consecutive trained positions are the trained turns, in order.
                starts = (row_keep.int().diff(prepend=torch.zeros(1, dtype=torch.int32, device=row_keep.device)) == 1)
                turn_of_token = starts.cumsum(0)[row_keep] - 1
                turn_sessions = record.get("turn_sessions") or []
                if len(turn_sessions) != int(starts.sum()):
                    continue  # turns that touch (no untrained token between): no per-session split
                for turn, session in enumerate(turn_sessions):
                    if session >= 0:
                        mine = row_losses[turn_of_token == turn]
                        entry = sessions.setdefault(session, [0.0, 0])
                        entry[0] += float(mine.sum())
                        entry[1] += int(mine.numel())
    return total, count, sessions


def task_of(data: str | dict) -> str | None:
    """The task a job config names, if the data is one."""
    if isinstance(data, str):
        if Path(data).suffix not in (".yaml", ".yml"):
            return None
        data = load_yaml(Path(data))
    task = data.get("task")
    return task.get("name") if isinstance(task, dict) else None


def sample_key(index: int, prompt: list[int], reference: str) -> str:
    """What a finished prediction is valid for: this sample, at this place, with this prompt."""
    return hashlib.sha1(json.dumps([index, prompt, reference]).encode()).hexdigest()[:16]


def evaluate(model: str, data: str | dict, task: str | None = None, split: str = "validation", limit: int | None = None,
             out: Path | None = None, sampling: Sampling | None = None, batch_size: int = 8,
             quiet: bool = False) -> dict[str, Any]:
    chat = load_chat_model(model)
    task = task or task_of(data) or (chat.info.task if chat.info else None) or "respond"
    if task not in MAIN_METRICS:
        raise DataError(f"--task {task!r}: evaluation covers {', '.join(MAIN_METRICS)}")
    sampling = sampling or Sampling(temperature=0, max_new_tokens=128)
    out = Path(out or Path(model.rstrip("/")) / "eval" / (Path(data).stem if isinstance(data, str) else "validation"))
    out.mkdir(parents=True, exist_ok=True)
    prepared, split = prepare_for(chat, data, task, split, out)
    if not (prepared / split).exists():
        raise DataError(f"{prepared}: no {split} split (the data has too few dialogues to hold some out?)")
    records, prompts = prompts_from_prepared(chat, prepared, split)
    if limit is not None:
        records, prompts = records[:limit], prompts[:limit]
    keys = [sample_key(i, p, r["reference"]) for i, (p, r) in enumerate(zip(prompts, records, strict=True))]
    predictions_path = out / "predictions.jsonl"
    done = {}
    if predictions_path.exists():  # resume: keep finished samples whose prompt and reference still match
        for line in predictions_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["key"]] = record
    todo = [i for i, key in enumerate(keys) if key not in done]
    started = time.perf_counter()
    with open(predictions_path, "a", encoding="utf-8") as fh:
        for begin in range(0, len(todo), batch_size * 4):  # written every few batches: an interrupted run loses little
            chunk = todo[begin : begin + batch_size * 4]
            replies = generate_replies(chat, [prompts[i] for i in chunk], sampling, batch_size, quiet=True)
            for i, (reply, stopped) in zip(chunk, replies, strict=True):
                record = {"index": i, "key": keys[i], **records[i], "prediction": reply, "stopped": stopped}
                done[keys[i]] = record
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            if not quiet:
                print(f"eval: {len(done)} of {len(keys)} samples", flush=True)
    results = [done[key] for key in keys]
    total, count, sessions = trained_token_loss(chat, prepared / split, limit)
    report = build_report(model, task, results, total, count, prepared, sampling, time.perf_counter() - started)
    if sessions:
        report["metrics_per_session"] = {str(s): {"perplexity": round(metrics.perplexity(loss, n), 4), "tokens": n}
                                         for s, (loss, n) in sorted(sessions.items())}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report, results))
    if not quiet:
        print(format_table([report]))
        print(f"report: {out / 'report.md'}")
    return report


def build_report(model, task, results, total_loss, tokens, prepared: Path, sampling: Sampling, seconds) -> dict:
    predictions = [r["prediction"] for r in results]
    references = [r["reference"] for r in results]
    stopped = [r["stopped"] for r in results]
    scores: dict[str, Any] = {"perplexity": round(metrics.perplexity(total_loss, tokens), 4),
                              "loss": round(total_loss / tokens, 6) if tokens else None}
    if task == "summarize":
        scores.update(metrics.rouge(predictions, references))
        scores.update(avg_words=round(sum(len(p.split()) for p in predictions) / max(len(predictions), 1), 2),
                      stopped_share=round(sum(stopped) / max(len(stopped), 1), 4))
    else:
        scores.update(metrics.reply_metrics(predictions, references, stopped))
    manifest = PreparedInfo.load(prepared)
    return {"model": model, "task": task, "samples": len(results), "trained_tokens": tokens, "metrics": scores,
            "data_fingerprint": manifest.fingerprint, "data": manifest.config["data"]["path"],
            "decoding": {"greedy": sampling.temperature <= 0, **vars(sampling)},
            "timing": {"seconds": round(seconds, 1)}}


def report_markdown(report: dict, results: list[dict]) -> str:
    ranked = sorted(results, key=lambda r: metrics.rouge_l(r["prediction"], r["reference"]))

    def block(title: str, items: list[dict]) -> str:
        parts = [f"## {title}\n"]
        for r in items:
            context = r["context"][-400:].replace("\n", " ⏎ ")
            parts.append(f"**sample {r['index']}** (ROUGE-L {metrics.rouge_l(r['prediction'], r['reference']):.1f})\n\n"
                         f"- context: …{context}\n- reference: {r['reference']}\n- prediction: {r['prediction']}\n")
        return "\n".join(parts)

    return (f"# Evaluation of {report['model']} ({report['task']})\n\n{report['samples']} samples, data"
            f" fingerprint {report['data_fingerprint']}, greedy: {report['decoding']['greedy']}\n\n"
            + format_table([report]) + "\n\n" + block("10 best", ranked[::-1][:10]) + "\n" + block("10 worst", ranked[:10]))


def format_table(reports: list[dict]) -> str:
    names = list(dict.fromkeys(k for r in reports for k, v in r["metrics"].items() if v is not None))
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in reports:
        values = [r["metrics"].get(n) for n in names]
        lines.append(f"| {r['model']} | " + " | ".join("" if v is None else f"{v:g}" for v in values) + " |")
    return "\n".join(lines)


def compare(models: list[str], data: str, task: str | None, out: Path, **kwargs) -> list[dict]:
    reports = [evaluate(m, data, task, out=out / Path(m.rstrip("/")).name, quiet=True, **kwargs) for m in models]
    print(format_table(reports))
    plot_comparison(reports, out / "compare.png")
    print(f"chart: {out / 'compare.png'}")
    return reports


def plot_comparison(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = MAIN_METRICS[reports[0]["task"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.8 / len(reports)
    for i, report in enumerate(reports):
        values = [report["metrics"].get(n) or 0 for n in names]
        bars = ax.bar([j + i * width for j in range(len(names))], values, width, label=report["model"])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.set_title(f"{reports[0]['task']}: {reports[0]['samples']} samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
