"""What a memory is worth on Multi-Session Chat: perplexity of replies per session, and the cost of
a turn as the conversation grows.

    python benchmarks/memory_msc.py --steps 60 --out runs/bench_memory

On ../shared/data/msc/msc_session3_valid.jsonl (500 episodes, three sessions each; split by
episode), SmolLM2-135M-Instruct with LoRA, the same recurrent training (streams, windows, steps,
seed) for:
  (a) memory: 16 slots + the last `--window` tokens of history,
  (b) the same model without memory, same window,
  (c) the full history up to 1,024 tokens: (b)'s weights reading a 1,024-token window (and the base
      model likewise, untrained),
  (d) summary memory: (b)'s weights reading a summary of the earlier sessions (written by
      SmolLM2-Instruct with the summarize task's prompt, as `chat --memory` does for plain models)
      and the same short window, on the last session's replies,
and token-weighted perplexity per session (session 3 is the one whose earlier sessions are out of
a short window). Then the time and tokens of one turn at turns 1, 10 and 40 of a conversation for
(a) and (c). Writes benchmarks/results/memory_msc.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from dialogtune.config import MemoryConfig, TrainJobConfig, build_config
from dialogtune.memory.causal import CausalMemoryModel
from dialogtune.memory.inputs import TurnInputs
from dialogtune.train.recurrent import RecurrentTrainer, Schedule
from dialogtune.train.run import train

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msc" / "msc_session3_valid.jsonl"


def job(out: Path, name: str, slots: int, window: int, args) -> TrainJobConfig:
    return build_config({
        "data": {"path": str(args.data)}, "task": {"name": "memory"},
        "split": {"validation": args.validation_share, "seed": 0}, "max_length": 256,
        "output": str(out / "prepared"), "method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "memory": {"slots": slots, "window": window, "time_horizon": args.horizon},
        "train": {"max_steps": args.steps, "learning_rate": args.learning_rate, "per_device_train_batch_size":
                  args.streams, "per_device_eval_batch_size": 8, "logging_steps": 1, "warmup_steps": 0.1,
                  "lr_scheduler_type": "cosine", "report_to": []},
        "eval": {"every": None}, "run_dir": str(out / name), "samples": 0,
    }, schema=TrainJobConfig)


def evaluator(model, validation: list[dict], window: int, pad: int) -> RecurrentTrainer:
    """A trainer used only to evaluate: the same streaming validation as training's."""
    schedule = Schedule(streams=1, eval_streams=8, max_steps=0, epochs=1, seed=0, logging_steps=1,
                        save_every=None, max_grad_norm=0.0)
    return RecurrentTrainer(model, None, None, [], validation, TurnInputs(window, False, pad),
                            MemoryConfig(slots=0, window=window), schedule, Path("."))


def load_plain(final: Path | None):
    """(b)'s trained model without memory, or the base model (final None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dialogtune.models import quiet_peft, resolve

    base = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct"), dtype=torch.float32)
    if final is not None:
        with quiet_peft():
            base = PeftModel.from_pretrained(base, str(final))
    return CausalMemoryModel(base.eval(), slots=0)


@torch.no_grad()
def turn_costs(model, dialogue: dict, inputs: TurnInputs, turns: list[int]) -> dict[int, dict[str, float]]:
    """Tokens read and seconds (median of 3) of the step at each turn of `dialogue`, memory carried."""
    out: dict[int, dict[str, float]] = {}
    memory = None
    for turn in range(max(turns) + 1):
        batch = inputs.batch([inputs.row(dialogue, turn)], "cpu")
        times = []
        for _ in range(3 if turn in turns else 1):
            started = time.perf_counter()
            step = model.step(batch["input_ids"], batch["attention_mask"], batch["labels"], memory)
            times.append(time.perf_counter() - started)
        memory = step.memory
        if turn in turns:
            tokens = int(batch["attention_mask"].sum()) + 2 * model.memory_slots
            out[turn] = {"tokens": tokens, "ms": round(1000 * sorted(times)[1], 1)}
    return out


SUMMARY_LEAD = "[earlier sessions, summarised]"


@torch.no_grad()
def summary_variant(model, validation: list[dict], data: Path, window: int, pad: int) -> tuple[dict, dict]:
    """(d): each validation episode's sessions before the last summarised by SmolLM2-Instruct with
    the summarize task's prompt (dialogtune.memory.summary, as chat does for plain models), then the
    last session's replies scored by `model` reading that summary and the last `window` tokens.
    Returns (perplexity per session: the last only, the summaries)."""
    from dialogtune.dialogue import Dialogue
    from dialogtune.infer import load_chat_model
    from dialogtune.memory.summary import load_summarizer
    from dialogtune.readers import read_dialogues
    from dialogtune.tasks.summarize import summary_request

    dialogues = {d.id: d for d in read_dialogues(data, "auto") if isinstance(d, Dialogue)}
    summarizer = load_summarizer(None, load_chat_model("smollm2-135m-instruct"))
    tokenizer = summarizer.chat.tokenizer
    inputs = TurnInputs(window, False, pad)
    total, count, summaries = 0.0, 0, {}
    for row in validation:
        last = max(row["sessions"])
        dialogue = dialogues[row["dialogue_id"]]
        earlier = Dialogue(dialogue.id, [t for t in dialogue.turns if (t.session or 1) < last])
        summary = summarizer(summary_request(earlier, summarizer.instruction)).strip()
        summaries[dialogue.id] = summary
        lead = tokenizer(f"{SUMMARY_LEAD} {summary}\n", add_special_tokens=False).input_ids
        for turn, session in enumerate(row["sessions"]):
            if session != last or not row["trained"][turn]:
                continue
            ids, labels = inputs.row(row, turn)
            batch = inputs.batch([(lead + ids, [-100] * len(lead) + labels)], "cpu")
            out = model.step(batch["input_ids"], batch["attention_mask"], batch["labels"], None)
            total, count = total + float(out.loss_sum), count + int(out.count)
    return {str(last): round(math.exp(total / count), 4)}, summaries


def long_conversation(rows: list[dict], turns: int) -> dict:
    """Validation dialogues joined end to end until `turns` turns: one long conversation."""
    joined = {"prefix_ids": [], "text_ids": [], "sessions": [], "trained": []}
    for row in rows:
        for key, values in joined.items():
            values.extend(row[key])
        if len(joined["trained"]) >= turns:
            break
    return joined


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    for name, color in (("a_memory", "#d62728"), ("b_no_memory", "#1f77b4")):
        losses = results["train_curves"].get(name, [])
        if losses:
            left.plot(range(1, len(losses) + 1), losses, label=name, color=color, linewidth=1)
    left.set_xlabel("optimizer step (window)")
    left.set_ylabel("train loss (window)")
    left.grid(alpha=0.3)
    left.legend()
    names = list(results["perplexity"])
    sessions = sorted({s for v in results["perplexity"].values() for s in v})
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [results["perplexity"][name].get(s, float("nan")) for s in sessions]
        right.bar([x + i * width for x in range(len(sessions))], values, width, label=name)
    right.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(sessions))],
                     [f"session {s}" for s in sessions])
    right.set_ylabel("perplexity of replies (token-weighted)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def session_table(report: dict) -> dict[str, float]:
    return {key.rsplit("_", 1)[-1]: value for key, value in report.items() if key.startswith("eval_perplexity_session")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_memory"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=4)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--validation-share", type=float, default=0.02, help="0.02 of 500 episodes = 10")
    parser.add_argument("--full-window", type=int, default=1024)
    parser.add_argument("--name", default="memory_msc")
    parser.add_argument("--reuse", action="store_true", help="keep runs already trained in --out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "perplexity": {}, "eval_loss": {},
                     "train_curves": {}, "seconds": {}}
    earlier = RESULTS / f"{args.name}.json"

    def save() -> None:  # after every stage: a later failure keeps what was measured (--reuse picks it up)
        RESULTS.mkdir(exist_ok=True)
        earlier.write_text(json.dumps(results, indent=1) + "\n")
    # With --reuse, what an earlier call measured is kept and only what it lacks is measured.
    before = json.loads(earlier.read_text()) if args.reuse and earlier.exists() else {"perplexity": {}}
    for name, slots in (("a_memory", 16), ("b_no_memory", 0)):
        started = time.perf_counter()
        done = args.out / name / "summary.json"
        if args.reuse and done.exists():  # trained by an earlier call: its figures as they were
            summary = json.loads(done.read_text())
            results["seconds"][name] = summary["seconds"]
        else:
            summary = train(job(args.out, name, slots, args.window, args), overwrite=True)
            results["seconds"][name] = round(time.perf_counter() - started, 1)
        results["perplexity"][f"{name} step 0"] = session_table(summary["eval_before"])
        results["perplexity"][name] = session_table(summary["eval_after"])
        results["eval_loss"][name] = summary["eval_after"]["eval_loss"]
        metrics = [json.loads(line) for line in (args.out / name / "metrics.jsonl").read_text().splitlines()]
        results["train_curves"][name] = [r["loss"] for r in metrics if "loss" in r]
        results[f"summary_{name}"] = {k: summary[k] for k in ("steps", "tokens", "tokens_per_s", "peak_memory_mb")}
    import datasets

    validation = datasets.load_from_disk(str(args.out / "prepared" / "validation")).to_list()
    pad = json.loads((args.out / "prepared" / "prepare.json").read_text())["tokenizer"]["pad_token_id"]
    for name, final in (("c_full_history", args.out / "b_no_memory" / "final"), ("c_full_history step 0", None)):
        if name in before["perplexity"]:
            for key in ("perplexity", "eval_loss", "seconds"):
                results[key][name] = before[key][name]
            continue
        started = time.perf_counter()
        report = evaluator(load_plain(final), validation, args.full_window, pad).evaluate()
        results["seconds"][name] = round(time.perf_counter() - started, 1)
        results["perplexity"][name] = session_table(report)
        results["eval_loss"][name] = report["eval_loss"]
        save()
    if "d_summary_memory" in before["perplexity"]:
        results["summaries"] = before["summaries"]
        for key in ("perplexity", "seconds"):
            results[key]["d_summary_memory"] = before[key]["d_summary_memory"]
    else:
        started = time.perf_counter()
        table, results["summaries"] = summary_variant(load_plain(args.out / "b_no_memory" / "final"), validation,
                                                      args.data, args.window, pad)
        results["perplexity"]["d_summary_memory"] = table
        results["seconds"]["d_summary_memory"] = round(time.perf_counter() - started, 1)
        save()
    from dialogtune.memory.conversation import load_memory_run

    memory_run = load_memory_run(args.out / "a_memory")
    conversation = long_conversation(validation, 41)
    turns = [0, 9, 39]
    results["turn_cost"] = {variant: {int(turn): cost for turn, cost in costs.items()}
                            for variant, costs in before["turn_cost"].items()} if "turn_cost" in before else {
        "a_memory": turn_costs(memory_run.model, conversation, memory_run.inputs, turns),
        "c_full_history": turn_costs(load_plain(args.out / "b_no_memory" / "final"), conversation,
                                     TurnInputs(args.full_window, False, pad), turns),
    }
    save()
    plot(results, RESULTS / f"{args.name}.png")
    title = (f"# Memory on MSC session 3 ({len(validation)} validation episodes, {args.steps} steps x"
             f" {args.streams} streams x {args.horizon} turns)")
    lines = [title, "",
             "| variant | session 1 | session 2 | session 3 | all (loss) |", "|---|---|---|---|---|"]
    for name, table in results["perplexity"].items():
        loss = results["eval_loss"].get(name)
        lines.append(f"| {name} | " + " | ".join(f"{table[s]:.2f}" if s in table else "–" for s in ("1", "2", "3"))
                     + f" | {loss if loss is not None else ''} |")
    lines += ["", "| turn | (a) tokens | (a) ms | (c) tokens | (c) ms |", "|---|---|---|---|---|"]
    for turn in turns:
        a, c = results["turn_cost"]["a_memory"][turn], results["turn_cost"]["c_full_history"][turn]
        lines.append(f"| {turn + 1} | {a['tokens']} | {a['ms']} | {c['tokens']} | {c['ms']} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
