"""The command line: quick flags, YAML + --set, clear errors with exit code 2."""

from __future__ import annotations

import json
import re

import yaml

from dialogtune.cli import main

CHATS = [{"messages": [{"role": "system", "content": "You are terse."},
                       {"role": "user", "content": f"Question {i}?"},
                       {"role": "assistant", "content": f"Answer {i}."}]} for i in range(6)]


def write_chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in CHATS) + "\n")
    return path


def test_prepare_with_quick_flags(tmp_path, tiny_model_dir, capsys):
    data = write_chats(tmp_path)
    code = main(["prepare", str(data), "--as", "assistant", "--model", str(tiny_model_dir), "--template", "chatml",
                 "--max-length", "64", "--pack", "--validation", "0", "-o", str(tmp_path / "out")])
    assert code == 0
    assert "prepared 6 dialogues -> 6 train / 0 validation examples" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert manifest["config"]["pack"] is True and manifest["max_length"] == 64


def test_prepare_from_yaml_with_set(tmp_path, tiny_model_dir, capsys):
    data = write_chats(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(f"data:\n  path: {data.name}\ntask:\n  as: assistant\nmodel:\n  name: {tiny_model_dir}\n"
                      f"template:\n  name: chatml\noutput: {tmp_path / 'out'}\n")
    assert main(["prepare", str(config), "--set", "split.validation=0.5"]) == 0
    assert "3 train / 3 validation" in capsys.readouterr().out


def test_inspect_marks_trained_tokens_with_brackets_when_piped(tmp_path, tiny_model_dir, capsys):
    data = write_chats(tmp_path)
    main(["prepare", str(data), "--as", "assistant", "--model", str(tiny_model_dir), "--template", "chatml",
          "--validation", "0", "-o", str(tmp_path / "out")])
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out"), "--index", "2"]) == 0
    shown = capsys.readouterr().out
    assert "train example 2 of 6" in shown and "trained tokens in [[double brackets]]" in shown
    assert "<|im_start|>user\nQuestion 2?<|im_end|>\n<|im_start|>assistant\n[[Answer 2.<|im_end|>]]" in shown
    assert main(["inspect", str(tmp_path / "out"), "--index", "6"]) == 2
    assert "out of range: this split has 6 examples" in capsys.readouterr().err


def test_user_errors_exit_2_with_a_message(tmp_path, tiny_model_dir, capsys):
    assert main(["prepare", str(tmp_path / "nope.jsonl"), "--as", "x", "--model", str(tiny_model_dir),
                 "--template", "chatml", "-o", str(tmp_path / "o")]) == 2
    assert "nope.jsonl: no such file or directory" in capsys.readouterr().err
    config = tmp_path / "job.yaml"
    config.write_text("data:\n  path: x.jsonl\ntemplte:\n  name: chatml\n")
    assert main(["prepare", str(config)]) == 2
    assert "did you mean 'template'" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a prepared dataset (no prepare.json)" in capsys.readouterr().err


def test_unknown_format_lists_the_known_ones(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data.bin"
    data.write_bytes(b"\x00\x01")
    code = main(["prepare", str(data), "--as", "x", "--model", str(tiny_model_dir), "--template", "chatml",
                 "--set", "data.format=tsv", "-o", str(tmp_path / "o")])
    assert code == 2
    assert "unknown format 'tsv'; known formats: msc, endoftext, transcript" in capsys.readouterr().err


def test_train_prints_the_summary_with_a_sample_reply(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"path": str(write_chats(tmp_path))}, "task": {"as": "assistant"}, "split": {"validation": 0.5},
        "model": {"name": str(tiny_model_dir)}, "template": {"name": "chatml"}, "max_length": 64,
        "output": str(tmp_path / "prepared"), "train": {"max_steps": 2, "logging_steps": 1, "report_to": []},
        "run_dir": str(tmp_path / "run"), "samples": 1}))
    assert main(["train", str(config)]) == 0
    shown = capsys.readouterr().out
    [sample] = json.loads((tmp_path / "run" / "summary.json").read_text())["samples"]
    question = sample["context"]
    assert re.fullmatch(r"Question \d\?", question)  # the user turn answered, not the system prompt
    assert sample["reference"] == question.replace("Question", "Answer").replace("?", ".")
    assert re.search(r"; last train loss \d+\.\d{4}; skipped steps 0\n", shown)
    assert f"  user: {question}\n  model: {sample['reply']}\n  (reference: {sample['reference']})" in shown


def test_index_and_retrieve(tmp_path, tiny_embedder_dir, capsys):
    from helpers import FIXTURES

    sgd = FIXTURES / "retrieval" / "sgd"
    exemplars = tmp_path / "exemplars.yaml"
    exemplars.write_text("Weather_1__GetWeather:\n  - template: Will it rain in <city>?\n")
    assert main(["index", str(sgd), "--exemplars", str(sgd), "--exemplars", str(exemplars),
                 "--embedder", str(tiny_embedder_dir), "-o", str(tmp_path / "index")]) == 0
    assert "indexed 5 functions and 5 exemplar templates" in capsys.readouterr().out
    assert main(["retrieve", str(tmp_path / "index"), "hail a cab to the airport", "--fusion", "union"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\d\. RideSharing_2__GetRide  \d\.\d{4}  .+\n     Get me a cab to <destination> for 2\.$", out,
                     re.MULTILINE), out
    assert main(["retrieve", str(tmp_path / "index"), "rain?", "--embedder", "minilm-l6-v2"]) == 2
    assert "built with the embedder" in capsys.readouterr().err
