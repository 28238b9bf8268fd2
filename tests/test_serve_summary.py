"""`serve --memory-dir` on a plain chat model: one summary memory per `user`, kept on disk across
requests and restarts (dialogtune.serve_summary), tested with the `openai` client on loopback."""

from __future__ import annotations

import concurrent.futures
import dataclasses

import openai
import pytest
from test_serve import client, memory_server

from dialogtune.infer import load_chat_model
from dialogtune.memory.summary import SummaryMemory
from dialogtune.serve_memory import digest_of
from dialogtune.serve_summary import UserSummaries, take

SAMPLED = {"model": "tiny", "temperature": 1.0, "seed": 0, "max_tokens": 4}
ALICE = ["My bees made honey today.", "The lavender ones taste best.", "Shall I send you a jar?"]
BOB = ["My night bus broke down.", "The depot fixed it by dawn."]


@pytest.fixture(scope="module")
def chat(tiny_job_dir):
    return load_chat_model(str(tiny_job_dir / "run"))


def summary_server(chat, directory):
    return memory_server(chat, directory, "tiny")


def ask(url: str, user: str | None, messages: list[dict]):
    return client(url).chat.completions.create(messages=messages, **SAMPLED, **({"user": user} if user else {}))


def talk(url: str, user: str | None, lines: list[str], history: list | None = None, after=None) -> list:
    """Each line as the next user message of a growing conversation (as an OpenAI client sends it);
    `after(reply)` is called after each exchange."""
    messages = list(history or [])
    for line in lines:
        messages.append({"role": "user", "content": line})
        reply = ask(url, user, messages)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        if after:
            after(reply)
    return messages


def stored(store: UserSummaries, user: str) -> SummaryMemory:
    return SummaryMemory.load(store.path_for(user))


def pairs(memory: SummaryMemory) -> list[tuple[str, str]]:
    return [(m["role"], m["content"].strip()) for m in memory.messages()]


def test_each_user_keeps_only_their_own_conversation(chat, tmp_path):
    store = UserSummaries(chat, tmp_path / "memories")
    with summary_server(chat, store.directory) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        alice, bob = pool.map(lambda user, lines: talk(url, user, lines), ("alice", "bob"), (ALICE, BOB))
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(
        store.path_for(user).name for user in ("alice", "bob"))  # digests, never the ids
    for user, history in (("alice", alice), ("bob", bob)):
        memory = stored(store, user)
        assert len(memory.sessions) == 1 and memory.summary is None
        assert pairs(memory) == [(m["role"], m["content"].strip()) for m in history]  # theirs, nothing else
        asked = [(m["role"], m["content"]) for m in history[:-1]]  # the last request: all but its reply
        assert memory.notes == {"messages": len(asked), "digest": digest_of(asked)}


def test_a_continuing_request_adds_only_its_new_messages_and_survives_a_restart(chat, tmp_path):
    store = UserSummaries(chat, tmp_path / "memories")
    counts: list[int] = []
    with summary_server(chat, store.directory) as url:
        history = talk(url, "alice", ALICE, after=lambda _: counts.append(len(stored(store, "alice").messages())))
    assert counts == [2, 4, 6]  # each exchange: the new user message and the reply, nothing sent again

    with summary_server(chat, store.directory) as url:  # a new server over the same directory
        history = talk(url, "alice", ["Do you keep bees too?"], history)  # continues the stored session
        memory = stored(store, "alice")
        assert len(memory.sessions) == 1 and len(memory.messages()) == 8
        assert pairs(memory) == [(m["role"], m["content"].strip()) for m in history]
        talk(url, "alice", ["Hello again!"])  # a new conversation: a new session of the same memory
    memory = stored(store, "alice")
    assert [len(s) for s in memory.sessions] == [8, 2]
    assert memory.sessions[1][0]["content"] == "Hello again!"
    assert memory.notes["messages"] == 1


def test_a_request_without_user_writes_nothing(chat, tmp_path):
    directory = tmp_path / "memories"
    with summary_server(chat, directory) as url:
        messages = talk(url, None, ALICE[:2])
    assert len(messages) == 4 and not directory.exists()


def test_the_prompt_is_fitted_by_summarising_earlier_sessions(chat, tmp_path):
    small = dataclasses.replace(chat, context_length=320)  # a few short sessions overflow it
    store = UserSummaries(small, tmp_path / "memories")
    prompts: list[int] = []
    with summary_server(small, store.directory) as url:
        for number in range(6):  # each a new conversation: a new session
            talk(url, "carol", [f"Session {number}: my sister had twins.", "They never sleep at night."],
                 after=lambda reply: prompts.append(reply.usage.prompt_tokens))
        memory = stored(store, "carol")
        assert memory.summary is not None  # written by the model itself
        assert len(memory.sessions) < 6 and memory.sessions[-1][0]["content"].startswith("Session 5:")
        assert all(tokens + SAMPLED["max_tokens"] <= 320 for tokens in prompts)
        before = store.path_for("carol").read_bytes()
        with pytest.raises(openai.BadRequestError, match="over the 320-token context"):
            ask(url, "carol", [{"role": "user", "content": "word " * 200}])
    assert store.path_for("carol").read_bytes() == before  # refused: nothing stored


def test_take_follows_the_continuation_rule_of_memory_runs():
    memory = SummaryMemory(model="tiny")
    first = [("user", "Hi, I keep bees.")]
    assert take(memory, first) == first
    memory.add("assistant", "Lovely!")  # the reply the server gave
    second = [*first, ("assistant", "Lovely!"), ("user", "They made honey.")]
    assert take(memory, second) == [("user", "They made honey.")]
    assert take(memory, [("user", "Hello again")]) == [("user", "Hello again")]  # not a continuation
    assert [len(s) for s in memory.sessions] == [3, 1]
