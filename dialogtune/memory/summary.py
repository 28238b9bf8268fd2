"""A plain chat model's long conversation, kept across sessions and restarts: when the whole no
longer fits the model's context, its earliest sessions are replaced by a summary.

    memory = SummaryMemory.load(path) if path.exists() else SummaryMemory(model=chat.name)
    memory.add("user", "My sister just had twins.", "Alice")
    made_room = memory.fit(chat, system_prompt, reply_tokens=128, summarize=load_summarizer(None, chat))
    messages = memory.prompt_messages(system_prompt)   # what the model reads for its next reply
    memory.save(path)

What the model reads: one system message (the system prompt, then "Earlier conversations,
summarised: ..." once there is a summary), then every message of the sessions still kept.

`fit` measures that prompt as the model will read it (the chat template's rendering, tokenized)
and, while it plus the room for the reply exceeds the context, makes room: first by folding the
oldest kept session (never the current one) into the summary, one session per call of
`summarize`, which reads the summarize task's own request (its instruction, then the dialogue as
`Name: text` lines) opening with the previous summary, so what was summarised before is carried
on; then, once only the current session is left, by dropping its oldest messages, counted in
what `fit` returns. A prompt that still cannot fit (a last message longer than the context) is an
error, never a silent overflow.

`summarize` is any `text -> summary` callable; `ModelSummarizer` is the one chat uses: the chat
model itself, a summarize run or any chat model, prompted as the summarize task prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialogtune.dialogue import Dialogue, Turn
from dialogtune.errors import ConfigError, ModelError, RunError
from dialogtune.files import write_json
from dialogtune.infer import ChatModel, Conversation, Sampling, load_chat_model
from dialogtune.tasks.summarize import DEFAULT_INSTRUCTION, summary_request

FORMAT = "dialogtune-summary-memory/1"
SUMMARY_LEAD = "Earlier conversations, summarised:"
SUMMARY_TOKENS = 128  # the longest summary, unless a quarter of the reading model's context is less

Message = dict[str, str]


@dataclass
class MadeRoom:
    """What `fit` did so that the next prompt and its reply fit the context."""

    sessions_summarised: int = 0
    messages_dropped: int = 0  # of the current session, oldest first
    prompt_tokens: int = 0  # the prompt as it now is

    def notes(self) -> list[str]:
        said = []
        if self.sessions_summarised:
            said.append(f"({self.sessions_summarised} earlier session(s) replaced by a summary to make room)")
        if self.messages_dropped:
            said.append(f"({self.messages_dropped} oldest message(s) of this session dropped: the session alone"
                        " no longer fits the context)")
        return said


@dataclass
class SummaryMemory:
    model: str  # the model it was written with (as named to chat)
    sessions: list[list[Message]] = field(default_factory=lambda: [[]])  # oldest first; the last is current
    summary: str | None = None  # of the sessions folded away
    notes: dict[str, Any] = field(default_factory=dict)  # kept for its user (what `serve` has taken); JSON

    @property
    def current(self) -> list[Message]:
        return self.sessions[-1]

    def add(self, role: str, content: str, name: str | None = None) -> None:
        self.current.append({"role": role, "content": content, **({"name": name} if name else {})})

    def new_session(self) -> bool:
        """The next message opens a new session; False (and nothing changes) while the current one is
        empty: never an empty session."""
        if not self.current:
            return False
        self.sessions.append([])
        return True

    def messages(self) -> list[Message]:
        return [m for session in self.sessions for m in session]

    def describe(self) -> str:
        sessions = len(self.sessions)
        summary = "a summary of earlier sessions" if self.summary is not None else "no summary yet"
        return f"{sessions} session{'s' * (sessions != 1)}, {len(self.messages())} messages, {summary}"

    def system_text(self, system_prompt: str | None) -> str | None:
        parts = [system_prompt] if system_prompt else []
        if self.summary:
            parts.append(f"{SUMMARY_LEAD} {self.summary}")
        return "\n\n".join(parts) or None

    def prompt_messages(self, system_prompt: str | None) -> list[Message]:
        system = self.system_text(system_prompt)
        return ([{"role": "system", "content": system}] if system else []) + self.messages()

    def prompt_tokens(self, chat: ChatModel, system_prompt: str | None) -> int:
        text = chat.render(self.prompt_messages(system_prompt))
        return len(chat.tokenizer(text, add_special_tokens=False)["input_ids"])

    def request_for(self, session: list[Message], instruction: str = DEFAULT_INSTRUCTION) -> str:
        """The summarize task's request for `session`, opening with the summary so far."""
        earlier = [Turn(None, f"{SUMMARY_LEAD} {self.summary}")] if self.summary else []
        turns = [Turn(m.get("name") or m["role"].capitalize(), m["content"].strip()) for m in session]
        return summary_request(Dialogue("earlier-sessions", earlier + turns), instruction)

    def fit(self, chat: ChatModel, system_prompt: str | None, reply_tokens: int, summarize: Callable[[str], str],
            instruction: str = DEFAULT_INSTRUCTION) -> MadeRoom:
        """Make the next prompt and a reply of `reply_tokens` fit `chat`'s context (see the module)."""
        made = MadeRoom()
        while True:
            tokens = self.prompt_tokens(chat, system_prompt)
            if chat.reply_room(tokens) >= reply_tokens:
                made.prompt_tokens = tokens
                return made
            if len(self.sessions) > 1:
                if self.sessions[0]:  # summarised before it goes: a summarizer that fails loses nothing
                    self.summary = summarize(self.request_for(self.sessions[0], instruction)).strip()
                    made.sessions_summarised += 1
                del self.sessions[0]
            elif len(self.current) > 1:
                # The oldest exchange goes, so that the session still opens with the user (as Conversation does).
                del self.current[0]
                made.messages_dropped += 1
                while len(self.current) > 1 and self.current[0]["role"] == "assistant":
                    del self.current[0]
                    made.messages_dropped += 1
            else:
                raise ConfigError(
                    f"the next prompt takes {tokens} tokens (system prompt, summary of earlier sessions and the last"
                    f" message) and a reply {reply_tokens} more: over the {chat.context_length}-token context of"
                    f" {chat.name}; send a shorter message, lower max_new_tokens (/set max_new_tokens N) or /reset")

    # -- files ------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Written whole or not at all (a kill mid-write leaves the previous file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"format": FORMAT, "model": self.model, "summary": self.summary, "sessions": self.sessions,
                          **({"notes": self.notes} if self.notes else {})})

    @classmethod
    def load(cls, path: Path) -> SummaryMemory:
        path = Path(path)
        again = "give --memory another file (a new one starts afresh)"
        raw = path.read_bytes()
        kind = safetensors_format(raw)
        if kind is not None:
            raise RunError(f"{path}: a memory run's memory file ({kind}), not a chat model's summary memory; chat"
                           f" with the memory run that wrote it, or {again}")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise RunError(f"{path}: not a dialogtune summary memory (malformed JSON: {err}); {again}") from None
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if found != FORMAT:
            raise RunError(f"{path}: not a dialogtune summary memory (format {found!r}, expected {FORMAT!r}); {again}")
        sessions, summary = data.get("sessions"), data.get("summary")
        if not (isinstance(sessions, list) and sessions and all(_is_session(s) for s in sessions)
                and (summary is None or isinstance(summary, str))):
            raise RunError(f"{path}: a damaged summary memory (sessions must be lists of messages with a role"
                           f" and a content, the summary a string or null); {again}")
        notes = data.get("notes") or {}
        if not isinstance(notes, dict):
            raise RunError(f"{path}: a damaged summary memory (its notes must be an object); {again}")
        return cls(model=str(data.get("model", "")), sessions=sessions, summary=summary, notes=notes)


def _is_session(session: Any) -> bool:
    return isinstance(session, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in session)


def safetensors_format(raw: bytes) -> str | None:
    """The format a safetensors file's metadata names ("safetensors" when it names none), or None
    for anything else. A safetensors file opens with its header's length (8 bytes, little-endian),
    then the header: a JSON object."""
    if len(raw) < 10 or raw[8:9] != b"{":
        return None
    size = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return str((metadata or {}).get("format") or "safetensors")


@dataclass
class ModelSummarizer:
    """Summaries written by a chat model prompted as the summarize task prompts: its own system
    prompt (a summarize run's, if it was trained with one), then the request as the user message.
    A request longer than the model's context loses its oldest dialogue lines (the instruction and
    the summary so far stay), counted in `lines_cut`."""

    chat: ChatModel
    instruction: str = DEFAULT_INSTRUCTION
    # Greedy, without repeating any 3-gram: a small model's greedy summary otherwise loops on one
    # sentence ("I'm happy to meet you. I'm happy to meet you. ..." from SmolLM2-135M on MSC).
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0, max_new_tokens=SUMMARY_TOKENS,
                                                                no_repeat_ngram_size=3))
    lines_cut: int = 0  # all calls together

    def __call__(self, request: str) -> str:
        conversation = Conversation(self.chat, system_prompt=self.chat.system_prompt, reuse_cache=False)
        conversation.messages.append({"role": "user", "content": self.within_context(request)})
        return conversation.respond(self.sampling).text

    def within_context(self, request: str) -> str:
        head = f"{self.instruction}\n"
        if not request.startswith(head):
            head = ""
        lines = request[len(head):].split("\n")
        kept = 1 if lines[0].startswith(SUMMARY_LEAD) else 0  # the summary so far is never cut
        system = [{"role": "system", "content": self.chat.system_prompt}] if self.chat.system_prompt else []
        while True:
            text = head + "\n".join(lines)
            rendered = self.chat.render([*system, {"role": "user", "content": text}])
            tokens = len(self.chat.tokenizer(rendered, add_special_tokens=False)["input_ids"])
            if self.chat.reply_room(tokens) >= self.sampling.max_new_tokens:
                return text
            if len(lines) - kept <= 1:
                raise ModelError(f"{self.chat.name}: its {self.chat.context_length}-token context cannot hold a"
                                 f" summary request ({tokens} tokens with one line of dialogue) and a"
                                 f" {self.sampling.max_new_tokens}-token summary; name a summary model with a"
                                 " longer context (--summary-model)")
            del lines[kept]
            self.lines_cut += 1


def load_summarizer(name: str | None, chat: ChatModel) -> ModelSummarizer:
    """The summarizer for `chat`'s memory: `chat` itself (`name` None) or the model `name` (a
    summarize run or any chat model), with the instruction a summarize run was trained on (else the
    summarize task's default), greedy, its summaries at most SUMMARY_TOKENS tokens or a quarter of
    `chat`'s context."""
    model = chat if name is None else load_chat_model(name)
    info = model.info
    instruction = info.instruction if info and info.task == "summarize" and info.instruction else DEFAULT_INSTRUCTION
    length = min(SUMMARY_TOKENS, chat.context_length // 4)
    if model.is_encoder_decoder:
        length = min(length, model.context_length)
    return ModelSummarizer(model, instruction, Sampling(temperature=0, max_new_tokens=length, no_repeat_ngram_size=3))
