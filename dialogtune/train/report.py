"""What a run leaves for people: metrics.jsonl (every log line) and loss.png (train and
validation loss against step, redrawn at each evaluation and at the end)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from dialogtune.files import staged_file


class MetricsWriter(TrainerCallback):
    def __init__(self, run_dir: Path):
        self.metrics_path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "loss.png"

    # Every process of a multi-process run calls these; the main one writes.
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero:
            plot_losses(self.metrics_path, self.plot_path)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(self.metrics_path, self.plot_path)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(metrics_path: Path, plot_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not valid:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid), label="validation loss", color="#d62728", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(metrics_path.parent.name)
    fig.tight_layout()
    with staged_file(plot_path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
