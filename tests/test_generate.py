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


def test_openai_text_parts_read_as_their_joined_text(tiny_run, tmp_path):
    parts = [{"type": "text", "text": "Where is "}, {"type": "text", "text": "the station?"}]
    rows = [{"id": "parts", "messages": [{"role": "user", "content": parts}]},
            {"id": "text", "messages": [{"role": "user", "content": "Where is the station?"}]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["generate", str(tiny_run / "run"), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--max-new-tokens", "6"]) == 0
    written = read(tmp_path / "out.jsonl")
    assert [r["messages"] for r in written] == [r["messages"] for r in rows]  # the input kept as it was
    assert written[0]["reply"] == written[1]["reply"] and written[0]["stopped"] == written[1]["stopped"]


def test_a_developer_message_is_the_system_message(tiny_run, tmp_path):
    from dialogtune.generate import prompts_from_jsonl
    from dialogtune.infer import load_chat_model

    rows = [{"messages": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Where is the station?"}]}
            for role in ("developer", "system")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = load_chat_model(str(tiny_run / "run"))
    records, prompts = prompts_from_jsonl(chat, tmp_path / "in.jsonl")
    assert prompts[0] == prompts[1]  # rendered as the same system message
    assert "<|im_start|>system\nBe brief.<|im_end|>" in chat.tokenizer.decode(prompts[0])
    assert records[0]["messages"][0]["role"] == "developer"  # the input kept as it was


@pytest.mark.parametrize(("message", "said"), [
    ({"role": "user"}, "messages[1]: no 'content'"),
    ({"role": "robot", "content": "hi"}, "messages[1]: role 'robot': expected one of system, user, assistant"),
    ({"content": "hi"}, "messages[1]: role none: expected one of system, user, assistant"),
    ("hi", "messages[1]: expected an object with 'role' and 'content', got str"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     "messages[1]: content: part type(s) image_url not supported (only text parts are)"),
    ({"role": "user", "content": 7}, ("messages[1]: content: expected a string or a list of content parts,"
                                      " got a number")),
    ({"role": "user", "content": "hi", "name": 3}, "messages[1]: name: expected a string, got int"),
])
def test_a_bad_message_is_named_by_line_and_index(tiny_run, tmp_path, capsys, message, said):
    good = {"messages": [{"role": "user", "content": "hi"}]}
    bad = {"messages": [{"role": "system", "content": "Be brief."}, message]}
    (tmp_path / "in.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert main(["generate", str(tiny_run / "run"), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err == f"dialogtune generate: error: {tmp_path / 'in.jsonl'}:2: {said}\n"


def test_a_pad_token_inside_a_reply_is_not_its_end(tiny_run):
    """An untrained model can sample the pad token mid-reply; only a stop or an end token ends one
    (generate pads the rows that ended to the batch's width)."""
    import torch

    from dialogtune.generate import generate_replies
    from dialogtune.infer import Sampling, load_chat_model

    chat = load_chat_model(str(tiny_run / "run"))
    tokenizer = chat.tokenizer
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    word = tokenizer(" there", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    written = [[word[0], pad, word[0], word[0]], [word[0], eos, pad, pad]]
    prompt = tokenizer("Hi", add_special_tokens=False)["input_ids"]

    def generate(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor(written)], dim=1)

    chat.model.generate = generate
    replies = generate_replies(chat, [prompt, prompt], Sampling(temperature=0, max_new_tokens=4), quiet=True)
    assert replies == [("there there there", False), ("there", True)]


def test_prompts_that_leave_no_room_for_the_reply_are_refused(tiny_run, tmp_path, capsys):
    lines = [{"messages": [{"role": "user", "content": "Where is the station?"}]},
             {"messages": [{"role": "user", "content": "Hello there! " * 200}]}]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["generate", str(tiny_run / "run"), "--input", str(tmp_path / "long.jsonl"),
                 "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert ("1 of 2 prompts leave no room for --max-new-tokens 64 in the model's context of 512 tokens (the first:"
            " number 2, ") in err
    assert not (tmp_path / "o.jsonl").exists()
