"""The chat REPL, driven through a real pseudo-terminal."""

from __future__ import annotations

import dataclasses
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
from dialogtune.infer import Conversation, Sampling, load_chat_model

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


def quit_chat(child, user: str) -> None:
    """At the next prompt, /quit; the chat must end cleanly (exit status 0)."""
    child.expect_exact(f"{user}> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# -- memory runs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_run(memory_run_dir):
    from dialogtune.memory.conversation import load_memory_run

    return load_memory_run(memory_run_dir)


SAMPLED = ("--temperature", "1", "--seed", "0", "--max-new-tokens", "4")  # greedy replies of the tiny run are empty


def sampled_turns(conversation, lines: list[str]) -> list[str]:
    """What the REPL does with each line under SAMPLED (A speaks, B replies), in process."""
    import torch

    replies = []
    for line in lines:
        conversation.read("A", line)
        torch.manual_seed(0)
        replies.append(conversation.reply("B", **Sampling(temperature=1, max_new_tokens=4).generate_kwargs()))
    return replies


def test_a_memory_chat_goes_on_from_its_file_after_a_restart(memory_run_dir, memory_run, tmp_path):
    import torch

    from dialogtune.memory.conversation import MemoryConversation

    path = tmp_path / "alice.mem"
    child = spawn(str(memory_run_dir), "--memory", str(path), *SAMPLED)
    child.expect_exact("chatting with run (a memory run: 4 memory slots, a window of 16 tokens) as B; you are A")
    child.expect_exact(f"memory: {path}, 0 turns read, session 1")
    shown = []
    for line in ["How are the twins sleeping?", "Come by for honey tea."]:
        child.expect_exact("A> ")
        child.sendline(line)
        child.expect_exact("B: ")
        child.expect_exact("\r\n")
        shown.append(child.before)
    quit_chat(child, "A")
    first = MemoryConversation.load(memory_run, path)
    expected = MemoryConversation(memory_run)
    assert shown == sampled_turns(expected, ["How are the twins sleeping?", "Come by for honey tea."]) and all(shown)
    assert (first.turns_read, first.session) == (4, 1) and first.turns == expected.turns
    assert torch.allclose(first.memory, expected.memory, atol=1e-6)

    child = spawn(str(memory_run_dir), "--memory", str(path), *SAMPLED)
    child.expect_exact(f"memory: {path}, 4 turns read, session 1")
    child.expect_exact("A> ")
    child.sendline("/session 2 days")
    child.expect_exact("(session 2 starts with the next turn)")
    child.expect_exact("A> ")
    child.sendline("Did the twins like the tea?")
    child.expect_exact("B: ")
    quit_chat(child, "A")
    second = MemoryConversation.load(memory_run, path)
    first.new_session("2 days")  # the loaded memory, taken on in process, is where the restarted chat went on
    sampled_turns(first, ["Did the twins like the tea?"])
    assert (second.turns_read, second.session) == (6, 2) and second.turns == first.turns
    assert torch.allclose(second.memory, first.memory, atol=1e-6)
    starts = memory_run.tokenizer.decode(second.turns[-2]["prefix_ids"])
    assert starts == "[session 2, 2 days later]\nA:"


def test_memory_chat_commands(memory_run, tmp_path):

    from dialogtune.chat import MemoryChat, memory_command
    from dialogtune.memory.conversation import MemoryConversation

    sampling = Sampling()
    path = tmp_path / "bob.mem"
    chat = MemoryChat(memory_run, path)
    assert not path.exists() and chat.where() == f"memory: {path}, 0 turns read, session 1"
    assert memory_command("/session", chat, sampling) == "(nothing read yet: the first turn opens session 1)"
    chat.conversation.read("A", "Hello there")
    chat.keep()
    assert memory_command("/session 3 days", chat, sampling) == "(session 2 starts with the next turn)"
    assert MemoryConversation.load(memory_run, path).session == 2  # kept at once
    copy = tmp_path / "copy.mem"
    assert memory_command(f"/save {copy}", chat, sampling) == f"(saved the memory, 1 turns read, to {copy})"
    assert memory_command("/reset", chat, sampling) == f"(memory reset); {path} holds the fresh memory"
    reset = MemoryConversation.load(memory_run, path)
    assert (reset.turns_read, reset.session, reset.turns) == (0, 1, [])
    assert reset.memory is None  # a fresh start
    assert memory_command(f"/load {copy}", chat, sampling) == f"(loaded the memory, 1 turns read, from {copy})"
    assert MemoryConversation.load(memory_run, path).turns_read == 1  # the loaded memory is kept in --memory's file
    other = MemoryChat(dataclasses.replace(memory_run, identity="f" * 24), None)
    assert memory_command(f"/load {copy}", other, sampling).startswith(f"cannot load: {copy}: this memory was written")
    assert other.where().startswith("memory: this process only, 0 turns read")
    assert memory_command("/set temperature 0", chat, sampling) == "temperature = 0.0"
    assert "/session [GAP]" in memory_command("/help", chat, sampling)
    assert memory_command("/quit", chat, sampling) is None
    assert memory_command("/nonsense", chat, sampling) == "unknown command /nonsense; /help lists them"


# -- any other model: the conversation kept, earlier sessions summarised -------------------


def test_a_plain_chat_with_memory_goes_on_from_its_file_after_a_restart(tiny_run, plain, tmp_path):
    path = tmp_path / "alice.json"
    child = spawn(str(tiny_run), "--memory", str(path), "--user", "Alice", "--temperature", "0",
                  "--max-new-tokens", "6")
    child.expect_exact("earlier sessions are summarised by itself when the conversation no longer fits")
    child.expect_exact(f"memory: {path}, 1 session, 0 messages, no summary yet")
    for line in ["Where is the station?", "What time is it?"]:
        child.expect_exact("Alice> ")
        child.sendline(line)
        child.expect_exact("Assistant: ")
    quit_chat(child, "Alice")
    first = json.loads(path.read_text(encoding="utf-8"))
    assert (first["format"], first["model"], first["summary"]) == ("dialogtune-summary-memory/1", str(tiny_run), None)
    (session,) = first["sessions"]
    assert [(m["role"], m["name"]) for m in session] == [("user", "Alice"), ("assistant", "Assistant")] * 2
    assert [session[0]["content"], session[2]["content"]] == ["Where is the station?", "What time is it?"]
    assert session[1]["content"] == direct_reply(*plain, session[:1], 6)[0]

    child = spawn(str(tiny_run), "--memory", str(path), "--user", "Alice", "--temperature", "0",
                  "--max-new-tokens", "6")
    child.expect_exact(f"memory: {path}, 1 session, 4 messages, no summary yet")
    child.expect_exact("Alice> ")
    child.sendline("/session")
    child.expect_exact("(a new session starts with the next turn)")
    child.expect_exact("Alice> ")
    child.sendline("Is the station far?")
    child.expect_exact("Assistant: ")
    quit_chat(child, "Alice")
    second = json.loads(path.read_text(encoding="utf-8"))
    assert second["sessions"][0] == session and len(second["sessions"]) == 2
    question = {"role": "user", "content": "Is the station far?", "name": "Alice"}
    assert second["sessions"][1][0] == question
    # The reply was written after reading the restored conversation, not the new session alone.
    assert second["sessions"][1][1]["content"] == direct_reply(*plain, [*session, question], 6)[0]


def test_plain_memory_chat_commands(tiny_run, tmp_path):
    from dialogtune.chat import SummaryChat, memory_command
    from dialogtune.memory.summary import ModelSummarizer, SummaryMemory

    chat = load_chat_model(str(tiny_run))
    sampling, path = Sampling(), tmp_path / "bob.json"
    conversation = Conversation(chat)
    talk = SummaryChat(chat, path, ModelSummarizer(chat), None, conversation)
    assert not path.exists() and talk.where() == f"memory: {path}, 1 session, 0 messages, no summary yet"
    assert memory_command("/session", talk, sampling) == (
        "(nothing said in this session yet: the next turn goes on in it)")
    talk.memory.add("user", "Hello there", "User")
    assert memory_command("/session", talk, sampling) == "(a new session starts with the next turn)"
    assert SummaryMemory.load(path).sessions == [[{"role": "user", "content": "Hello there", "name": "User"}], []]
    copy = tmp_path / "copy.json"
    said = memory_command(f"/save {copy}", talk, sampling)
    assert said == f"(saved the memory, 2 sessions, 1 messages, no summary yet, to {copy})"
    assert memory_command("/reset", talk, sampling) == f"(memory reset); {path} holds the fresh memory"
    assert SummaryMemory.load(path) == SummaryMemory(model=str(tiny_run))
    said = memory_command(f"/load {copy}", talk, sampling)
    assert said == f"(loaded the memory, 2 sessions, 1 messages, no summary yet, from {copy})"
    assert len(SummaryMemory.load(path).sessions) == 2  # the loaded memory is kept in --memory's file
    copy.write_text("{not json", encoding="utf-8")
    assert memory_command(f"/load {copy}", talk, sampling).startswith(
        f"cannot load: {copy}: not a dialogtune summary memory (malformed JSON")
    assert memory_command(f"/load {tmp_path / 'none.json'}", talk, sampling).endswith("no such file")
    assert memory_command("/set temperature 0", talk, sampling) == "temperature = 0.0"
    assert "/session            the next turn" in memory_command("/help", talk, sampling)
    assert memory_command("/quit", talk, sampling) is None
    assert memory_command("/nonsense", talk, sampling) == "unknown command /nonsense; /help lists them"


def test_a_summary_model_needs_a_memory_file(tiny_run, capsys):
    assert main(["chat", str(tiny_run), "--summary-model", str(tiny_run)]) == 2
    assert f"--summary-model {tiny_run}: summaries are written only for a conversation kept with --memory FILE" in (
        capsys.readouterr().err)


def test_a_memory_run_takes_no_summary_model(memory_run_dir, tmp_path, capsys):
    args = ["chat", str(memory_run_dir), "--memory", str(tmp_path / "x.mem"), "--summary-model", "m"]
    assert main(args) == 2
    assert "drop --system, --load-in-8bit, --load-in-4bit and --summary-model" in capsys.readouterr().err
    assert not (tmp_path / "x.mem").exists()


def test_a_memory_run_file_is_refused_by_a_plain_chat(tiny_run, memory_run, tmp_path, capsys):
    from dialogtune.memory.conversation import MemoryConversation

    path = tmp_path / "alice.mem"
    MemoryConversation(memory_run).save(path)
    assert main(["chat", str(tiny_run), "--memory", str(path), "--play", "1"]) == 2
    assert f"{path}: a memory run's memory file (dialogtune-memory/1)" in capsys.readouterr().err
