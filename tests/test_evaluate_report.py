"""The line on what was cut to fit a model, as report.md and the terminal show it."""

from __future__ import annotations

from dialogtune.evaluate.report import cut_line


def report(**cut) -> dict:
    counts = {"context_length": 512, "prompt_limit": 506, "samples": 0, "tokens": 0, "heads_dropped": 0,
              "loss_samples": 0, "loss_tokens": 0, "loss_heads_dropped": 0}
    return {"model": "runs/samsum", "samples": 10, "cut": {**counts, **cut}}


def test_nothing_cut_says_nothing():
    assert cut_line(report()) is None


def test_the_cut_line_counts_cut_contexts_and_dropped_heads():
    assert cut_line(report(samples=2, tokens=300, loss_samples=2, loss_tokens=310)) == (
        "runs/samsum: context cut from the left, keeping the system message and instruction, in 2 of 10 prompts"
        " (300 tokens) to fit 506 tokens, and in 2 perplexity windows (310 tokens) to fit 512")
    assert cut_line(report(samples=2, tokens=300, heads_dropped=1, loss_samples=2, loss_tokens=310,
                           loss_heads_dropped=2)) == (
        "runs/samsum: context cut from the left, keeping the system message and instruction, in 2 of 10 prompts"
        " (300 tokens) to fit 506 tokens, and in 2 perplexity windows (310 tokens) to fit 512; the system message"
        " and instruction were cut too in 1 prompts and 2 windows (kept, they would take more than half the room"
        " or leave too little for the reply)")
