"""Function calling on SGD: accuracy against training steps, for the targets of the understand issue.

    python benchmarks/understand_sgd.py --run runs/sgd_understand --data SGD/dev --limit 24

Evaluates (`eval --task understand`, the same fixed sample of dev dialogues each time) the run's
untrained start (its LoRA adapter with every lora_B zeroed, which is exactly the base model), each
checkpoint it kept, and final/, then writes benchmarks/results/understand_sgd.{json,md,png}: function
accuracy (all, unseen), slot F1, joint goal accuracy and latency against the training examples seen.
A checkpoint is evaluated through a view: final/'s tokenizer, template and dialogtune.json with the
checkpoint's adapter weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from dialogtune.evaluate.understand import cell

RESULTS = Path(__file__).parent / "results"
ADAPTER = ("adapter_model.safetensors", "adapter_config.json")


def view(final: Path, weights: Path | None, directory: Path) -> Path:
    """final/ with another adapter: `weights` (a checkpoint directory), or None for lora_B zeroed."""
    from safetensors.torch import load_file, save_file

    directory.mkdir(parents=True)
    for item in final.iterdir():
        if item.name not in ADAPTER:
            (directory / item.name).symlink_to(item.resolve())
    shutil.copy(final / "adapter_config.json", directory / "adapter_config.json")
    if weights is not None:
        shutil.copy(weights / "adapter_model.safetensors", directory / "adapter_model.safetensors")
    else:
        tensors = load_file(str(final / "adapter_model.safetensors"))
        save_file({k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()},
                  str(directory / "adapter_model.safetensors"))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True, help="an SGD split directory (dev)")
    parser.add_argument("--limit", type=int, default=24, help="dialogues evaluated (a fixed sample)")
    parser.add_argument("--skip-start", action="store_true", help="do not evaluate the untrained start")
    parser.add_argument("--only-final", action="store_true", help="evaluate final/ only")
    parser.add_argument("--dialogue-services", action="store_true",
                        help="offer only the functions of each dialogue's services (DSTC8's setting)")
    parser.add_argument("--name", default="understand_sgd", help="results file name (default understand_sgd)")
    parser.add_argument("-o", "--output", default=str(RESULTS))
    args = parser.parse_args()

    from dialogtune.evaluate.understand import evaluate_understanding
    from dialogtune.readers import sgd
    from dialogtune.understand import load_understander

    run = Path(args.run)
    final = run / "final"
    summary = json.loads((run / "summary.json").read_text())
    prepared = json.loads((Path(json.loads((run / "run.json").read_text())["prepared"]) / "stats.json").read_text())
    train = prepared["splits"]["train"]
    batch = json.loads((run / "run.json").read_text())["training_arguments"]["per_device_train_batch_size"]
    examples_per_step = batch * train["examples"] / train["rows"]  # a step reads `batch` packed rows
    points = [] if args.skip_start else [(0, None)]
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    points += [(int(c.name.split("-")[1]), c) for c in checkpoints if int(c.name.split("-")[1]) < summary["steps"]]
    points = [] if args.only_final else points
    points.append((summary["steps"], final))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for step, weights in points:
            location = final if weights == final else view(final, weights, Path(scratch) / f"step-{step}")
            understander = load_understander(str(location))
            understander.prompts.dialogue_services |= args.dialogue_services
            report = evaluate_understanding(understander, sgd.read(Path(args.data)),
                                            Path(scratch) / f"eval-{step}", args.limit)
            results.append({"step": step, "examples_seen": round(step * examples_per_step), **report})
            groups = report["groups"]
            print(f"step {step}: function {groups['all']['function_accuracy']:.3f} (unseen "
                  f"{cell(groups['unseen']['function_accuracy'])}), slot F1 {groups['all']['slot_f1']:.3f},"
                  f" JGA {groups['all']['joint_goal_accuracy']:.3f}, p50 {report['latency']['p50_ms']} ms", flush=True)
            del understander
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    record = {"run": str(run), "data": args.data, "limit": args.limit, "train_examples": prepared["splits"]["train"]["examples"],
              "dialogue_services": args.dialogue_services, "points": results}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(record))
    plot(record, out / f"{args.name}.png")


def markdown(record: dict) -> str:
    offered = "the functions of each dialogue's services" if record.get("dialogue_services") else "all functions"
    lines = [f"# understand on SGD dev: {record['limit']} dialogues, by training step (candidates from {offered})", "",
             f"Run `{record['run']}` ({record['train_examples']} training examples, one per user turn).", "",
             ("| step | examples seen | turns | function acc | unseen function acc | none acc | slot F1 | exact call "
             "| JGA | seen JGA | unseen JGA | p50 ms | p95 ms |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in record["points"]:
        a, s, u = p["groups"]["all"], p["groups"]["seen"], p["groups"]["unseen"]
        lines.append(f"| {p['step']} | {p['examples_seen']} | {a['turns']} | {cell(a['function_accuracy'])} | "
                     f"{cell(u['function_accuracy'])} | {cell(a['none_accuracy'])} | {cell(a['slot_f1'])} | "
                     f"{cell(a['exact_call'])} | {cell(a['joint_goal_accuracy'])} | {cell(s['joint_goal_accuracy'])} | "
                     f"{cell(u['joint_goal_accuracy'])} | {p['latency']['p50_ms']} | {p['latency']['p95_ms']} |")
    last = record["points"][-1]
    stages = "; ".join(f"{k} p50 {v['p50_ms']} ms" for k, v in last.get("latency_by_stage", {}).items())
    lines += ["", f"Latency by stage (last row): {stages}.", ""]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = [p["examples_seen"] for p in record["points"]]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for key, group, label in [("function_accuracy", "all", "function accuracy"),
                              ("function_accuracy", "unseen", "function accuracy, unseen"),
                              ("slot_f1", "all", "slot F1"), ("joint_goal_accuracy", "all", "joint goal accuracy")]:
        values = [p["groups"][group][key] for p in record["points"]]
        axis.plot(seen, [v if v is not None else float("nan") for v in values], marker="o", label=label)
    axis.axhline(0.383, color="grey", linestyle=":", label="BERT baseline JGA (dev, all)")
    axis.set_xlabel("training examples seen (user turns)")
    axis.set_ylim(0, 1)
    axis.set_title(f"SmolLM2-135M LoRA, understand, SGD dev ({record['limit']} dialogues)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
