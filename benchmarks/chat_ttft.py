"""Time to first token as a chat grows: with and without the kept key/value cache.

    .venv/bin/python benchmarks/chat_ttft.py [--model runs/sgd_respond] [--turns 30]

Plays a scripted user against the model (greedy, 16 new tokens a turn) and records, per turn,
the prompt length, the tokens served from the cache and the time to the first streamed token.
Writes benchmarks/results/chat_ttft.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def play(model: str, turns: int, reuse: bool) -> list[dict]:
    from dialogtune.chat import SCRIPTED_USER
    from dialogtune.infer import Conversation, Sampling, load_chat_model

    chat = load_chat_model(model)
    conversation = Conversation(chat, reuse_cache=reuse)
    sampling = Sampling(temperature=0, max_new_tokens=16)
    rows = []
    for turn in range(turns):
        reply = conversation.say(SCRIPTED_USER[turn % len(SCRIPTED_USER)], sampling)
        rows.append({"turn": turn + 1, "prompt_tokens": reply.prompt_tokens, "reused_tokens": reply.reused_tokens,
                     "first_token_ms": round(reply.first_token_seconds * 1000, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--turns", type=int, default=30)
    args = parser.parse_args()
    import torch

    with_cache = play(args.model, args.turns, reuse=True)
    without = play(args.model, args.turns, reuse=False)
    pick = [0, 9, 19, args.turns - 1]
    table = "| turn | prompt tokens | from cache | first token, cache kept | first token, no cache |\n|---|---|---|---|---|\n"
    for i in pick:
        a, b = with_cache[i], without[i]
        table += (f"| {a['turn']} | {a['prompt_tokens']} | {a['reused_tokens']} | {a['first_token_ms']:.0f} ms"
                  f" | {b['first_token_ms']:.0f} ms |\n")
    result = {"model": args.model, "turns": args.turns, "machine": {"platform": platform.platform(),
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "command": f"python benchmarks/chat_ttft.py --model {args.model} --turns {args.turns}",
              "with_cache": with_cache, "without_cache": without}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "chat_ttft.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "chat_ttft.md").write_text(f"# Time to first token, {args.model}\n\n{table}\nCommand: `{result['command']}`\n")
    print(table)


if __name__ == "__main__":
    main()
