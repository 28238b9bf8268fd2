"""Memory runs behind `dialogtune serve`: one memory per user, kept across requests and restarts.

    dialogtune serve runs/msc-memory --memory-dir memories/

    client.chat.completions.create(model="msc-memory", user="alice", messages=history)

A memory model reads each turn once, into a fixed-size memory; it never re-reads a history. An
OpenAI client sends the whole conversation every time, so the server remembers, per user, how
many of the request's messages it has read (and a digest of them), stored with the user's memory:

- A request that continues the last one (its first N messages are the N read) brings only what
  follows: the assistant message right after them is taken as the reply the server gave (read
  into the memory when it was generated, and not again), the rest is read in order.
- Any other request (a shorter or a different history: a new conversation, an edited one, a
  client that sends only its newest message, a retried request) is a new session of the same
  user: the memory is kept, the next turn opens a new session, and every message is read.
- User messages are read as the run's first speaker, assistant messages as its second (who the
  model speaks as); system messages are not read: memory runs are trained without one.
- The last message (a user's) is read, then the reply is generated from the memory and the
  window of recent tokens, read, and the user's memory saved, all under that user's lock.
- Without `user`, a request gets a fresh memory that reads its whole conversation, and nothing
  is stored. The chat page at / sends no user.

Files: `--memory-dir` (default RUN/memories) holds one state file per user, named by a digest of
the user id. A state only loads into the run that wrote it. The reply is streamed as one piece
(a memory model's reply is generated whole) and `finish_reason` is always "stop".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dialogtune.memory.conversation import MemoryConversation, MemoryRun
from dialogtune.memory.users import UserMemories

Turn = tuple[str, str]  # (role, content): "user" or "assistant"


def default_memory_dir(run: MemoryRun) -> Path:
    """RUN/memories, beside the run's final/."""
    return Path(run.location).parent / "memories"


def digest_of(messages: list[Turn]) -> str:
    return hashlib.blake2b(json.dumps(messages, ensure_ascii=False).encode("utf-8"), digest_size=16).hexdigest()


def continuation(notes: dict[str, Any], messages: list[Turn]) -> list[Turn] | None:
    """What `messages` bring after the ones `notes` ({"messages": N, "digest": ...}) record as taken,
    when they continue them: their first N are those N, and more follow; the assistant message right
    after them is the reply the server gave (already taken), so it is left out. None when they do
    not continue (a new session). The rule of serve's per-user memories, memory runs and plain
    models alike."""
    taken, digest = notes.get("messages", 0), notes.get("digest")
    if taken and len(messages) > taken and digest_of(messages[:taken]) == digest:
        following = messages[taken:]
        return following[1:] if following[0][0] == "assistant" else following
    return None


def taken_notes(messages: list[Turn]) -> dict[str, Any]:
    """The notes recording `messages` as taken (what `continuation` reads)."""
    return {"messages": len(messages), "digest": digest_of(messages)}


def unread(conversation: MemoryConversation, messages: list[Turn]) -> list[Turn]:
    """The request's messages the memory has not read (see the module's contract); opens a new
    session when the request does not continue the one read before."""
    following = continuation(conversation.notes, messages)
    if following is not None:
        return following
    conversation.new_session()
    return messages


def reply_room(run: MemoryRun) -> int:
    """Tokens a reply may have: positions left after the memory's read and write slots, the
    window, and a speaker prefix with a session line."""
    model = run.model
    return model.config.max_position_embeddings - 2 * model.memory_slots - run.inputs.window - 32


@dataclass
class MemoryReply:
    text: str
    prompt_tokens: int  # tokens of the messages read for this request
    completion_tokens: int
    finish: str = "stop"  # a memory run's reply is generated whole


class MemoryReplier:
    def __init__(self, run: MemoryRun, directory: Path):
        self.run = run
        self.users = UserMemories(run, directory)
        person, model = run.person_and_model
        self.speakers = {"user": person, "assistant": model}

    def answer(self, messages: list[Turn], user: str | None, generate_kwargs: dict[str, Any],
               seed: int | None = None) -> MemoryReply:
        """`messages`: the request's user and assistant messages, in order, the last a user's."""
        if not user:
            return self._turn(MemoryConversation(self.run), messages, generate_kwargs, seed)
        with self.users.conversation_for(user) as conversation:
            reply = self._turn(conversation, unread(conversation, messages), generate_kwargs, seed)
            conversation.notes = taken_notes(messages)
            self.users.save(user, conversation)
        return reply

    def _turn(self, conversation: MemoryConversation, messages: list[Turn], generate_kwargs: dict[str, Any],
              seed: int | None) -> MemoryReply:
        tokenizer = self.run.tokenizer
        for role, content in messages:
            conversation.read(self.speakers[role], content)
        if seed is not None:
            torch.manual_seed(seed)
        text = conversation.reply(self.speakers["assistant"], **generate_kwargs)
        read = sum(len(tokenizer(content, add_special_tokens=False).input_ids) for _, content in messages)
        return MemoryReply(text, read, len(tokenizer(text, add_special_tokens=False).input_ids))
