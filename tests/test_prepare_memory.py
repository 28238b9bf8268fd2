"""`prepare` for task: memory on MSC's release format: one row per dialogue, token pieces that
decode back to the turns, truncation counted and listed."""

from __future__ import annotations

import json

import datasets
from helpers import FIXTURES

from dialogtune.config import build_config
from dialogtune.prepare import prepare


def config(tmp_path, model_dir, **extra):
    raw = {"data": {"path": str(FIXTURES / "msc_parlai.jsonl")}, "task": {"name": "memory"},
           "split": {"validation": 0.34, "seed": 0}, "model": {"name": str(model_dir)}, "max_length": 64,
           "output": str(tmp_path / "prepared"), **extra}
    return build_config(raw)


def test_each_dialogue_is_one_row_of_turn_pieces_that_decode_to_the_transcript(tmp_path, tiny_model_dir,
                                                                              byte_tokenizer):
    done = prepare(config(tmp_path, tiny_model_dir), quiet=True)
    rows = [*datasets.load_from_disk(str(tmp_path / "prepared" / "train")).to_list(),
            *datasets.load_from_disk(str(tmp_path / "prepared" / "validation")).to_list()]
    assert sorted(r["dialogue_id"] for r in rows) == ["demo_1", "demo_2", "msc_parlai.jsonl#3"]
    demo = next(r for r in rows if r["dialogue_id"] == "demo_1")
    transcript = "".join(byte_tokenizer.decode(p) + byte_tokenizer.decode(t)
                         for p, t in zip(demo["prefix_ids"], demo["text_ids"]))
    assert transcript.startswith("A: Hi there! I just got stung")
    assert "\nB: Yes, twins, both girls!\n[session 3, 5 hours later]\nA: How are the twins sleeping" in transcript
    assert demo["sessions"] == [1, 1, 1, 1, 2, 2, 3, 3, 3]
    assert all(demo["trained"])
    stats = done.stats
    assert stats["splits"]["train"]["dialogues"] + stats["splits"]["validation"]["dialogues"] == 3
    assert stats["splits"]["validation"]["dialogues"] == 1
    assert stats["rejected"] == 1  # the malformed line, listed with its line number
    rejects = [json.loads(line) for line in (tmp_path / "prepared" / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["line"] == 2 and "malformed JSON" in rejects[0]["reason"]
    manifest = json.loads((tmp_path / "prepared" / "prepare.json").read_text())
    assert (manifest["task"], manifest["stop_strings"]) == ("memory", ["\n"])
    again = prepare(config(tmp_path, tiny_model_dir), quiet=True)
    assert again.cache_hit


def test_a_turn_longer_than_max_length_is_cut_counted_and_listed(tmp_path, tiny_model_dir):
    done = prepare(config(tmp_path, tiny_model_dir, max_length=12), quiet=True)
    cut = [json.loads(line) for line in (tmp_path / "prepared" / "rejects.jsonl").read_text().splitlines()
           if json.loads(line)["stage"] == "truncated"]
    assert done.stats["turns_too_long"] == len(cut) > 0
    assert "kept the first 12 (max_length)" in cut[0]["reason"] and "turn" in cut[0]["item"]
    rows = datasets.load_from_disk(str(tmp_path / "prepared" / "train")).to_list()
    assert max(len(p) + len(t) for r in rows for p, t in zip(r["prefix_ids"], r["text_ids"])) <= 12
