"""Load on `dialogtune serve`: one reply at a time (`--max-batch 1`, the server before continuous
batching) against continuous batching (`--max-batch 16`), with 1/4/8/16/32 concurrent users.

    .venv/bin/python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--users 1 4 8 16 32]
        [--requests-per-user 2] [--max-tokens 64]

Each server runs in its own process on loopback with the default `--queue 8`; both are up, and
each level loads one, then the other (never both at once). `--omp-wait-policy PASSIVE` runs both
with OpenMP's waiting threads asleep instead of spinning (see the results' notes); each setting's run
is kept in the results file next to the others. Each user is an official `openai` client sending its requests one after
another, streamed, greedy, `max_tokens` fixed; a refused request (503) is counted and not retried.
Measured per level: answered requests/s and completion tokens/s over the level's wall time, time to
first content token and total latency (p50/p95, answered requests), refusals. Also: how many
greedy replies are the same text from both servers. Writes benchmarks/results/serve_load.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOPICS = ["a lighthouse keeper", "a lost umbrella", "the first day of spring", "a robot learning to cook",
          "an old map", "a cat who hates rain", "a train that never stops", "a quiet library",
          "a mountain village", "a broken clock", "a small boat at sea", "a garden on the moon",
          "a forgotten song", "a bakery at dawn", "two chess players", "a letter never sent"]


def prompt(user: int, request: int) -> list[dict]:
    topic = TOPICS[(user * 7 + request) % len(TOPICS)]
    detail = " Use simple words and describe the place, the people and what happens." * (user % 3)
    return [{"role": "user", "content": f"Write a short story about {topic}.{detail}"}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(model: str, max_batch: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dialogtune", "serve", model, "--host", "127.0.0.1", "--port",
                               str(port), "--model-id", "bench", "--max-batch", str(max_batch)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start in 300 s")


def ask(client, messages: list[dict], max_tokens: int) -> dict:
    import openai

    sent = time.perf_counter()
    first, text, tokens = None, "", 0
    try:
        stream = client.chat.completions.create(model="bench", messages=messages, temperature=0, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
    except openai.APIStatusError as err:
        if err.status_code == 503:
            return {"refused": True}
        raise
    done = time.perf_counter()
    return {"refused": False, "ttft": (first or done) - sent, "latency": done - sent, "tokens": tokens,
            "text": text.strip()}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def level(url: str, users: int, per_user: int, max_tokens: int) -> tuple[dict, dict]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def user(u: int) -> list[tuple[int, int, dict]]:
        return [(u, r, ask(client, prompt(u, r), max_tokens)) for r in range(per_user)]

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=users) as pool:
        done = [item for items in pool.map(user, range(users)) for item in items]
    wall = time.perf_counter() - started
    answered = [d for _, _, d in done if not d["refused"]]
    ttft, latency = [d["ttft"] for d in answered], [d["latency"] for d in answered]
    row = {"users": users, "requests": len(done), "answered": len(answered), "refused": len(done) - len(answered),
           "seconds": round(wall, 2), "requests_per_s": round(len(answered) / wall, 3),
           "tokens_per_s": round(sum(d["tokens"] for d in answered) / wall, 1),
           "ttft_p50_s": rounded(percentile(ttft, 0.5)), "ttft_p95_s": rounded(percentile(ttft, 0.95)),
           "latency_p50_s": rounded(percentile(latency, 0.5)), "latency_p95_s": rounded(percentile(latency, 0.95)),
           "mean_tokens": round(statistics.mean(d["tokens"] for d in answered), 1) if answered else None}
    return row, {f"{users}/{u}/{r}": d["text"] for u, r, d in done if not d["refused"]}


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_servers(model: str, batches: list[int], levels: list[int], per_user: int, max_tokens: int,
                env: dict[str, str]) -> tuple[list[list[dict]], list[dict]]:
    """Both servers up (an idle one takes no CPU), loaded in turn level by level, so a change in
    what else runs on the machine falls on both alike."""
    servers = [start(model, max_batch, env) for max_batch in batches]
    rows: list[list[dict]] = [[] for _ in batches]
    texts: list[dict] = [{} for _ in batches]
    try:
        for _, url in servers:
            level(url, 1, 1, max_tokens)  # warm-up: first-call costs stay out of the figures
        for users in levels:
            for i, (max_batch, (_, url)) in enumerate(zip(batches, servers, strict=True)):
                row, said = level(url, users, per_user, max_tokens)
                row["load_average_1min"] = round(os.getloadavg()[0], 2)  # the machine is shared: say how busy
                rows[i].append(row)
                texts[i].update(said)
                print(f"max_batch={max_batch} {json.dumps(row)}", flush=True)
                partial = {f"max_batch_{b}": r for b, r in zip(batches, rows, strict=True)}
                (RESULTS / "serve_load.partial.json").write_text(json.dumps(partial, indent=2) + "\n")
    finally:
        for server, _ in servers:
            server.terminate()
            server.wait(timeout=60)
    return rows, texts


def table(rows: list[dict]) -> str:
    lines = ["| users | answered | refused | requests/s | tokens/s | TTFT p50 / p95 | latency p50 / p95 | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['users']} | {r['answered']} | {r['refused']} | {r['requests_per_s']:.2f} |"
                     f" {r['tokens_per_s']:.1f} | {fmt(r['ttft_p50_s'])} / {fmt(r['ttft_p95_s'])} |"
                     f" {fmt(r['latency_p50_s'])} / {fmt(r['latency_p95_s'])} | {r['load_average_1min']} |")
    return "\n".join(lines)


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def plot(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for setting, run in runs.items():
        style = "-" if setting == "default" else "--"
        for key, label in (("one_at_a_time", "--max-batch 1"), ("batched", f"--max-batch {run['max_batch']}")):
            users = [r["users"] for r in run[key]]
            name = f"{label}, {setting}"
            left.plot(users, [r["tokens_per_s"] for r in run[key]], style, marker="o", label=name)
            right.plot(users, [r["latency_p95_s"] or 0 for r in run[key]], style, marker="o", label=name)
    left.set(xlabel="concurrent users", ylabel="completion tokens/s", title="throughput", xscale="log")
    right.set(xlabel="concurrent users", ylabel="p95 latency of answered requests (s)", title="latency", xscale="log")
    for axis in (left, right):
        axis.set_xticks(users, [str(u) for u in users])
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    any_run = next(iter(runs.values()))
    fig.suptitle(f"dialogtune serve, {any_run['model']}, max_tokens={any_run['max_tokens']}, {any_run['cpu']}")
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_load.png", dpi=100)


def goal_at_16(before: list[dict], after: list[dict]) -> dict | None:
    """The issue's goal at 16 users: at least 4x the tokens/s, no refusals, a lower p95 latency."""
    old, new = ({r["users"]: r for r in rows}.get(16) for rows in (before, after))
    if old is None or new is None:
        return None
    goal = {"tokens_per_s_ratio": round(new["tokens_per_s"] / old["tokens_per_s"], 2), "refused": new["refused"],
            "p95_latency_s": [old["latency_p95_s"], new["latency_p95_s"]]}
    goal["met"] = goal["tokens_per_s_ratio"] >= 4 and new["refused"] == 0 and new["latency_p95_s"] < old["latency_p95_s"]
    return goal


def markdown(runs: dict) -> str:
    any_run = next(iter(runs.values()))
    md = (f"# `dialogtune serve` under load: {any_run['model']}, {any_run['cpu']}\n\n"
          f"Each user sends {any_run['requests_per_user']} streamed greedy requests one after another (max_tokens"
          f" {any_run['max_tokens']}, no retry on a 503); queue 8. Latencies are of answered requests. `load avg`"
          " is the machine's 1-minute load after each level (2.0 = both cores busy): other work on the cores slows"
          " both servers.\n\n"
          "`default` is the server as it runs out of the box; `OMP_WAIT_POLICY=PASSIVE` (set in both servers'"
          " environment) makes torch's waiting OpenMP threads sleep instead of spin. When other jobs keep the cores"
          " busy, the spinning costs the one-at-a-time server (generation on an executor thread) most of its speed;"
          " on a quiet machine PASSIVE changes little for it and slows batching.\n")
    for setting, run in runs.items():
        goal = run["goal_at_16_users"]
        verdict = "no 16-user level run" if goal is None else (
            f"{goal['tokens_per_s_ratio']}x the tokens/s, {goal['refused']} refused, p95 latency"
            f" {fmt(goal['p95_latency_s'][0])} -> {fmt(goal['p95_latency_s'][1])}: goal"
            f" {'met' if goal['met'] else 'NOT met'}")
        same = run["greedy_replies_identical"]
        md += (f"\n## {setting}\n\n### One reply at a time (`--max-batch 1`, the server before batching)\n\n"
               f"{table(run['one_at_a_time'])}\n\n### Continuous batching (`--max-batch {run['max_batch']}`)\n\n"
               f"{table(run['batched'])}\n\nAt 16 users (goal: at least 4x the tokens/s, no refusals, lower p95"
               f" latency): {verdict}.\n\nGreedy replies with the same text from both servers: {same['same']} of"
               f" {same['compared']}.\n\nCommand: `{run['command']}`\n")
    return md + "\n![throughput and latency](serve_load.png)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--requests-per-user", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch")
    parser.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"],
                        help="set OMP_WAIT_POLICY in both servers (default: leave OpenMP as it is)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    import torch

    env = {"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}
    setting = f"OMP_WAIT_POLICY={args.omp_wait_policy}" if env else "default"
    (before, after), (before_texts, after_texts) = run_servers(args.model, [1, args.max_batch], args.users,
                                                               args.requests_per_user, args.max_tokens, env)
    both = sorted(set(before_texts) & set(after_texts))
    command = (f"python benchmarks/serve_load.py --model {args.model} --users {' '.join(map(str, args.users))}"
               f" --requests-per-user {args.requests_per_user} --max-tokens {args.max_tokens}"
               f" --max-batch {args.max_batch}" + (f" --omp-wait-policy {args.omp_wait_policy}" if env else ""))
    run = {"model": args.model, "max_tokens": args.max_tokens, "requests_per_user": args.requests_per_user,
           "queue": 8, "max_batch": args.max_batch, "cpu": f"{os.cpu_count()} CPU cores", "environment": env,
           "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count()},
           "command": command, "one_at_a_time": before, "batched": after, "goal_at_16_users": goal_at_16(before, after),
           "greedy_replies_identical": {"same": sum(before_texts[k] == after_texts[k] for k in both),
                                        "compared": len(both)}}
    saved = RESULTS / "serve_load.json"  # one run per OpenMP setting, kept across invocations
    runs = json.loads(saved.read_text())["runs"] if saved.exists() else {}
    runs[setting] = run
    saved.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    (RESULTS / "serve_load.partial.json").unlink(missing_ok=True)
    (RESULTS / "serve_load.md").write_text(markdown(runs))
    plot(runs)
    print(markdown(runs))


if __name__ == "__main__":
    main()
