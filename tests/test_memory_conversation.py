"""A memory run's conversation: turns read into the memory, the window kept, states saved and refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dialogtune.errors import RunError
from dialogtune.memory.conversation import MemoryConversation, is_memory_run, load_memory_run
from dialogtune.tasks.memory import TURN_END


@pytest.fixture(scope="module")
def run(memory_run_dir):
    return load_memory_run(memory_run_dir)


LINES = ["How are the twins sleeping these days?", "Better than me, honestly.", "Come by for honey tea.",
         "I will, after my shift on Friday.", "Bring the twins too."]


def ids(run, text: str) -> list[int]:
    return run.tokenizer(text, add_special_tokens=False).input_ids


def test_the_run_is_recognised_and_a_run_without_memory_refused(run, memory_run_dir, tmp_path):
    assert is_memory_run(memory_run_dir) and is_memory_run(memory_run_dir / "final")
    assert run.speakers == ["A", "B"] and run.person_and_model == ("A", "B") and run.inputs.window == 16
    info = json.loads((memory_run_dir / "final" / "dialogtune.json").read_text())
    (tmp_path / "dialogtune.json").write_text(json.dumps({**info, "task": "respond", "memory": None}))
    assert not is_memory_run(tmp_path) and not is_memory_run(tmp_path / "missing")
    with pytest.raises(RunError, match="not a memory run \\(task respond\\)"):
        load_memory_run(tmp_path)


def test_reading_a_turn_writes_the_memory(run):
    initial = run.model.initial_memory(1)
    first, same, other = MemoryConversation(run), MemoryConversation(run), MemoryConversation(run)
    first.read("A", LINES[0])
    same.read("A", LINES[0])
    other.read("A", LINES[1])
    assert first.memory.shape == initial.shape == (1, 4, 32)
    assert not torch.allclose(first.memory, initial)
    assert torch.equal(first.memory, same.memory)  # a function of what was read
    assert not torch.allclose(first.memory, other.memory)
    assert first.turns == [{"prefix_ids": ids(run, "A:"), "text_ids": ids(run, f" {LINES[0]}{TURN_END}")}]
    assert first.turns_read == 1 and first.session == 1


def test_the_window_keeps_only_the_turns_it_reaches(run):
    conversation = MemoryConversation(run)
    every = []
    for index, line in enumerate(LINES):
        speaker = "AB"[index % 2]
        conversation.read(speaker, line)
        every.append(ids(run, f"{speaker}:") + ids(run, f" {line}{TURN_END}"))
    kept = [t["prefix_ids"] + t["text_ids"] for t in conversation.turns]
    assert kept == every[-len(kept):] and conversation.turns_read == 5
    # every kept turn but the oldest is within the window; the oldest is the one it reaches into
    assert sum(map(len, kept[1:])) < run.inputs.window <= sum(map(len, kept))
    assert len(kept) < len(every)
    window = [token for turn in every for token in turn][-run.inputs.window:]
    assert [token for turn in kept for token in turn][-run.inputs.window:] == window  # nothing the window reads lost


def test_a_reply_is_generated_from_the_memory_and_read(run):
    replies = []
    for _ in range(2):
        conversation = MemoryConversation(run)
        conversation.read("A", LINES[0])
        before = conversation.memory.clone()
        replies.append((conversation.reply("B", do_sample=False, max_new_tokens=6), conversation))
    (text, one), (again, two) = replies
    assert text == again and torch.equal(one.memory, two.memory)  # greedy: the same turn, the same memory
    assert not torch.allclose(one.memory, before)
    assert one.turns_read == 2 and one.turns[-1]["prefix_ids"] == ids(run, "B:")
    assert one.turns[-1]["text_ids"][-len(ids(run, TURN_END)):] == ids(run, TURN_END)


def test_a_new_session_opens_with_the_next_turn_once(run):
    conversation = MemoryConversation(run)
    conversation.new_session("2 days")  # nothing read: still session 1
    assert conversation.session == 1
    conversation.read("A", LINES[0])
    conversation.new_session("a week")
    conversation.new_session("2 days")  # asked twice: one session, the last gap
    assert conversation.session == 2
    conversation.read("A", LINES[1])
    assert conversation.turns[-1]["prefix_ids"] == ids(run, "[session 2, 2 days later]\nA:")
    conversation.read("B", LINES[2])
    assert conversation.turns[-1]["prefix_ids"] == ids(run, "B:") and conversation.session == 2


def test_a_saved_state_loads_whole_and_only_into_its_run(run, tmp_path):
    conversation = MemoryConversation(run)
    for line in LINES[:3]:
        conversation.read("A", line)
    conversation.new_session("3 hours")
    conversation.notes = {"messages": 3, "digest": "abc"}
    path = tmp_path / "deep" / "alice.mem"
    conversation.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["alice.mem"]  # no staging file left
    loaded = MemoryConversation.load(run, path)
    assert torch.equal(loaded.memory, conversation.memory) and loaded.turns == conversation.turns
    assert (loaded.turns_read, loaded.session, loaded.notes) == (3, 2, {"messages": 3, "digest": "abc"})
    loaded.read("A", LINES[3])  # the pending session line survived the file
    assert loaded.turns[-1]["prefix_ids"] == ids(run, "[session 2, 3 hours later]\nA:")

    fresh = tmp_path / "fresh.mem"
    MemoryConversation(run).save(fresh)  # nothing read: loads as a fresh start, not as a memory passed in
    assert MemoryConversation.load(run, fresh).memory is None

    other = dataclasses.replace(run, identity="0" * 24, location="runs/other")
    with pytest.raises(RunError, match=f"{path}: this memory was written by another model .* runs/other") as err:
        MemoryConversation.load(other, path)
    assert "Start afresh with another file (chat: --memory FILE; serve: --memory-dir DIR)" in str(err.value)
    (tmp_path / "junk.mem").write_bytes(b"not safetensors")
    with pytest.raises(RunError, match="junk.mem: not a dialogtune memory file"):
        MemoryConversation.load(run, tmp_path / "junk.mem")


def test_the_model_speaks_as_a_speaker_it_was_trained_as(run):
    assert dataclasses.replace(run, trained_as=["A"]).person_and_model == ("B", "A")
    assert dataclasses.replace(run, trained_as=[]).person_and_model == ("A", "B")


def test_a_run_trained_to_reset_each_session_starts_each_session_afresh(run):
    def talk(conversation, drop_memory_at_session=False):
        conversation.read("A", LINES[0])
        conversation.read("B", LINES[1])
        conversation.new_session("2 days")
        if drop_memory_at_session:
            conversation.memory = None
        conversation.read("A", LINES[2])
        return conversation.memory

    resetting = talk(MemoryConversation(dataclasses.replace(run, reset_each_session=True)))
    carrying = talk(MemoryConversation(run))
    by_hand = talk(MemoryConversation(run), drop_memory_at_session=True)
    assert torch.equal(resetting, by_hand) and not torch.allclose(resetting, carrying)
