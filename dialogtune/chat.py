"""`dialogtune chat RUN_DIR|MODEL`: talk to a model in the terminal.

    dialogtune chat runs/sgd_respond
    dialogtune chat runs/bob --as Bob --user Alice --temperature 0.8 --top-p 0.9
    dialogtune chat runs/sgd_respond --play 3        # a scripted user, for demos
    dialogtune chat runs/msc-memory --memory alice.mem   # a memory run; its memory kept in alice.mem
    dialogtune chat runs/bob --memory alice.json         # any other model: the conversation kept in alice.json

Replies stream as they are generated and stop at the end of the turn, at EOS or at the next
speaker's tag, which is never printed. The conversation's key/value cache is kept between
turns, so a reply starts as fast on turn 30 as on turn 1 (an encoder-decoder re-reads the whole
conversation every turn: its encoder must). Inside the chat: /help.

A memory run (`task: memory`) carries a fixed-size memory instead of the conversation: each turn
reads only a short window of recent tokens plus the memory. You speak as the run's first speaker
and the model as its second (`--user`, `--as` change that); `--memory FILE` saves the memory
after every turn and continues from FILE when it exists, so a chat survives quitting.

Any other model with `--memory FILE` keeps the whole conversation, session by session, in FILE
(`SummaryMemory`): when it no longer fits the context, the oldest sessions are replaced by a
summary, written by the model itself or by `--summary-model` (a summarize run, or any chat model).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import torch

from dialogtune.errors import ConfigError, DialogtuneError
from dialogtune.infer import ChatModel, Conversation, Sampling, load_chat_model
from dialogtune.memory.conversation import MemoryConversation, MemoryRun, is_memory_run, load_memory_run
from dialogtune.memory.summary import ModelSummarizer, SummaryMemory, load_summarizer

HELP = """commands:
  /reset              forget the conversation
  /save FILE          save the conversation (JSON)
  /load FILE          load a conversation saved with /save
  /set KEY VALUE      change a sampling setting: temperature, top_k, top_p, repetition_penalty,
                      no_repeat_ngram_size, max_new_tokens, seed
  /help               this text
  /quit               leave (Ctrl-D works too)"""

MEMORY_HELP = """commands:
  /session [GAP]      the next turn opens a new session; GAP says how long since the last (e.g. 2 days)
  /reset              forget everything: a fresh memory (the --memory file too)
  /save FILE          copy the memory to FILE
  /load FILE          continue from a memory FILE this run saved
  /set KEY VALUE      change a sampling setting: temperature, top_k, top_p, repetition_penalty,
                      no_repeat_ngram_size, max_new_tokens, seed
  /help               this text
  /quit               leave (Ctrl-D works too)"""

SUMMARY_HELP = """commands:
  /session            the next turn opens a new session (earlier sessions are the first summarised)
  /reset              forget everything: a fresh memory (the --memory file too)
  /save FILE          copy the memory to FILE
  /load FILE          continue from a memory FILE saved by a chat with --memory
  /set KEY VALUE      change a sampling setting: temperature, top_k, top_p, repetition_penalty,
                      no_repeat_ngram_size, max_new_tokens, seed
  /help               this text
  /quit               leave (Ctrl-D works too)"""

SCRIPTED_USER = ["Hello! Can you help me find a restaurant for tonight?", "Something Italian, near the center.",
                 "For two people, around 7 pm.", "Great, thank you. What is the address?",
                 "Can you also book a taxi there?", "Thanks, that's all for now."]


def set_sampling(sampling: Sampling, key: str, value: str) -> str:
    types = {f.name: f.type for f in fields(Sampling)}
    if key not in types:
        return f"unknown setting {key!r}; settings: {', '.join(types)}"
    try:
        parsed = float(value) if "float" in str(types[key]) else int(value)
    except ValueError:
        return f"{key} needs a number, got {value!r}"
    setattr(sampling, key, parsed)
    return f"{key} = {parsed}"


def set_for(chat: ChatModel, sampling: Sampling, rest: str) -> str:
    """`/set KEY VALUE` for a chat with `chat`: a reply longer than the model can write is refused
    here, so that no turn fails for it."""
    key, _, value = rest.partition(" ")
    if not (key and value):
        return "usage: /set KEY VALUE"
    before = sampling.max_new_tokens
    said = set_sampling(sampling, key, value.strip())
    try:
        chat.check_reply_length(sampling.max_new_tokens, "max_new_tokens")
    except ConfigError as err:
        sampling.max_new_tokens = before
        return f"{err}; max_new_tokens stays {before}"
    return said


def command(line: str, conversation: Conversation, sampling: Sampling) -> str | None:
    """Handle a /command; returns what to print, or None to quit."""
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if name in ("quit", "exit", "q"):
        return None
    if name == "reset":
        conversation.reset()
        return "(conversation reset)"
    if name == "save":
        if not rest:
            return "usage: /save FILE"
        Path(rest).write_text(json.dumps({"system": conversation.system_prompt, "messages": conversation.messages},
                                         indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return f"(saved {len(conversation.messages)} messages to {rest})"
    if name == "load":
        try:
            saved = json.loads(Path(rest).read_text(encoding="utf-8"))
            messages = saved["messages"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"cannot load {rest!r}: {err}"
        conversation.reset()
        conversation.messages.extend(messages)
        conversation.system_prompt = saved.get("system", conversation.system_prompt)
        return f"(loaded {len(messages)} messages from {rest})"
    if name == "set":
        return set_for(conversation.chat, sampling, rest)
    if name == "help":
        return HELP
    return f"unknown command /{name}; /help lists them"


class MemoryChat:
    """A memory run's conversation in the REPL, and the file it is kept in (None: this process only)."""

    def __init__(self, run: MemoryRun, path: Path | None):
        self.run, self.path = run, path
        self.conversation = MemoryConversation.load(run, path) if path and path.exists() else MemoryConversation(run)

    def keep(self) -> None:
        if self.path:
            self.conversation.save(self.path)

    def where(self) -> str:
        held = f"{self.describe()}, session {self.conversation.session}"
        if self.path is None:
            return f"memory: this process only, {held} (--memory FILE keeps it across restarts)"
        return f"memory: {self.path}, {held}"

    # What memory_command needs of a kept chat (SummaryChat has the same).
    help = MEMORY_HELP

    def describe(self) -> str:
        return f"{self.conversation.turns_read} turns read"

    def start_session(self, time_gap: str | None) -> str:
        if not self.conversation.turns_read:
            return "(nothing read yet: the first turn opens session 1)"
        self.conversation.new_session(time_gap)
        return f"(session {self.conversation.session} starts with the next turn)"

    def forget(self) -> None:
        self.conversation = MemoryConversation(self.run)

    def save_copy(self, path: Path) -> None:
        self.conversation.save(path)

    def load_copy(self, path: Path) -> None:
        self.conversation = MemoryConversation.load(self.run, path)

    def set_setting(self, sampling: Sampling, rest: str) -> str:
        key, _, value = rest.partition(" ")
        return set_sampling(sampling, key, value.strip()) if key and value else "usage: /set KEY VALUE"


def memory_command(line: str, chat: MemoryChat | SummaryChat, sampling: Sampling) -> str | None:
    """Handle a /command in a chat whose memory is kept (a memory run's, or a plain model's
    SummaryChat); returns what to print, or None to quit."""
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if name in ("quit", "exit", "q"):
        return None
    if name == "session":
        said = chat.start_session(rest or None)
        chat.keep()
        return said
    if name == "reset":
        chat.forget()
        chat.keep()
        return "(memory reset)" + (f"; {chat.path} holds the fresh memory" if chat.path else "")
    if name == "save":
        if not rest:
            return "usage: /save FILE"
        chat.save_copy(Path(rest))
        return f"(saved the memory, {chat.describe()}, to {rest})"
    if name == "load":
        if not Path(rest).is_file():
            return f"cannot load {rest!r}: no such file"
        try:
            chat.load_copy(Path(rest))
        except DialogtuneError as err:
            return f"cannot load: {err}"
        chat.keep()
        return f"(loaded the memory, {chat.describe()}, from {rest})"
    if name == "set":
        return chat.set_setting(sampling, rest)
    if name == "help":
        return chat.help
    return f"unknown command /{name}; /help lists them"


def said_lines(user: str, play: int, chat: MemoryChat | SummaryChat, sampling: Sampling) -> Iterator[str]:
    """The user's lines for a chat whose memory is kept: /commands are handled on the way (their
    answers printed), /quit ends."""
    for line in user_lines(user, play):
        if not line.startswith("/"):
            yield line
            continue
        said = memory_command(line, chat, sampling)
        if said is None:
            return
        print(said, flush=True)


def run_memory_chat(model: str, memory: Path | None, *, sampling: Sampling, speaker_as: str | None = None,
                    user: str | None = None, play: int = 0) -> int:
    """The REPL on a memory run: each of your turns is read into the memory, each reply generated
    from it and read too, the memory saved to `memory` after every turn."""
    run = load_memory_run(model)
    person, model_speaker = run.person_and_model
    user, bot = user or person, speaker_as or model_speaker
    chat = MemoryChat(run, memory)
    print(f"chatting with {Path(run.location).parent.name} (a memory run: {run.model.memory_slots} memory slots,"
          f" a window of {run.inputs.window} tokens) as {bot}; you are {user}; /help for commands", flush=True)
    print(chat.where(), flush=True)
    for line in said_lines(user, play, chat, sampling):
        chat.conversation.read(user, line)
        chat.keep()  # saved before the reply: a crash while generating still keeps what you said
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        print(f"{bot}: {chat.conversation.reply(bot, **sampling.generate_kwargs())}", flush=True)
        chat.keep()
    return 0


class SummaryChat:
    """A plain model's conversation kept in a file (SummaryMemory), and who writes its summaries."""

    help = SUMMARY_HELP

    def __init__(self, chat: ChatModel, path: Path, summarizer: ModelSummarizer, system_prompt: str | None,
                 conversation: Conversation | None = None):
        self.chat, self.path, self.summarizer, self.system_prompt = chat, path, summarizer, system_prompt
        self.conversation = conversation  # the REPL's, whose cache is dropped when the memory is replaced
        self.memory = SummaryMemory.load(path) if path.exists() else SummaryMemory(model=chat.name)

    def describe(self) -> str:
        return self.memory.describe()

    def start_session(self, time_gap: str | None) -> str:
        if not self.memory.new_session():
            return "(nothing said in this session yet: the next turn goes on in it)"
        return "(a new session starts with the next turn)"

    def forget(self) -> None:
        self.memory = SummaryMemory(model=self.chat.name)
        if self.conversation is not None:
            self.conversation.reset()

    def save_copy(self, path: Path) -> None:
        self.memory.save(path)

    def load_copy(self, path: Path) -> None:
        self.memory = SummaryMemory.load(path)
        if self.conversation is not None:
            self.conversation.reset()

    def set_setting(self, sampling: Sampling, rest: str) -> str:
        return set_for(self.chat, sampling, rest)

    def keep(self) -> None:
        self.memory.save(self.path)

    def where(self) -> str:
        written = f" (written with {self.memory.model})" if self.memory.model != self.chat.name else ""
        return f"memory: {self.path}, {self.memory.describe()}{written}"

    def make_room(self, reply_tokens: int) -> list[str]:
        """Fit the next prompt and its reply into the context; returns what was done, to be said."""
        cut_before = self.summarizer.lines_cut
        notes = self.memory.fit(self.chat, self.system_prompt, reply_tokens, self.summarizer,
                                self.summarizer.instruction).notes()
        if self.summarizer.lines_cut > cut_before:
            notes.append(f"(the summary model read only the end of a session: {self.summarizer.lines_cut - cut_before}"
                         " oldest line(s) did not fit its context)")
        return notes


def run_summary_chat(chat: ChatModel, memory: Path, conversation: Conversation, *, sampling: Sampling,
                     summary_model: str | None, play: int) -> int:
    """The REPL on a plain model whose conversation is kept in `memory` (loaded when it exists,
    saved after every turn), earlier sessions summarised when it no longer fits."""
    talk = SummaryChat(chat, memory, load_summarizer(summary_model, chat), conversation.system_prompt, conversation)
    bot, user = chat.assistant_name, conversation.user_name
    by = "itself" if summary_model is None else talk.summarizer.chat.name
    print(f"chatting with {chat.name} as {bot} (template {chat.template_name}); earlier sessions are summarised by"
          f" {by} when the conversation no longer fits; /help for commands", flush=True)
    print(talk.where(), flush=True)
    for line in said_lines(user, play, talk, sampling):
        before = copy.deepcopy(talk.memory)
        talk.memory.add("user", line, user)
        try:
            notes = talk.make_room(sampling.max_new_tokens)
        except DialogtuneError as err:
            talk.memory = before  # unanswered, and nothing dropped for it: the user may say something shorter
            print(err, flush=True)
            continue
        talk.keep()  # saved before the reply: a crash while generating still keeps what you said
        for note in notes:
            print(note, flush=True)
        conversation.system_prompt = talk.memory.system_text(talk.system_prompt)
        conversation.messages = talk.memory.messages()
        given = len(conversation.messages)
        print(f"{bot}: ", end="", flush=True)
        reply = conversation.respond(sampling, on_text=lambda piece: print(piece, end="", flush=True))
        print("" if reply.stopped else " […]", flush=True)
        if len(conversation.messages) < given:  # its token count (the cache's tokens) can differ by a few
            print(f"({given - len(conversation.messages)} oldest message(s) left out of this prompt for room;"
                  " the memory keeps them)", flush=True)
        talk.memory.add("assistant", reply.raw, bot)
        talk.keep()
    return 0


def user_lines(user: str, play: int) -> Iterator[str]:
    """What the user types, stripped, blank lines skipped, until Ctrl-D; with `play`, that many
    lines of SCRIPTED_USER (commands are not counted: the scripted user sends none)."""
    scripted = iter(SCRIPTED_USER * (play // len(SCRIPTED_USER) + 1))
    for _ in range(play):
        line = next(scripted)
        print(f"{user}> {line}", flush=True)
        yield line
    while not play:
        try:
            line = input(f"{user}> ").strip()
        except EOFError:
            print()
            return
        if line:
            yield line


def run_chat(model: str, *, sampling: Sampling, speaker_as: str | None = None, user: str | None = None,
             system: str | None = None, play: int = 0, reuse_cache: bool = True, load_in_8bit: bool = False,
             load_in_4bit: bool = False, memory: Path | None = None, summary_model: str | None = None) -> int:
    """The REPL; with `play`, that many turns against SCRIPTED_USER instead of the keyboard.
    `memory`: a memory run's memory file, or for any other model the file its conversation is kept
    in, earlier sessions summarised by the model itself or by `summary_model`."""
    if is_memory_run(model):
        if system or load_in_8bit or load_in_4bit or summary_model:
            raise ConfigError(f"{model} is a memory run: it is trained without a system prompt, loads unquantized"
                              " and keeps a memory, not a summary; drop --system, --load-in-8bit, --load-in-4bit"
                              " and --summary-model")
        return run_memory_chat(model, memory, sampling=sampling, speaker_as=speaker_as, user=user, play=play)
    if summary_model and memory is None:
        raise ConfigError(f"--summary-model {summary_model}: summaries are written only for a conversation kept"
                          " with --memory FILE; add --memory FILE, or drop --summary-model")
    user = user or "User"
    chat = load_chat_model(model, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    chat.check_reply_length(sampling.max_new_tokens)  # refused before the conversation starts
    if speaker_as:
        chat.speakers_as = [speaker_as]
    conversation = Conversation(chat, system_prompt=system or chat.system_prompt, user_name=user,
                                reuse_cache=reuse_cache)
    if memory is not None:
        return run_summary_chat(chat, memory, conversation, sampling=sampling, summary_model=summary_model, play=play)
    bot = chat.assistant_name
    out = sys.stdout

    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()

    print(f"chatting with {chat.name} as {bot} (template {chat.template_name}); /help for commands", flush=True)
    for line in user_lines(user, play):
        if line.startswith("/"):
            said = command(line, conversation, sampling)
            if said is None:
                return 0
            print(said, flush=True)
            continue
        stream(f"{bot}: ")
        reply = conversation.say(line, sampling, on_text=stream)
        stream("\n" if reply.stopped else " […]\n")
    return 0
