"""Plain chat models behind `dialogtune serve --memory-dir`: one summary memory per user, kept
across requests and restarts.

    dialogtune serve runs/bob --memory-dir memories/

    client.chat.completions.create(model="bob", user="alice", messages=history)

A plain chat model reads its whole conversation at every reply. With `--memory-dir`, the server
keeps each user's conversation as `chat --memory FILE` does (a `SummaryMemory`: sessions, the
oldest replaced by a summary, written by the model itself, once the prompt no longer fits), and
answers from it rather than from the request alone. An OpenAI client sends the whole conversation
every time, so the server records, with the user's memory, how many of the request's non-system
messages it has taken and a digest of them, and applies the rule memory runs use
(`serve_memory.continuation`):

- A request that continues the last one (its first N non-system messages are the N taken, and
  more follow) brings only what follows: the assistant message right after them is taken as the
  reply the server gave (added to the memory when it was generated, and not again), the rest is
  added in order.
- Any other request (a shorter or a different history: a new conversation, an edited one, a
  client that sends only its newest message, a retried request) opens a new session of the same
  user's memory (`new_session()`), and all its messages are added. Earlier sessions are kept.
- The system prompt is the request's system messages joined (else the model's own), as without
  memory; system messages are not stored.
- Then the memory is fitted to the context (`SummaryMemory.fit`: earlier sessions summarised, then
  the current session's oldest messages dropped), the model replies to the memory's prompt, the
  reply is added and the memory saved, all under that user's lock. A prompt that cannot fit (a
  last message longer than the context) is a 400, and nothing is stored.
- Without `user`, a request is served as without `--memory-dir`: from its own messages, nothing
  stored. The chat page at / sends no user. Without `--memory-dir`, no memory is kept at all.

Files: `--memory-dir` holds one JSON file per user (the `chat --memory` format, with the notes
above in `notes`), named by a digest of the user id, written whole or not at all. The reply is
streamed as one piece (it is generated before the memory is saved).
"""

from __future__ import annotations

from pathlib import Path

from dialogtune.infer import ChatModel, Conversation, Sampling
from dialogtune.memory.summary import ModelSummarizer, SummaryMemory, load_summarizer
from dialogtune.memory.users import UserStates
from dialogtune.serve_memory import MemoryReply, Turn, continuation, taken_notes


class UserSummaries(UserStates):
    """One SummaryMemory per user, on disk (a JSON file named by a digest of the user id)."""

    def __init__(self, chat: ChatModel, directory: Path):
        super().__init__(directory, ".json", SummaryMemory.load, lambda: SummaryMemory(model=chat.name))
        self.chat = chat

    memory_for = UserStates.state_for


def take(memory: SummaryMemory, messages: list[Turn]) -> list[Turn]:
    """Add to `memory` what it has not taken of `messages` (see the module's contract), opening a new
    session when they do not continue the ones taken before; returns what was added."""
    following = continuation(memory.notes, messages)
    if following is None:
        memory.new_session()
        following = messages
    for role, content in following:
        memory.add(role, content)
    memory.notes = taken_notes(messages)
    return following


class SummaryReplier:
    def __init__(self, chat: ChatModel, directory: Path, summarizer: ModelSummarizer | None = None):
        self.chat = chat
        self.users = UserSummaries(chat, directory)
        self.summarizer = summarizer or load_summarizer(None, chat)

    def answer(self, messages: list[Turn], user: str, system_prompt: str | None, sampling: Sampling,
               timeout: float | None = None) -> MemoryReply:
        """`messages`: the request's user and assistant messages, in order, the last a user's;
        `system_prompt`: the request's (else the model's). Raises ConfigError when the prompt cannot
        fit, the user's file then unchanged."""
        with self.users.memory_for(user) as memory:
            take(memory, messages)
            memory.fit(self.chat, system_prompt, sampling.max_new_tokens, self.summarizer, self.summarizer.instruction)
            conversation = Conversation(self.chat, system_prompt=memory.system_text(system_prompt), reuse_cache=False)
            conversation.messages = memory.messages()
            reply = conversation.respond(sampling, max_time=timeout)
            memory.add("assistant", reply.raw)  # the next request's message after the taken ones: not added again
            self.users.save(user, memory)
        return MemoryReply(reply.text, reply.prompt_tokens, reply.new_tokens, "stop" if reply.stopped else "length")
