"""`dialogtune estimate` against the peak memory of real training runs on this CPU.

    .venv/bin/python benchmarks/estimate_check.py              # SmolLM2-135M: full, full + checkpointing, LoRA (~20 min on 2 cores)
    .venv/bin/python benchmarks/estimate_check.py --runs lora  # one of them

The job is examples/sgd_respond.yaml (SmolLM2-135M-Instruct, packed rows of 512 tokens, batch 4,
LoRA r=16 on q/k/v/o) trained for 3 steps, with no validation split (the evaluation passes
would only add time) and no TensorBoard. Each run is a fresh `dialogtune train` process; its
summary.json has `peak_memory_mb`, on a CPU the process's maximum resident set size.

That RSS holds more than the tensors the estimate counts (what a GPU's max_memory_allocated
reports), and this measures the two other parts apart:
- the runtime baseline, once: a process that does everything `dialogtune train` does before it
  loads the model (imports, tokenizer, dataset, TrainingArguments, one collated batch) reports
  its own maximum RSS;
- the freed memory glibc keeps in the process, per run: training turns glibc's mmap off and
  keeps up to 1 GiB of freed heap (train/malloc.py, to stop re-faulting pages every step), and
  the holes the forward's short-lived tensors leave between the kept ones stay resident. A
  process loads the run's model, runs one training forward on the first batch and, at its end
  (every activation alive: the peak), reports how much its RSS drops at malloc_trim(0), which
  hands every free page back.
The comparison: estimate + baseline against the measured peak (the estimate as it is meant for
GPUs), and estimate + baseline + retained heap against it (the whole CPU picture).
Writes benchmarks/results/estimate_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "estimate_check"
CONFIG = ROOT / "examples" / "sgd_respond.yaml"
COMMON = ["train.max_steps=3", "train.logging_steps=1", "train.report_to=[]", "split.validation=0", "samples=0",
          f"output={WORK / 'prepared'}"]
RUNS = {
    "full": ["method=full", "train.learning_rate=1.0e-5"],
    "full_checkpointing": ["method=full", "train.learning_rate=1.0e-5", "train.gradient_checkpointing=true"],
    "lora": [],
}
MIB = 2**20

BASELINE = """
import json, resource, sys
from pathlib import Path
import datasets, peft, torch  # noqa: F401  (peft: what a LoRA run imports)
import transformers.models.llama.modeling_llama  # noqa: F401
from dialogtune.cli import main  # noqa: F401  (what the command imports)
from dialogtune.collate import CausalCollator
from dialogtune.config import TrainJobConfig, build_config, load_yaml, merge, parse_overrides
from dialogtune.models import load_tokenizer
from dialogtune.records import PreparedInfo
from dialogtune.train.malloc import keep_freed_memory
from dialogtune.train.run import training_arguments
from accelerate import PartialState

config_path, overrides = sys.argv[1], json.loads(sys.argv[2])
config = build_config(merge(load_yaml(Path(config_path)), parse_overrides(overrides)), config_path, TrainJobConfig)
PartialState()
keep_freed_memory()
tokenizer = load_tokenizer(config.model.name)
prepared = Path(config.output)
manifest = PreparedInfo.load(prepared)
train_set = datasets.load_from_disk(str(prepared / "train"))
args = training_arguments(config, Path(config.run_dir), "fp32", has_validation=False)
rows = [train_set[i] for i in range(args.per_device_train_batch_size)]
batch = CausalCollator(manifest.tokenizer.pad_token_id, flatten=True)(rows)
print(json.dumps({"baseline_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "batch_tokens": int(batch["input_ids"].numel())}))
"""


RETAINED = """
import ctypes, json, sys
from pathlib import Path
import datasets, torch
from dialogtune.collate import CausalCollator
from dialogtune.config import TrainJobConfig, build_config, load_yaml, merge, parse_overrides
from dialogtune.loss import core_model, trained_loss
from dialogtune.records import PreparedInfo
from dialogtune.train.attention import use_segment_attention
from dialogtune.train.malloc import keep_freed_memory
from dialogtune.train.model import load_model

def resident_mb():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

config_path, overrides = sys.argv[1], json.loads(sys.argv[2])
config = build_config(merge(load_yaml(Path(config_path)), parse_overrides(overrides)), config_path, TrainJobConfig)
keep_freed_memory()
model = load_model(config)
model.train()
use_segment_attention(core_model(model))
manifest = PreparedInfo.load(Path(config.output))
rows = datasets.load_from_disk(str(Path(config.output) / "train"))
batch = CausalCollator(manifest.tokenizer.pad_token_id, flatten=True)([rows[i] for i in range(4)])
loss, count = trained_loss(model, batch)  # the end of the forward: every activation alive, the peak
before = resident_mb()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"retained_mb": before - resident_mb()}))
"""


def dialogtune(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dialogtune", *arguments], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def overrides_for(name: str) -> list[str]:
    return [*COMMON, *RUNS[name], f"run_dir={WORK / name}"]


def measure_baseline() -> dict:
    found = subprocess.run([sys.executable, "-c", BASELINE, str(CONFIG), json.dumps(overrides_for("lora"))],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(found.stdout.strip().splitlines()[-1])


def measure_retained(name: str) -> float:
    found = subprocess.run([sys.executable, "-c", RETAINED, str(CONFIG), json.dumps(overrides_for(name))],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(found.stdout.strip().splitlines()[-1])["retained_mb"]


def estimate_for(name: str) -> dict:
    from dialogtune.config import TrainJobConfig, build_config, load_yaml, merge, parse_overrides
    from dialogtune.estimate import estimate

    raw = merge(load_yaml(CONFIG), parse_overrides(overrides_for(name)))
    return estimate(build_config(raw, str(CONFIG), TrainJobConfig), device="cpu", source=str(CONFIG)).as_dict()


def train(name: str) -> dict:
    started = time.perf_counter()
    done = dialogtune("train", str(CONFIG), "--overwrite", *(x for o in overrides_for(name) for x in ("--set", o)))
    if done.returncode != 0:
        raise RuntimeError(f"{name}: dialogtune train failed:\n{done.stderr[-3000:]}")
    summary = json.loads((WORK / name / "summary.json").read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def write_report(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "estimate_check.json").write_text(json.dumps(results, indent=2) + "\n")
    baseline = results["baseline_mb"]
    lines = [
        "# `dialogtune estimate` against measured peak memory (SmolLM2-135M-Instruct, CPU, fp32)",
        "",
        (f"Job: examples/sgd_respond.yaml, packed rows of 512 tokens, batch 4 ({results['batch_tokens']} tokens in the"
        " first batch; the estimate assumes 4 x 512 = 2048), 3 optimizer steps, AdamW (torch fused)."),
        f"Runtime baseline (a process doing all `dialogtune train` does before loading the model): {baseline:.0f} MiB.",
        "",
        ("| run | parameters | trainable | weights | gradients | optimizer | activations | logits and loss"
         " | estimate | + baseline | error | + retained heap | error | measured peak RSS |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        terms = {k: v / MIB for k, v in run["estimate"]["terms"].items()}
        total = run["estimate"]["total_mib"]
        lines.append(
            f"| {name} | {run['estimate']['parameters']:,} | {run['estimate']['trainable_parameters']:,} | "
            f"{terms['weights']:.0f} | {terms['gradients']:.0f} | {terms['optimizer state']:.0f} | "
            f"{terms['activations']:.0f} | {terms['logits and loss']:.0f} | {total:.0f} | {total + baseline:.0f} | "
            f"{run['error']:+.1%} | {total + baseline + run['retained_mb']:.0f} ({run['retained_mb']:.0f}) | "
            f"{run['error_with_retained']:+.1%} | **{run['measured_peak_mb']:.0f}** |")
    lines += [
        "",
        ("All sizes in MiB. error = (estimate + baseline [+ retained heap] - measured) / measured. Retained heap (in"
         " brackets): the freed memory glibc keeps resident at the end of a training forward of the run's job,"
         " measured in its own process."),
        ("The estimate's total is the sum of its terms, although in backward the gradients appear while"
         " activations are freed: a full fine-tuning run's peak holds less than all its gradients."),
        ("The estimate assumes every token is trained; these runs trained "
         + ", ".join(f"{run['summary']['trained_tokens'] / run['summary']['tokens']:.0%}" for run in results["runs"].values())
         + " of theirs (the SYSTEM turns), which shrinks the real logits chunk."),
        "",
        f"Command: `{results['command']}` ({results['seconds']:.0f} s)",
        "",
        f"Machine: {results['machine']}",
    ]
    (RESULTS / "estimate_check.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args()
    import torch

    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    prepared = dialogtune("prepare", str(CONFIG), *(x for o in COMMON for x in ("--set", o)))
    if prepared.returncode != 0:
        raise RuntimeError(f"dialogtune prepare failed:\n{prepared.stderr[-3000:]}")
    results = {"command": " ".join(["python", "benchmarks/estimate_check.py", *sys.argv[1:]]), **measure_baseline(),
               "runs": {}, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                       "torch": torch.__version__, "device": "cpu"}}
    print(f"runtime baseline {results['baseline_mb']:.0f} MiB", flush=True)
    for name in args.runs:
        estimated = estimate_for(name)
        retained = measure_retained(name)
        summary = train(name)
        measured = summary["peak_memory_mb"]
        total = estimated["total_mib"]
        results["runs"][name] = {
            "estimate": estimated, "measured_peak_mb": measured, "summary": summary,
            "retained_mb": retained, "error": (total + results["baseline_mb"] - measured) / measured,
            "error_with_retained": (total + results["baseline_mb"] + retained - measured) / measured}
        results["seconds"] = time.perf_counter() - started
        write_report(results)  # after every run, so a stopped benchmark keeps what it measured
        print(f"{name}: estimate {total:.0f} MiB + baseline {results['baseline_mb']:.0f} (+ retained {retained:.0f})"
              f" vs measured {measured:.0f} ({results['runs'][name]['error']:+.1%},"
              f" {results['runs'][name]['error_with_retained']:+.1%})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
