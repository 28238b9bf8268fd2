"""Batch generation: every input kept, order kept, greedy and deterministic, batching invisible."""

from __future__ import annotations

import json
import os
import sys

import pexpect
import pytest

from dialogtune.cli import main
from dialogtune.generate import cut_at_stops


@pytest.fixture(scope="module")
def tiny_run(tiny_job_dir):
    return tiny_job_dir


def write_inputs(path, count=7):
    rows = [{"id": i, "messages": [{"role": "user", "content": "Where is the station? " * (1 + i % 3)}]}
            for i in range(count)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_keeps_fields_and_order_and_batching_changes_nothing(tiny_run, tmp_path, capsys):
    rows = write_inputs(tmp_path / "in.jsonl")
    run = str(tiny_run / "run")
    for size, name in ((1, "one.jsonl"), (4, "four.jsonl")):
        assert main(["generate", run, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / name),
                     "--batch-size", str(size), "--max-new-tokens", "8"]) == 0
    one, four = read(tmp_path / "one.jsonl"), read(tmp_path / "four.jsonl")
    assert [r["id"] for r in one] == [r["id"] for r in rows]
    assert all(r["messages"] == row["messages"] and isinstance(r["reply"], str) for r, row in zip(one, rows))
    assert [r["reply"] for r in one] == [r["reply"] for r in four]  # left padding is invisible
    assert "7 replies ->" in capsys.readouterr().out


def test_generate_over_a_prepared_validation_split(tiny_run, tmp_path):
    assert main(["generate", str(tiny_run / "run"), "--input", str(tiny_run / "prepared"),
                 "--output", str(tmp_path / "val.jsonl"), "--max-new-tokens", "4"]) == 0
    records = read(tmp_path / "val.jsonl")
    assert len(records) == 6  # 24 conversations, a quarter held out
    assert all(r["reference"] and r["context"].endswith("<|im_start|>assistant\n") for r in records)


def test_bad_input_is_named(tiny_run, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    assert main(["generate", str(tiny_run / "run"), "--input", str(tmp_path / "bad.jsonl"),
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:1: expected a non-empty list field 'messages'" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    assert main(["generate", str(tiny_run / "run"), "--input", str(tmp_path / "broken.jsonl"),
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "broken.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_a_terminal_shows_progress_with_rate_and_time_left(tiny_run, tmp_path):
    write_inputs(tmp_path / "in.jsonl")
    child = pexpect.spawn(sys.executable, ["-m", "dialogtune", "generate", str(tiny_run / "run"), "--input",
                                           str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                                           "--batch-size", "2", "--max-new-tokens", "4"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, encoding="utf-8", timeout=120)
    child.expect(r"generate: 100%\S* 7/7 \[\d\d:\d\d<\d\d:\d\d, [\d.]+ samples/s\]")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_cut_at_stops():
    assert cut_at_stops("Fine.\nAlice: hi", ["\nAlice:", "<|im_end|>"]) == ("Fine.", True)
    assert cut_at_stops("Fine.", ["\nAlice:"]) == ("Fine.", False)
