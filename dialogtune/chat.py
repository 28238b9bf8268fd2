"""`dialogtune chat RUN_DIR|MODEL`: talk to a model in the terminal.

    dialogtune chat runs/sgd_respond
    dialogtune chat runs/bob --as Bob --user Alice --temperature 0.8 --top-p 0.9
    dialogtune chat runs/sgd_respond --play 3        # a scripted user, for demos

Replies stream as they are generated and stop at the end of the turn, at EOS or at the next
speaker's tag, which is never printed. The conversation's key/value cache is kept between
turns, so a reply starts as fast on turn 30 as on turn 1 (an encoder-decoder re-reads the whole
conversation every turn: its encoder must). Inside the chat: /help.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

from dialogtune.errors import ConfigError
from dialogtune.infer import Conversation, Sampling, load_chat_model

HELP = """commands:
  /reset              forget the conversation
  /save FILE          save the conversation (JSON)
  /load FILE          load a conversation saved with /save
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
        key, _, value = rest.partition(" ")
        if not (key and value):
            return "usage: /set KEY VALUE"
        before = sampling.max_new_tokens
        said = set_sampling(sampling, key, value.strip())
        try:
            conversation.chat.check_reply_length(sampling.max_new_tokens, "max_new_tokens")
        except ConfigError as err:  # refused here, so that no turn fails for it
            sampling.max_new_tokens = before
            return f"{err}; max_new_tokens stays {before}"
        return said
    if name == "help":
        return HELP
    return f"unknown command /{name}; /help lists them"


def run_chat(model: str, *, sampling: Sampling, speaker_as: str | None = None, user: str = "User",
             system: str | None = None, play: int = 0, reuse_cache: bool = True, load_in_8bit: bool = False,
             load_in_4bit: bool = False) -> int:
    """The REPL; with `play`, that many turns against SCRIPTED_USER instead of the keyboard."""
    chat = load_chat_model(model, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    chat.check_reply_length(sampling.max_new_tokens)  # refused before the conversation starts
    if speaker_as:
        chat.speakers_as = [speaker_as]
    conversation = Conversation(chat, system_prompt=system or chat.system_prompt, user_name=user,
                                reuse_cache=reuse_cache)
    bot = chat.assistant_name
    out = sys.stdout

    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()

    print(f"chatting with {chat.name} as {bot} (template {chat.template_name}); /help for commands", flush=True)
    scripted = iter(SCRIPTED_USER * (play // len(SCRIPTED_USER) + 1)) if play else None
    turns = 0
    while True:
        if scripted is not None:
            if turns >= play:
                return 0
            line = next(scripted)
            print(f"{user}> {line}", flush=True)
        else:
            try:
                line = input(f"{user}> ")
            except EOFError:
                print()
                return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            said = command(line, conversation, sampling)
            if said is None:
                return 0
            print(said, flush=True)
            continue
        stream(f"{bot}: ")
        reply = conversation.say(line, sampling, on_text=stream)
        stream("\n" if reply.stopped else " […]\n")
        turns += 1
