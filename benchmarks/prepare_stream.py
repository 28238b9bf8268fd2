"""Benchmark streamed `dialogtune prepare`: peak memory as the data grows, and dialogues/s by num_proc.

    .venv/bin/python benchmarks/prepare_stream.py [--scales 1 4 16] [--num-proc 1 2] [--buffers 2000 10000]

The job is benchmarks/prepare_sgd.py's (SGD train, SmolLM2's tokenizer, `respond` as SYSTEM,
`context: full`, max_length 1024, packing, pack_buffer 5000 unless said) on the SGD train files
copied N times with distinct dialogue ids (`<id>#copyK`), so N times the dialogues, tokens and
output. Each run is a fresh process with --force; its peak RSS is that process's own maximum
(getrusage), and with num_proc > 1 the largest worker's is reported beside it. At the largest
scale, `--buffers` also runs other pack_buffer sizes (num_proc 1): padding against memory.
Results are written after every run to benchmarks/results/prepare_stream.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_BUFFER = 5000  # PrepareConfig.pack_buffer's default
CHILD = """
import json, resource, sys, time
from dialogtune.config import build_config
from dialogtune.prepare import prepare
config = build_config({"data": {"path": sys.argv[1], "format": "sgd"}, "task": {"as": "SYSTEM", "context": "full"},
                       "model": {"name": "smollm2-135m-instruct"}, "max_length": 1024, "pack": True,
                       "num_proc": int(sys.argv[3]), "pack_buffer": int(sys.argv[4]), "output": sys.argv[2]})
t = time.perf_counter()
stats = prepare(config, force=True, quiet=True).stats
stats["wall_seconds_with_tokenizer_load"] = round(time.perf_counter() - t, 3)
stats["main_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
stats["worker_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
print(json.dumps(stats))
"""


def replicate(source: Path, copies: int, into: Path) -> Path:
    """The SGD files of `source` written `copies` times into `into`, each copy's dialogue ids made distinct."""
    into.mkdir(parents=True, exist_ok=True)
    (into / "schema.json").write_bytes((source / "schema.json").read_bytes())
    files = sorted(p for p in source.iterdir() if p.name.startswith("dialogues_"))
    for copy in range(copies):
        for file in files:
            dialogues = json.loads(file.read_text())
            for dialogue in dialogues:
                dialogue["dialogue_id"] = f"{dialogue['dialogue_id']}#copy{copy}"
            # Copy by copy, each file in order: the data is SGD train N times over, each pass in its own order.
            (into / f"dialogues_c{copy:03d}_{file.stem.removeprefix('dialogues_')}.json").write_text(json.dumps(dialogues))
    return into


def run_once(data: Path, out: Path, num_proc: int, buffer: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(data), str(out), str(num_proc), str(buffer)], check=True,
                          capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prepare_stream.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [("| copies of SGD train | dialogues | tokens | pack_buffer | train shards | num_proc | seconds |"
              " dialogues/s | peak RSS (main) | peak RSS (largest worker) | train padding |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        worker = f"{r['worker_peak_rss_mb']:.0f} MB" if r["num_proc"] > 1 else "-"
        lines.append(f"| {r['copies']}x | {r['dialogues']} | {r['tokens']} | {r['pack_buffer']} | {r['train_shards']} |"
                     f" {r['num_proc']} | {r['seconds']} | {r['dialogues_per_s']:.0f} | {r['main_peak_rss_mb']:.0f} MB |"
                     f" {worker} | {r['padding_fraction_train']:.2%} |")
    table = "\n".join(lines)
    (RESULTS / "prepare_stream.md").write_text(
        f"# prepare, streamed, on replicated SGD train\n\n{result['job']}\n\n{table}\n\n"
        f"Command: `{result['command']}`\n\nMachine: {result['machine']}\n")
    print(table, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sgd" / "train"))
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--buffers", type=int, nargs="*", default=[2000, 10000])
    args = parser.parse_args()
    import tokenizers
    import transformers

    result = {
        "job": ("prepare SGD train copied N times (distinct dialogue ids), SmolLM2 tokenizer, respond as SYSTEM,"
                " context full, max_length 1024, pack, pack_buffer 5000 (default) unless said; a fresh process per run"),
        "command": "python benchmarks/prepare_stream.py --scales " + " ".join(map(str, args.scales))
                   + " --num-proc " + " ".join(map(str, args.num_proc)) + " --buffers " + " ".join(map(str, args.buffers)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="prepare-stream-") as tmp:
        for copies in args.scales:
            started = time.perf_counter()
            data = replicate(Path(args.data), copies, Path(tmp) / f"sgd_x{copies}")
            print(f"{copies}x written in {time.perf_counter() - started:.1f}s", flush=True)
            runs = [(num_proc, DEFAULT_BUFFER) for num_proc in args.num_proc]
            if copies == max(args.scales):
                runs += [(1, buffer) for buffer in args.buffers]
            for num_proc, buffer in runs:
                out = Path(tmp) / "out"
                stats = run_once(data, out, num_proc, buffer)
                result["runs"].append({
                    "copies": copies, "num_proc": num_proc, "pack_buffer": buffer, "dialogues": stats["dialogues_read"],
                    "tokens": stats["tokens"], "train_rows": stats["splits"]["train"]["rows"],
                    "train_shards": len(list((out / "train").glob("data-*.arrow"))),
                    "seconds": stats["seconds"], "dialogues_per_s": stats["dialogues_per_s"],
                    "tokens_per_s": stats["tokens_per_s"], "main_peak_rss_mb": stats["main_peak_rss_mb"],
                    "worker_peak_rss_mb": stats["worker_peak_rss_mb"],
                    "padding_fraction_train": stats["splits"]["train"]["padding_fraction"],
                    "wall_seconds_with_tokenizer_load": stats["wall_seconds_with_tokenizer_load"]})
                write_results(result)
            for file in data.iterdir():  # the copies are large: gone before the next scale is written
                file.unlink()


if __name__ == "__main__":
    main()
