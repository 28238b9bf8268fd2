"""What `dialogtune train` does once training has returned: a few sample replies from the saved
run, the evaluation report when `eval.report` asks for one, both added to summary.json, and the
summary printed for people.

This is the command layer, not training: it loads the run the way chat and generate do
(`load_chat_model`) and uses inference and evaluation, which dialogtune.train never imports.
"""

from __future__ import annotations

import gc
from pathlib import Path

from dialogtune.config import TrainJobConfig
from dialogtune.files import write_json

SAMPLE_NEW_TOKENS = 48  # enough to judge a reply at a glance
CONTEXT_CHARS = 300  # a sample's context is cut to this for the terminal (a summarised dialogue is long)


def finish_run(config: TrainJobConfig, summary: dict, *, quiet: bool = False) -> dict:
    """Add samples (and the eval report) to a finished run's summary and summary.json; print it."""
    if "final" not in summary:  # another process of a multi-process run: the main one saved and reports
        return summary
    gc.collect()  # the trained model is garbage now, but in reference cycles: free it before loading the run
    run, prepared = Path(summary["run_dir"]), Path(config.output)
    split = "validation" if (prepared / "validation").exists() else "train"
    instruction = config.task.instruction if config.task.name == "summarize" else None
    if config.task.name == "memory":  # validation perplexity per session is its report
        summary["samples"] = memory_samples(run, prepared, split, config.samples)
    else:
        summary["samples"] = sample_replies(run, prepared, split, config.samples, instruction,
                                            **quantization_of(config))
    if config.eval.report and split == "validation" and config.task.name != "memory":
        gc.collect()  # the samples' model, in reference cycles too: never two copies of the run in memory
        summary["eval_report"] = eval_report(config, run)
    write_json(run / "summary.json", summary)
    if not quiet:
        print(summary_text(summary))
    return summary


def quantization_of(config: TrainJobConfig) -> dict[str, bool]:
    """load_chat_model's arguments that load the run's base as training did: a QLoRA base in its
    4 or 8 bits (on the GPU, not full-precision in host memory); other bases as they are."""
    if config.method != "qlora":
        return {}
    return {"load_in_4bit": True} if config.quantization_bits == 4 else {"load_in_8bit": True}


def sample_replies(run: Path, prepared: Path, split: str, count: int, instruction: str | None, *,
                   load_in_4bit: bool = False, load_in_8bit: bool = False) -> list[dict[str, str]]:
    """Greedy replies to the first `count` trained turns of a split, through the same path as
    `dialogtune generate` (the run's template, roles and stop strings), each with the message
    it answers as its context."""
    if count == 0:
        return []
    import datasets

    from dialogtune.generate import generate_replies, prompts_from_prepared
    from dialogtune.infer import Sampling, load_chat_model

    chat = load_chat_model(str(run), load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    records, prompts = prompts_from_prepared(chat, prepared, split)
    replies = generate_replies(chat, prompts[:count], Sampling(temperature=0, max_new_tokens=SAMPLE_NEW_TOKENS),
                               quiet=True)
    rows = datasets.load_from_disk(str(prepared / split))
    answered = [text for row in rows["answered_messages"] for text in row]
    if len(answered) != len(records):
        # Trained turns with no untrained token between them read back as one sample, and
        # the pairing of samples with messages is lost: show no context rather than a wrong one.
        answered = [""] * len(records)
    return [{"context": shorten(context_of(text, instruction)), "reply": reply, "reference": record["reference"]}
            for record, (reply, _), text in zip(records, replies, answered, strict=False)]


def memory_samples(run: Path, prepared: Path, split: str, count: int) -> list[dict[str, str]]:
    """Greedy replies of a memory run to the last trained turn of the first `count` dialogues of a
    split, after reading every turn before it (all sessions) as chat would."""
    if count == 0:
        return []
    import datasets

    from dialogtune.memory.conversation import MemoryConversation, load_memory_run

    loaded = load_memory_run(run)
    rows = datasets.load_from_disk(str(prepared / split))
    decode = loaded.tokenizer.decode
    samples = []
    for row in rows.select(range(min(count, len(rows)))):
        last = max(i for i, trained in enumerate(row["trained"]) if trained)
        conversation = MemoryConversation(loaded)
        sessions = row["sessions"]
        for turn in range(last):
            conversation.read_tokens(row["prefix_ids"][turn], row["text_ids"][turn],
                                     opens_session=turn > 0 and sessions[turn] != sessions[turn - 1])
        reply = conversation.reply_after(row["prefix_ids"][last], do_sample=False, max_new_tokens=SAMPLE_NEW_TOKENS,
                                         opens_session=last > 0 and sessions[last] != sessions[last - 1])
        context = decode(row["prefix_ids"][last - 1] + row["text_ids"][last - 1]) if last else ""
        samples.append({"context": shorten(context), "reply": reply, "reference": decode(row["text_ids"][last]).strip()})
    return samples


def context_of(answered: str, instruction: str | None) -> str:
    """What a person needs to judge the reply: the message answered, less the summarize task's
    instruction (its user message is the instruction, a newline, then the dialogue)."""
    return answered.removeprefix(f"{instruction}\n") if instruction else answered


def shorten(text: str, limit: int = CONTEXT_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def eval_report(config: TrainJobConfig, run: Path) -> dict:
    from dialogtune.evaluate.run import evaluate

    report = evaluate(str(run), config.model_dump(mode="json", by_alias=True), limit=config.eval.limit,
                      out=run / "eval", quiet=True, **quantization_of(config))
    return {"path": str(run / "eval" / "report.md"), "metrics": report["metrics"]}


def summary_text(summary: dict) -> str:
    before, after, last = summary["eval_loss_before"], summary["eval_loss_after"], summary["train_loss_last"]
    change = f"validation loss {before:.4f} -> {after:.4f}; " if before is not None and after is not None else ""
    last_loss = f"{last:.4f}" if last is not None else "not logged"
    lines = [
        (f"trained {summary['steps']} steps in {summary['train_seconds']:.0f}s ({summary['tokens_per_s']:.0f}"
         f" tokens/s, {summary['trained_tokens_per_s']:.0f} trained tokens/s, peak memory"
         f" {summary['peak_memory_mb']:.0f} MB); {change}last train loss {last_loss};"
         f" skipped steps {summary['skipped_steps']}"),
        f"run: {summary['run_dir']}   model: {summary['final']}   plot: {Path(summary['run_dir']) / 'loss.png'}",
    ]
    if summary.get("eval_after"):  # memory runs: validation perplexity per session, before -> after
        sessions = sorted(k for k in summary["eval_after"] if k.startswith("eval_perplexity_session_"))
        lines.insert(1, "validation perplexity by session: " + ", ".join(
            f"{k.rsplit('_', 1)[-1]}: {summary['eval_before'].get(k, float('nan')):.2f} -> {summary['eval_after'][k]:.2f}"
            for k in sessions))
    for sample in summary["samples"]:
        context = sample["context"].replace("\n", "\n" + " " * len("  user: "))  # a dialogue's lines aligned
        lines.append(f"  user: {context}\n  model: {sample['reply']}\n  (reference: {sample['reference']})")
    return "\n".join(lines)
