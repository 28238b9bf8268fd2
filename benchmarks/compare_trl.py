"""dialogtune against TRL's SFTTrainer: the same dialogue job, model and machine, side by side.

    .venv/bin/pip install -e ".[bench]"              # TRL and py-spy, never runtime dependencies
    .venv/bin/python benchmarks/compare_trl.py        # SmolLM2-135M, 256 SGD dialogues (35–50 min on 2 CPU cores)
    .venv/bin/python benchmarks/compare_trl.py --tiny # a tiny random model: checks the harness in ~7 min

The job: the first 256 dialogues of the SGD train files as chat messages (USER -> user,
SYSTEM -> assistant, the side learnt), SmolLM2-135M-Instruct, LoRA r=16 on q/k/v/o, max
length 512, batch 4, learning rate 2e-4 constant, fp32 on a CPU (bf16 on a GPU). dialogtune runs
with its defaults: no packing, so a step is 4 dialogues as in TRL's unpacked runs (dialogtune
flattens them into one row without padding anyway).

Every measurement runs in a fresh process, so peak memory is each run's own:
- preparation: dialogues/s and tokens/s from the JSONL to a training-ready dataset, on the
  job's 256 dialogues and again on all the SGD train dialogues (3,001), where fixed costs
  (hashing the tokenizer for the cache key, writing the dataset) no longer weigh;
- training, for the same number of trained (assistant) tokens: wall time, tokens/s and trained
  tokens/s (steady state: the first step, which pays for warm-up, left out), padding, peak RSS;
- the loss each trained adapter reaches on 32 held-out dialogues, computed here by one function
  for all (assistant tokens only, plain transformers forward), so speed is not bought with
  worse learning. With a budget this short the loss mostly follows the number of optimizer
  steps (the table shows them): a run that packs more tokens into a step takes fewer steps;
- model FLOPs utilisation: the FLOPs the job needs per second over the machine's matmul peak,
  measured here. Needed per token: forward plus the activation gradients of the frozen base
  (2x forward; LoRA's own weight gradients are negligible) of the linear layers and causal
  attention over the run's mean context; the LM head only where a token is trained, since
  scores elsewhere are thrown away. `mfu_head_everywhere` counts the head at every position
  too (the usual convention, which credits a tool for computing scores it discards).

TRL runs: whole dialogues with assistant-only loss (its chat-template path, which needs a
template patched with generation markers) with and without `bfd` packing, and the out-of-the-box
fallback of one prompt/completion pair per assistant turn, with and without packing.
Writes benchmarks/results/compare_trl[_tiny].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRL_RUNS = [("whole", "bfd"), ("whole", "none"), ("pairs", "none"), ("pairs", "bfd")]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


# -- workers (each in its own process) ---------------------------------------------------
def worker_data(args) -> dict:
    """The shared input: JSONL chat messages, and (with --tiny) a tiny random model."""
    from dialogtune.dialogue import Dialogue
    from dialogtune.readers import sgd

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    wanted = args.dialogues + args.heldout
    everything = [d for d in sgd.read(Path(args.data)) if isinstance(d, Dialogue)]
    dialogues = everything[:wanted]
    parts = (("train", dialogues[: args.dialogues]), ("heldout", dialogues[args.dialogues :]), ("scale", everything))
    for name, part in parts:
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as out:
            for dialogue in part:
                messages = [{"role": "user" if t.speaker == "USER" else "assistant", "content": t.text}
                            for t in dialogue.turns]
                out.write(json.dumps({"messages": messages}) + "\n")
    model = model_location(args)
    if args.tiny:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from dialogtune.models import resolve

        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        LlamaForCausalLM(config).save_pretrained(model)
        tokenizer.save_pretrained(model)
    return {"train_dialogues": args.dialogues, "heldout_dialogues": len(dialogues) - args.dialogues,
            "scale_dialogues": len(everything), "model": model}


def worker_peak(args) -> dict:
    return matmul_peak()


def matmul_peak() -> dict:
    """The machine's fp32 matmul peak with the default threads: best of a few square sizes.
    Also measured in each training process right after it trains (memory peaks read first), as
    this shared machine's speed drifts during a run."""
    import torch

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    best = 0.0
    for n in (1024, 2048, 4096) if device == "cpu" else (4096, 8192):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        repeats = 8 if device == "cpu" else 50
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started))
    return {"matmul_peak_gflops": round(best / 1e9, 1), "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "device": device}


def job_config(args, out: Path, steps: int | None = None, data: str = "train") -> dict:
    config = {
        "data": {"path": str(Path(args.work) / f"{data}.jsonl"), "format": "messages"},
        "task": {"as": "assistant", "context": "full"}, "split": {"validation": 0},
        "model": {"name": model_location(args)}, "max_length": args.max_length,
        "output": str(out / f"prepared-{data}"),
    }
    if steps is not None:
        config.update({
            "method": "lora", "lora": LORA, "precision": "auto", "run_dir": str(out / "run"), "samples": 0,
            "train": {"max_steps": steps, "per_device_train_batch_size": args.batch, "learning_rate": args.lr,
                      "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1, "report_to": [],
                      "save_strategy": "no", "seed": args.seed, "disable_tqdm": True},
        })
    return config


def worker_dialogtune_prepare(args) -> dict:
    from dialogtune.config import build_config
    from dialogtune.prepare import prepare

    out = Path(args.work) / "dialogtune"
    started = time.perf_counter()
    stats = prepare(build_config(job_config(args, out, data=args.prepare_data)), force=True, quiet=True).stats
    return {"dialogues": stats["dialogues_read"], "tokens": stats["tokens"], "trained_tokens": stats["trained_tokens"],
            "rows": stats["splits"]["train"]["rows"], "seconds": stats["seconds"],
            "dialogues_per_s": stats["dialogues_per_s"], "tokens_per_s": stats["tokens_per_s"],
            "seconds_with_tokenizer_load": round(time.perf_counter() - started, 3)}


def worker_dialogtune_train(args) -> dict:
    import resource

    from dialogtune.config import TrainJobConfig, build_config
    from dialogtune.train.report import read_metrics
    from dialogtune.train.run import train

    out = Path(args.work) / "dialogtune"
    prepared = json.loads((out / "prepared-train" / "stats.json").read_text())["splits"]["train"]
    per_step = prepared["trained_tokens"] / prepared["rows"] * args.batch
    steps = max(2, math.ceil(args.trained_tokens / per_step))
    summary = train(build_config(job_config(args, out, steps), schema=TrainJobConfig), overwrite=True, quiet=True)
    records = [r for r in read_metrics(out / "run" / "metrics.jsonl") if "tokens_per_s" in r]
    steady = records[1:] or records
    return {
        "steps": summary["steps"], "train_seconds": summary["train_seconds"], "tokens": summary["tokens"],
        "trained_tokens": summary["trained_tokens"], "padded_tokens": summary["tokens"],
        "tokens_per_s": summary["tokens_per_s"], "trained_tokens_per_s": summary["trained_tokens_per_s"],
        "steady_tokens_per_s": _mean([r["tokens_per_s"] for r in steady]),
        "steady_trained_tokens_per_s": _mean([r["trained_tokens_per_s"] for r in steady]),
        "padding_fraction": 0.0 if summary.get("segment_attention") else prepared["padding_fraction"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_mb": summary["peak_memory_mb"], "train_loss_last": summary["train_loss_last"],
        "train_losses": [r["loss"] for r in records], "segment_attention": summary.get("segment_attention"),
        "adapter": summary["final"],
        "matmul_peak_after_gflops": matmul_peak()["matmul_peak_gflops"],
    }


def worker_heldout(args) -> dict:
    """Mean loss over the assistant tokens of the held-out dialogues, for each adapter."""
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dialogtune.config import build_config
    from dialogtune.prepare import prepare

    out = Path(args.work) / "heldout"
    prepared = prepare(build_config(job_config(args, out, data="heldout")), quiet=True)
    rows = datasets.load_from_disk(str(prepared.directory / "train"))
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    losses = {}
    for name, adapter in [("base", None), *json.loads(args.adapters).items()]:
        model = AutoModelForCausalLM.from_pretrained(model_location(args), dtype=dtype).to(device)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for row in rows:
                ids = torch.tensor([row["input_ids"]], device=device)
                labels = torch.tensor([row["labels"]], device=device)
                logits = model(input_ids=ids).logits[0, :-1].float()
                total += float(torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="sum"))
                count += int((labels[0, 1:] != -100).sum())
        losses[name] = round(total / count, 4)
    return {"heldout_loss": losses, "heldout_tokens": count, "heldout_examples": len(rows)}


WORKERS = {"data": worker_data, "peak": worker_peak, "dialogtune-prepare": worker_dialogtune_prepare,
           "dialogtune-train": worker_dialogtune_train, "heldout": worker_heldout}


# -- the orchestration --------------------------------------------------------------------
def model_location(args) -> str:
    if args.tiny:
        return str(Path(args.work) / "tiny-model")
    from dialogtune.models import resolve

    return resolve("smollm2-135m-instruct")


def _mean(values: list[float]) -> float:
    return round(sum(values) / max(len(values), 1), 1)


def run_worker(name: str, args, **extra) -> dict:
    command = [sys.executable, __file__, "--worker", name, *passthrough(args)]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return run_json(command, name)


def run_json(command: list[str], label: str) -> dict | None:
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    last = done.stdout.strip().splitlines()[-1]
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {time.perf_counter() - started:.0f}s", flush=True)
    return json.loads(last) if last.startswith("{") else None


def passthrough(args) -> list[str]:
    values = ["--work", args.work, "--data", args.data, "--dialogues", str(args.dialogues), "--heldout",
              str(args.heldout), "--max-length", str(args.max_length), "--batch", str(args.batch), "--lr",
              str(args.lr), "--trained-tokens", str(args.trained_tokens), "--seed", str(args.seed)]
    return values + (["--tiny"] if args.tiny else [])


def trl_run(args, mode: str, packing: str, budget: int) -> dict:
    out = Path(args.work) / "trl" / f"{mode}-{packing}"
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "benchmarks" / "trl_runner.py"), "--data", str(Path(args.work) / "train.jsonl"),
               "--model", model_location(args), "--mode", mode, "--packing", packing, "--max-length",
               str(args.max_length), "--batch", str(args.batch), "--lr", str(args.lr), "--lora-r", str(LORA["r"]),
               "--trained-tokens", str(budget), "--out", str(out / "result.json"), "--adapter-out",
               str(out / "adapter"), "--seed", str(args.seed)]
    run_json(command, f"trl {mode} packing={packing}")
    result = json.loads((out / "result.json").read_text())
    result["adapter"] = str(out / "adapter")
    return result


def prepare_at_scale(args, data) -> dict:
    """Preparation alone on all the SGD train dialogues: dialogtune, and TRL's whole-dialogue
    preparation with and without packing (the out-of-the-box pairs are 6x slower still)."""
    rows = []
    ours = run_worker("dialogtune-prepare", args, prepare_data="scale")
    rows.append({"name": "dialogtune", "label": "dialogtune", **{k: ours[k] for k in PREP_KEYS}})
    for packing in ("bfd", "none"):
        out = Path(args.work) / "trl" / f"scale-{packing}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        run_json([sys.executable, str(ROOT / "benchmarks" / "trl_runner.py"), "--prepare-only", "--data",
                  str(Path(args.work) / "scale.jsonl"), "--model", model_location(args), "--mode", "whole",
                  "--packing", packing, "--max-length", str(args.max_length), "--out", str(out)],
                 f"trl prepare at scale packing={packing}")
        result = json.loads(out.read_text())
        rows.append({"name": f"whole-{packing}", "label": f"TRL whole dialogues, {'bfd' if packing == 'bfd' else 'no'} packing",
                     **{k: result[f"prepare_{k}"] for k in PREP_KEYS}})
    return {"dialogues": data["scale_dialogues"], "rows": rows}


PREP_KEYS = ("dialogues_per_s", "tokens_per_s", "seconds")


def flops_per_token(model: str, context: float) -> tuple[float, float]:
    """Training FLOPs with a frozen base (LoRA), forward plus activation gradients: (per token
    for the layers: 2 x (2 x linear parameters + causal attention), per trained token for the
    LM head: 2 x 2 x hidden x vocabulary)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    linear = layers * (d * q + 2 * d * kv + q * d + 3 * d * config.intermediate_size)
    attention = layers * 4 * context * q  # QK^T and PV over the mean causal context
    return 2 * (2 * linear + attention), 2 * 2 * d * config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sgd" / "train"))
    parser.add_argument("--dialogues", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--trained-tokens", type=int, default=4000,
                        help="train each tool until it has trained on this many assistant tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model with SmolLM2's tokenizer")
    parser.add_argument("--skip-pairs", action="store_true", help="leave out TRL's slow prompt/completion runs")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".work"))
    parser.add_argument("--report", action="store_true",
                        help="only redraw the table (and ratios) from the last results in benchmarks/results/")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--adapters", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-data", default="train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.report:
        name = "compare_trl" + ("_tiny" if args.tiny else "")
        result = json.loads((RESULTS / f"{name}.json").read_text())
        result["ratios"] = ratios_of(result["rows"], result.get("prepare_at_scale"))
        print(save(result, name))
        return

    started = time.perf_counter()
    data = run_worker("data", args)
    peak = run_worker("peak", args)
    ours_prep = run_worker("dialogtune-prepare", args)
    ours = run_worker("dialogtune-train", args)
    budget = ours["trained_tokens"]  # TRL trains on as many assistant tokens as dialogtune did
    runs = [(m, p) for m, p in TRL_RUNS if not (args.skip_pairs and m == "pairs")]
    trl = {f"{m}-{p}": trl_run(args, m, p, budget) for m, p in runs}
    adapters = {"dialogtune": ours["adapter"], **{name: r["adapter"] for name, r in trl.items()}}
    heldout = run_worker("heldout", args, adapters=json.dumps(adapters))
    scale = prepare_at_scale(args, data)

    context = ours_prep["tokens"] / max(ours_prep["rows"], 1) / 2  # mean causal context of a token
    per_token = flops_per_token(data["model"], context)
    rows = [row_of("dialogtune", "dialogtune (defaults)", ours_prep, ours, heldout, per_token, peak)]
    labels = {"whole-bfd": "TRL whole dialogues, assistant-only loss, bfd packing",
              "whole-none": "TRL whole dialogues, assistant-only loss, no packing",
              "pairs-none": "TRL prompt/completion pairs, no packing (out of the box)",
              "pairs-bfd": "TRL prompt/completion pairs, bfd packing"}
    for name, result in trl.items():
        prep = {k: result.get(f"prepare_{k}") for k in ("dialogues_per_s", "tokens_per_s", "seconds")}
        rows.append(row_of(name, labels[name], prep, result, heldout, per_token, peak))
    report = write_report(args, data, peak, rows, heldout, trl, per_token, scale, time.perf_counter() - started)
    print(report)


def row_of(name: str, label: str, prep: dict, run: dict, heldout: dict, per_token: float, peak: dict) -> dict:
    # Steady state leaves the first (warm-up) step out; a one-step run has only the overall rate.
    rate = run.get("steady_tokens_per_s") or run["tokens_per_s"]
    trained_rate = run.get("steady_trained_tokens_per_s") or run["trained_tokens_per_s"]
    needed = rate * per_token[0] + trained_rate * per_token[1]  # FLOP/s the job needs at this speed
    after = run.get("matmul_peak_after_gflops")  # the peak in the run's own process, right after it trained
    return {
        "name": name, "label": label, "prepare_dialogues_per_s": prep.get("dialogues_per_s"),
        "prepare_tokens_per_s": prep.get("tokens_per_s"), "tokens_per_s": rate,
        "trained_tokens_per_s": trained_rate, "overall_tokens_per_s": run["tokens_per_s"],
        "overall_trained_tokens_per_s": run["trained_tokens_per_s"], "train_seconds": run["train_seconds"],
        "steps": run["steps"], "tokens": run["tokens"], "trained_tokens": run["trained_tokens"],
        "padding_fraction": run.get("padding_fraction"), "peak_rss_mb": run.get("peak_rss_mb"),
        "train_loss_last": run.get("train_loss_last"), "heldout_loss": heldout["heldout_loss"].get(name),
        "mfu": round(needed / (peak["matmul_peak_gflops"] * 1e9), 3),
        "mfu_head_everywhere": round(rate * sum(per_token) / (peak["matmul_peak_gflops"] * 1e9), 3),
        "matmul_peak_after_gflops": after,
        "mfu_vs_peak_after": round(needed / (after * 1e9), 3) if after else None,
        "template": run.get("template"),
    }


def ratios_of(rows: list[dict], scale: dict | None = None) -> dict[str, float]:
    """dialogtune over TRL's fastest run (the highest trained tokens/s), over its fastest
    preparation (on the job and at scale) and over its out-of-the-box run; and the held-out
    loss difference."""
    ours, trl = rows[0], [r for r in rows[1:] if r["trained_tokens_per_s"]]
    ratios: dict[str, float] = {}
    if trl:
        best = max(trl, key=lambda r: r["trained_tokens_per_s"])
        fastest_prep = max((r for r in trl if r["prepare_dialogues_per_s"]), key=lambda r: r["prepare_dialogues_per_s"])
        ratios["trl_fastest_run"] = best["name"]
        ratios["trained_tokens_per_s_vs_trl_fastest"] = round(ours["trained_tokens_per_s"] / best["trained_tokens_per_s"], 2)
        ratios["prepare_dialogues_per_s_vs_trl_fastest"] = round(
            ours["prepare_dialogues_per_s"] / fastest_prep["prepare_dialogues_per_s"], 2)
        ratios["peak_rss_vs_trl_fastest"] = round(ours["peak_rss_mb"] / best["peak_rss_mb"], 2)
        ratios["heldout_loss_minus_trl_fastest"] = round(ours["heldout_loss"] - best["heldout_loss"], 4)
    pairs = next((r for r in rows if r["name"] == "pairs-none"), None)
    if pairs:
        ratios["trained_tokens_per_s_vs_trl_out_of_the_box"] = round(
            ours["trained_tokens_per_s"] / pairs["trained_tokens_per_s"], 2)
    if scale:
        fastest = max(scale["rows"][1:], key=lambda r: r["dialogues_per_s"])
        ratios["prepare_at_scale_dialogues_per_s_vs_trl_fastest"] = round(
            scale["rows"][0]["dialogues_per_s"] / fastest["dialogues_per_s"], 2)
    return ratios


def write_report(args, data, peak, rows, heldout, trl, per_token, scale, seconds) -> str:
    import peft
    import torch
    import transformers

    try:
        import trl as trl_package

        trl_version = trl_package.__version__
    except ImportError:
        trl_version = None
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
               "trl": trl_version, **peak}
    command = "python benchmarks/compare_trl.py" + (" --tiny" if args.tiny else "") + (
        " --skip-pairs" if args.skip_pairs else "") + f" --trained-tokens {args.trained_tokens}"
    result = {"job": job_text(args, data), "command": command, "machine": machine, "rows": rows,
              "prepare_at_scale": scale, "ratios": ratios_of(rows, scale), "flops_per_token": per_token,
              "heldout": heldout,
              "seconds": round(seconds, 1),
              "trl_details": {k: {key: v.get(key) for key in ("template", "stock_template_error", "argv")}
                              for k, v in trl.items()}}
    return save(result, "compare_trl" + ("_tiny" if args.tiny else ""))


def save(result: dict, name: str) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (RESULTS / f"{name}.md").write_text(text)
    return text


def render(result: dict) -> str:
    rows, ratios, heldout, machine = result["rows"], result["ratios"], result["heldout"], result["machine"]
    ours, per_token = rows[0], result["flops_per_token"]

    def ratio(a, b):
        return f"{a / b:.1f}x" if a and b else "–"

    lines = [
        ("| run | prepare dialogues/s | tokens/s | trained tokens/s | padding | peak RSS | steps | held-out loss"
         " | MFU | dialogtune trained tokens/s ÷ this |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        prep = f"{r['prepare_dialogues_per_s']:.0f}" if r["prepare_dialogues_per_s"] else "–"
        padding = f"{r['padding_fraction']:.0%}" if r["padding_fraction"] is not None else "–"
        best = " **(TRL's fastest here)**" if r["name"] == ratios.get("trl_fastest_run") else ""
        lines.append(
            f"| {r['label']}{best} | {prep} | {r['tokens_per_s']:.0f} | {r['trained_tokens_per_s']:.1f} | {padding}"
            f" | {r['peak_rss_mb'] / 1024:.1f} GiB | {r['steps']} | {r['heldout_loss']} | {r['mfu']:.0%}"
            f" | {ratio(ours['trained_tokens_per_s'], r['trained_tokens_per_s'])} |")
    scale = result.get("prepare_at_scale")
    if scale:
        lines += ["", f"Preparation alone on all {scale['dialogues']} SGD train dialogues:", "",
                  "| preparation | dialogues/s | tokens/s | seconds | dialogtune ÷ this |", "|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['dialogues_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f}"
                  f" | {ratio(scale['rows'][0]['dialogues_per_s'], r['dialogues_per_s'])} |" for r in scale["rows"]]
    summary = ", ".join(f"{k} {v}" + ("x" if "_vs_" in k else "") for k, v in ratios.items())
    head_everywhere = ", ".join(f"{r['name']} {r['mfu_head_everywhere']:.0%}" for r in rows)
    after = [r for r in rows if r.get("mfu_vs_peak_after")]
    after_text = (" Against the peak measured in each run's process right after it trained: " + ", ".join(
        f"{r['name']} {r['mfu_vs_peak_after']:.0%} ({r['matmul_peak_after_gflops']} GFLOP/s)" for r in after)
        + ".") if after else ""
    return (
        f"# {result['job']}\n\n" + "\n".join(lines) + f"\n\ndialogtune against TRL: {summary}.\n\n"
        f"Base model held-out loss: {heldout['heldout_loss'].get('base')} ({heldout['heldout_tokens']} assistant"
        f" tokens of {heldout['heldout_examples']} held-out dialogues). Each run trained on about"
        f" {ours['trained_tokens']} assistant tokens.\n"
        f"Rates are steady state (the first step left out). MFU: tokens/s x {per_token[0] / 1e6:.0f} MFLOP"
        f" (layers) + trained tokens/s x {per_token[1] / 1e6:.0f} MFLOP (LM head), over the measured matmul peak"
        f" of {machine['matmul_peak_gflops']} GFLOP/s ({machine['dtype']}, {machine['threads']} threads). Counting"
        f" the head at every position instead: {head_everywhere}.{after_text}\n\n"
        f"Command: `{result['command']}` ({result['seconds'] / 60:.0f} min)\n\nMachine: {machine}\n")


def job_text(args, data) -> str:
    model = "tiny random Llama (SmolLM2 tokenizer)" if args.tiny else "SmolLM2-135M-Instruct"
    return (f"{model}, LoRA r=16 q/k/v/o, {data['train_dialogues']} SGD dialogues (assistant = SYSTEM side),"
            f" max length {args.max_length}, batch {args.batch}, lr {args.lr}, ~{args.trained_tokens} trained tokens"
            " per run")


if __name__ == "__main__":
    main()
