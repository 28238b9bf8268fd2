"""The chat REPL, driven through a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import sys
import warnings

import pexpect
import pytest
from helpers import load_without_dialogtune
from test_seq2seq_use import direct_reply

from dialogtune.chat import command, set_sampling
from dialogtune.cli import main
from dialogtune.infer import Conversation, Sampling

pytestmark = pytest.mark.usefixtures("tiny_run")


@pytest.fixture(scope="module")
def tiny_run(tiny_job_dir):
    return tiny_job_dir / "run"


@pytest.fixture(scope="module")
def plain(tiny_run):
    """The run loaded without dialogtune: base model plus adapter, tokenizer with the training template."""
    from transformers import AutoModelForCausalLM

    return load_without_dialogtune(tiny_run, AutoModelForCausalLM)


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    return pexpect.spawn(sys.executable, ["-m", "dialogtune", "chat", *args], env=env, encoding="utf-8",
                         timeout=120, dimensions=(40, 200))


def test_repl_streams_replies_and_handles_commands(tiny_run, plain, tmp_path):
    saved, again = tmp_path / "conversation.json", tmp_path / "again.json"
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
    child.expect_exact("Alice> ")
    child.sendline("What time is it?")
    child.expect_exact("Assistant: ")
    child.expect_exact("Alice> ")
    child.sendline("/save " + str(again))
    child.expect_exact("(saved 4 messages to")
    child.sendline("/help")
    child.expect_exact("/quit               leave")
    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense; /help lists them")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    question = {"role": "user", "content": "Where is the station?", "name": "Alice"}
    reply, _ = direct_reply(*plain, [question], 6)
    assert json.loads(saved.read_text()) == {"system": None, "messages": [
        question, {"role": "assistant", "content": reply, "name": "Assistant"}]}
    assert first_reply.replace("\r\n", "\n").startswith(reply)
    reloaded = json.loads(again.read_text())["messages"]  # the loaded conversation went on
    assert reloaded[:2] == json.loads(saved.read_text())["messages"]
    assert reloaded[2] == {"role": "user", "content": "What time is it?", "name": "Alice"}


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
    messages = [{"role": "user", "content": "Hi", "name": "Al"}, {"role": "assistant", "content": " Hello é"}]
    conversation = Conversation(chat=None, system_prompt="Be brief.", messages=list(messages))
    path = tmp_path / "saved.json"
    assert command(f"/save {path}", conversation, sampling) == f"(saved 2 messages to {path})"
    assert json.loads(path.read_text(encoding="utf-8")) == {"system": "Be brief.", "messages": messages}
    assert command("/reset", conversation, sampling) == "(conversation reset)" and conversation.messages == []
    conversation.system_prompt = None
    assert command(f"/load {path}", conversation, sampling) == f"(loaded 2 messages from {path})"
    assert (conversation.messages, conversation.system_prompt) == (messages, "Be brief.")


def test_a_chat_turn_emits_no_warnings(tiny_run, capsys):
    """transformers' deprecation warnings once landed in the middle of a reply."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["chat", str(tiny_run), "--play", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 2 and "Warning" not in out
