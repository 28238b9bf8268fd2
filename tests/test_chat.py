"""The chat REPL, driven through a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pexpect
import pytest

from dialogtune.chat import command, set_sampling
from dialogtune.infer import Sampling

pytestmark = pytest.mark.usefixtures("tiny_run")


@pytest.fixture(scope="module")
def tiny_run(tiny_job_dir):
    return tiny_job_dir / "run"


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    return pexpect.spawn(sys.executable, ["-m", "dialogtune", "chat", *args], env=env, encoding="utf-8",
                         timeout=120, dimensions=(40, 200))


def test_repl_streams_replies_and_handles_commands(tiny_run, tmp_path):
    saved = tmp_path / "conversation.json"
    child = spawn(str(tiny_run), "--user", "Alice", "--temperature", "0", "--max-new-tokens", "6")
    child.expect("chatting with .* as Assistant \\(template chatml\\); /help for commands")
    child.expect_exact("Alice> ")
    child.sendline("Where is the station?")
    child.expect_exact("Assistant: ")
    child.expect_exact("Alice> ")
    first_reply = child.before
    assert "<|im_end|>" not in first_reply and first_reply.strip()
    child.sendline("/set max_new_tokens 3")
    child.expect_exact("max_new_tokens = 3")
    child.sendline("/save " + str(saved))
    child.expect_exact("(saved 2 messages to")
    child.sendline("/reset")
    child.expect_exact("(conversation reset)")
    child.sendline("/load " + str(saved))
    child.expect_exact("(loaded 2 messages from")
    child.sendline("/help")
    child.expect_exact("/quit               leave")
    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense; /help lists them")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "Where is the station?"


def test_play_runs_a_scripted_user_and_exits(tiny_run):
    child = spawn(str(tiny_run), "--play", "2", "--temperature", "0", "--max-new-tokens", "4")
    child.expect_exact("User> Hello! Can you help me find a restaurant for tonight?")
    child.expect_exact("User> Something Italian, near the center.")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_settings_and_commands_without_a_terminal(tmp_path):
    sampling = Sampling()
    assert set_sampling(sampling, "temperature", "0") == "temperature = 0.0" and sampling.temperature == 0
    assert set_sampling(sampling, "top_k", "x") == "top_k needs a number, got 'x'"
    assert set_sampling(sampling, "heat", "1").startswith("unknown setting 'heat'")
    assert command("/load " + str(tmp_path / "missing.json"), None, sampling).startswith("cannot load")
    assert command("/quit", None, sampling) is None
    assert Path(tmp_path).exists()
