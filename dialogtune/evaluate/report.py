"""What `dialogtune eval` writes and prints: report.json, report.md, the table, the comparison chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dialogtune.evaluate import metrics
from dialogtune.infer import Sampling
from dialogtune.records import PreparedInfo

MAIN_METRICS = {"summarize": ["rouge1", "rouge2", "rougeL"], "respond": ["bleu", "rougeL", "distinct2"]}


def build_report(model: str, task: str, results: list[dict], total_loss: float, tokens: int, prepared: Path,
                 sampling: Sampling, cut: dict[str, int], seconds: float) -> dict[str, Any]:
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
    return {"model": model, "task": task, "samples": len(results), "trained_tokens": tokens, "cut": cut,
            "metrics": scores, "data_fingerprint": manifest.fingerprint, "data": manifest.config["data"]["path"],
            "decoding": {"greedy": sampling.temperature <= 0, **vars(sampling)},
            "timing": {"seconds": round(seconds, 1)}}


def cut_line(report: dict) -> str | None:
    """One line on the contexts cut to fit the model, or None when nothing was cut."""
    cut = report["cut"]
    if not cut["samples"] and not cut["loss_samples"]:
        return None
    line = (f"{report['model']}: context cut from the left, keeping the system message and instruction, in"
            f" {cut['samples']} of {report['samples']} prompts ({cut['tokens']} tokens) to fit"
            f" {cut['prompt_limit']} tokens, and in {cut['loss_samples']} perplexity windows ({cut['loss_tokens']}"
            f" tokens) to fit {cut['context_length']}")
    if cut["heads_dropped"] or cut["loss_heads_dropped"]:
        line += (f"; the system message and instruction were cut too in {cut['heads_dropped']} prompts and"
                 f" {cut['loss_heads_dropped']} windows (kept, they would take more than half the room or leave"
                 " too little for the reply)")
    return line


def report_markdown(report: dict, results: list[dict]) -> str:
    ranked = sorted(results, key=lambda r: metrics.rouge_l(r["prediction"], r["reference"]))

    def block(title: str, items: list[dict]) -> str:
        parts = [f"## {title}\n"]
        for r in items:
            context = r["context"][-400:].replace("\n", " ⏎ ")
            parts.append(f"**sample {r['index']}** (ROUGE-L {metrics.rouge_l(r['prediction'], r['reference']):.1f})\n\n"
                         f"- context: …{context}\n- reference: {r['reference']}\n- prediction: {r['prediction']}\n")
        return "\n".join(parts)

    cut = cut_line(report)
    return (f"# Evaluation of {report['model']} ({report['task']})\n\n{report['samples']} samples, data"
            f" fingerprint {report['data_fingerprint']}, greedy: {report['decoding']['greedy']}\n\n"
            + (f"{cut}\n\n" if cut else "")
            + format_table([report]) + "\n\n" + block("10 best", ranked[::-1][:10]) + "\n" + block("10 worst", ranked[:10]))


def format_table(reports: list[dict]) -> str:
    names = list(dict.fromkeys(k for r in reports for k, v in r["metrics"].items() if v is not None))
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in reports:
        values = [r["metrics"].get(n) for n in names]
        lines.append(f"| {r['model']} | " + " | ".join("" if v is None else f"{v:g}" for v in values) + " |")
    return "\n".join(lines)


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
    ax.set_title(f"{reports[0]['task']}: {reports[0]['samples']} samples")  # the same samples for every model
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
