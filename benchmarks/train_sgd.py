"""Benchmark `dialogtune train`: SmolLM2-135M-Instruct, LoRA r=16 on the attention projections,
the SGD train sample, max_length 512 with packing, batch 4, a fixed number of steps.

    .venv/bin/python benchmarks/train_sgd.py [--steps 10] [--data ../shared/data/sgd/train] [--no-pack]

Reports total and trained tokens/s, padding fraction and peak memory; writes
benchmarks/results/train_sgd[_nopack].{json,md}. On a GPU add --precision bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sgd" / "train"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-pack", action="store_true")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    from dialogtune.config import TrainJobConfig, build_config
    from dialogtune.train.run import train

    with tempfile.TemporaryDirectory() as tmp:
        config = build_config({
            "data": {"path": args.data, "format": "sgd"}, "task": {"as": "SYSTEM", "context": "full"},
            "split": {"validation": 0}, "model": {"name": "smollm2-135m-instruct"}, "max_length": 512,
            "pack": not args.no_pack, "output": f"{tmp}/prepared", "method": "lora", "precision": args.precision,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"max_steps": args.steps, "per_device_train_batch_size": 4, "learning_rate": 2e-4,
                      "logging_steps": 1, "report_to": [], "save_strategy": "no"},
            "run_dir": f"{tmp}/run", "samples": 0,
        }, schema=TrainJobConfig)
        summary = train(config, quiet=True)
        prepared = json.loads((Path(tmp) / "prepared" / "stats.json").read_text())
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "tokens_per_s" in r][1:]  # the first step pays for warm-up
    import torch
    import transformers

    result = {
        "job": f"SmolLM2-135M LoRA r=16 q/k/v/o, SGD train, max_length 512, pack={not args.no_pack}, batch 4,"
               f" {args.steps} steps",
        "command": "python benchmarks/train_sgd.py" + (" --no-pack" if args.no_pack else "")
                   + f" --steps {args.steps}",
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "precision": summary["precision"],
        "tokens_per_s": summary["tokens_per_s"],
        "trained_tokens_per_s": summary["trained_tokens_per_s"],
        "steady_tokens_per_s": round(sum(r["tokens_per_s"] for r in steady) / max(len(steady), 1), 1),
        "steady_trained_tokens_per_s": round(sum(r["trained_tokens_per_s"] for r in steady) / max(len(steady), 1), 1),
        "padding_fraction": prepared["splits"]["train"]["padding_fraction"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "train_loss_last": summary["train_loss_last"],
    }
    name = "train_sgd" + ("_nopack" if args.no_pack else "")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ("| tokens/s | trained tokens/s | steady tokens/s | steady trained/s | padding | peak memory |\n"
             "|---|---|---|---|---|---|\n"
             f"| {result['tokens_per_s']:.0f} | {result['trained_tokens_per_s']:.0f} | {result['steady_tokens_per_s']:.0f}"
             f" | {result['steady_trained_tokens_per_s']:.0f} | {result['padding_fraction']:.1%}"
             f" | {result['peak_memory_mb']:.0f} MB |\n")
    (results / f"{name}.md").write_text(f"# {result['job']}\n\n{table}\nCommand: `{result['command']}`\n\n"
                                        f"Machine: {result['machine']}\n")
    print(table)


if __name__ == "__main__":
    main()
