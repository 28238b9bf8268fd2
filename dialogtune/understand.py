"""`dialogtune understand RUN --index DIR`: user turns in, function calls out.

    dialogtune understand runs/sgd-understand --utterance "Book a table for two at 7 pm"
    dialogtune understand runs/sgd-understand --input dialogues.jsonl --output calls.jsonl
    dialogtune understand runs/sgd-understand            # interactive

Each turn is answered the way the `understand` task trained it (tasks/understand.py): the
candidates retrieved for the turn, then the function, then one argument at a time. Decoding is
greedy and constrained through transformers' `prefix_allowed_tokens_fn`: the function is one of
the offered names or `none`; a categorical argument is one of its values, `dontcare` or `null`;
a free-text argument is whatever the model writes before its end of turn. Every answer is a
string, so every call serialises. The questions form one growing sequence, so each one reuses
the key/value cache of everything before it (cropped to the tokens a re-render shares).
A conversation's calls are its dialogue state (dialogtune.state): new values update it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dialogtune.errors import ConfigError, DataError, RunError
from dialogtune.infer import ChatModel, load_chat_model
from dialogtune.retrieval.findk import nearest_rank
from dialogtune.state import Call, DialogueState
from dialogtune.tasks.understand import NONE, NULL, UnderstandPrompts, argument_options, argument_question
from dialogtune.tokenize import token_counter

MAX_VALUE_TOKENS = 24  # a free-text argument's answer (SGD's longest values are addresses)


@dataclass
class TurnResult:
    call: Call  # the state's call after this turn
    function: str | None  # what stage 1 answered
    changes: dict[str, str]  # what stage 2 answered (non-null values)
    candidates: list[str]
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)  # seconds: retrieval, function, arguments


@dataclass
class Conversation:
    """One conversation's running understanding: its turns so far and its state."""
    turns: list[tuple[str, str]] = field(default_factory=list)  # (speaker, text), "USER" / "SYSTEM"
    state: DialogueState = field(default_factory=DialogueState)
    in_progress: str | None = None
    services: list[str] | None = None  # the services it may call (SGD's per dialogue), when prompts keep to them


def option_trie(tokenizer, options: Sequence[str], end_ids: set[int]) -> dict[tuple[int, ...], set[int]]:
    """For each token prefix of an option, the tokens that may follow; a whole option is followed
    by an end-of-turn token. Options are tokenized as an assistant message's content is."""
    trie: dict[tuple[int, ...], set[int]] = {}
    for option in options:
        ids = tuple(tokenizer(option, add_special_tokens=False).input_ids)
        for i in range(len(ids)):
            trie.setdefault(ids[:i], set()).add(ids[i])
        trie.setdefault(ids, set()).update(end_ids)
    return trie


class Understander:
    """A trained understand run with its retrieval index."""

    def __init__(self, chat: ChatModel, prompts: UnderstandPrompts, rounds: int | None = 2):
        self.chat = chat
        self.prompts = prompts
        self.rounds = rounds
        self.end_ids = chat.end_token_ids() | set(chat.tokenizer.convert_tokens_to_ids([chat.end_of_turn]))
        self.end_ids.discard(chat.tokenizer.unk_token_id)
        self._tries: dict[tuple[str, ...], dict] = {}

    # --- decoding -------------------------------------------------------------------------------
    def _trie(self, options: Sequence[str]) -> tuple[dict, int]:
        """The options' token trie and the longest option's length in tokens, built once per option set."""
        key = tuple(options)
        if key not in self._tries:
            trie = option_trie(self.chat.tokenizer, options, self.end_ids)
            self._tries[key] = (trie, max(map(len, trie), default=0))
        return self._tries[key]

    def _answer(self, messages: list[dict], session: dict, options: Sequence[str] | None) -> str:
        """The greedy answer to the conversation's last question, constrained to `options` when
        given. `session` keeps the sequence and key/value cache between questions of one turn."""
        from transformers import DynamicCache

        tokenizer, model = self.chat.tokenizer, self.chat.model
        ids = tokenizer(self.chat.render(messages), add_special_tokens=False, return_tensors="pt").input_ids
        cache = session.get("cache")
        if cache is None or self.chat.is_encoder_decoder:
            cache = None if self.chat.is_encoder_decoder else DynamicCache()
        else:  # keep the cached tokens this render shares with the last sequence
            previous = session["ids"]
            shared = 0
            limit = min(previous.shape[1], ids.shape[1] - 1, cache.get_seq_length())
            while shared < limit and previous[0, shared] == ids[0, shared]:
                shared += 1
            cache.crop(shared - cache.get_seq_length())  # tokens to remove, as a negative count
        width = ids.shape[1]
        room = self.chat.reply_room(width)
        if room <= 0:  # nothing can be written: the prompt fills the context (fit keeps this rare)
            return NULL if options is None or NULL in options else NONE
        allowed, longest = None, MAX_VALUE_TOKENS
        if options is not None:
            trie, depth = self._trie(options)
            longest = depth + 1  # the option's tokens, then its end of turn
            everything = list(self.end_ids)

            def allowed(_batch: int, sequence: torch.Tensor) -> list[int]:
                return list(trie.get(tuple(sequence[width:].tolist()), everything))
        longest = min(longest, room)
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                cache=cache, max_new_tokens=longest, do_sample=False,
                prefix_allowed_tokens_fn=allowed, eos_token_id=sorted(self.end_ids),
                pad_token_id=self.chat.tokenizer.pad_token_id or min(self.end_ids))
        session["cache"], session["ids"] = cache, output
        reply = self.chat.reply_tokens(output, width)[0].tolist()
        reply = [t for t in reply if t not in self.end_ids]
        return tokenizer.decode(reply, skip_special_tokens=True).strip()

    # --- one turn -------------------------------------------------------------------------------
    def turn(self, conversation: Conversation, utterance: str, index=None, forced: str | None = None,
             required: bool = False) -> TurnResult:
        """Understand the user's next turn and fold it into the conversation's state. `index`:
        retrieve the candidates from this one instead (a server's per-request tools). `forced`:
        stage 1 answers this function (serve's tool_choice naming one); `required`: stage 1 may
        not answer `none` (tool_choice "required")."""
        started = time.perf_counter()
        history = conversation.turns
        context = list(history[max(0, len(history) - self.rounds):] if self.rounds is not None else history)
        prompts = self.prompts if index is None else self.prompts.over(index)
        if forced is not None and forced not in prompts.index.by_name:
            raise ConfigError(f"cannot force {forced!r}: not among the index's functions")
        offered = prompts.offered(utterance, conversation.in_progress, forced=forced,
                                  allowed=prompts.allowed(conversation.services))
        retrieved = time.perf_counter()
        offered, context = prompts.fit(offered, context, utterance, forced=forced)
        messages = prompts.function_messages(offered, context, utterance)
        session: dict[str, Any] = {}
        names = [o.name for o in offered]
        # The prompt stays the one training built (`none` listed) whatever the caller allows. A
        # forced function is still decoded, as the one option: the cache and messages stage 2
        # builds on are then exactly those of a turn that chose it.
        answer = self._answer(messages, session, [forced] if forced is not None else names if required
                              else [*names, NONE])
        function = answer if answer in names else None
        chosen = time.perf_counter()
        changes: dict[str, str] = {}
        messages.append({"role": "assistant", "content": answer})
        for parameter in prompts.index.by_name[function].parameters if function else ():
            messages.append({"role": "user", "content": argument_question(parameter)})
            value = self._answer(messages, session, argument_options(parameter))
            messages.append({"role": "assistant", "content": value})
            if value and value != NULL:
                changes[parameter.name] = value
        own = {function: [p.name for p in prompts.index.by_name[function].parameters]} if function else None
        call = conversation.state.update(function, changes, own)
        conversation.turns.append(("USER", utterance))
        conversation.in_progress = function or conversation.in_progress
        done = time.perf_counter()
        return TurnResult(call, function, changes, names, done - started,
                          {"retrieval": retrieved - started, "function": chosen - retrieved, "arguments": done - chosen})


def load_understander(run: str, index: str | None = None) -> Understander:
    """A run trained on the understand task, with the index it was trained with (or `index`)."""
    from dialogtune.retrieval.index import load_index

    chat = load_chat_model(run)
    settings = chat.info.understand if chat.info else None
    if settings is None:
        raise RunError(f"{run}: not an understand run (task: {chat.info.task if chat.info else 'none'}); train one "
                       "with task.name: understand")
    location = index or settings["index"]
    if not Path(location).exists():
        raise ConfigError(f"{location}: no retrieval index here (the run was trained with {settings['index']}); "
                          "pass --index DIR")
    prompts = UnderstandPrompts(load_index(Path(location)), settings["candidates"], settings["exemplars"],
                                token_counter(chat.tokenizer),
                                chat.info.max_length, dialogue_services=settings.get("dialogue_services", False))
    return Understander(chat, prompts, settings["rounds"])


# --- inputs ------------------------------------------------------------------------------------

ROLES = {"user": "USER", "assistant": "SYSTEM", "system": None, "tool": None}


def read_conversations(path: Path) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(id, [(USER|SYSTEM, text)]) per line of a JSONL of {"id"?, "messages": [{"role", "content"}]}
    (OpenAI roles: user turns are understood, assistant turns are context)."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}:{number}: not JSON ({err})") from err
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list):
                raise DataError(f'{path}:{number}: expected {{"messages": [{{"role", "content"}}, ...]}}')
            turns = []
            for position, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise DataError(f"{path}:{number}: messages[{position}]: expected a role of "
                                    f"{', '.join(ROLES)} and a string content")
                if ROLES[m["role"]]:
                    turns.append((ROLES[m["role"]], m["content"]))
            yield str(record.get("id", number)), turns


def understand_conversation(understander: Understander, turns: Iterable[tuple[str, str]]) -> Iterator[TurnResult]:
    conversation = Conversation()
    for speaker, text in turns:
        if speaker == "USER":
            yield understander.turn(conversation, text)
        else:
            conversation.turns.append((speaker, text))


def latency(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50 and p95 in milliseconds, by the nearest-rank rule findk uses."""
    return {f"p{p}_ms": None if not seconds else round(nearest_rank(seconds, p) * 1000, 1) for p in (50, 95)}


def run_batch(understander: Understander, source: Path, output: Path | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    seconds = []
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(output, "w", encoding="utf-8")) if output else sys.stdout
        for conversation_id, turns in tqdm(list(read_conversations(source)), desc="understand", unit=" dialogues",
                                           disable=output is None):
            for number, result in enumerate(understand_conversation(understander, turns)):
                seconds.append(result.seconds)
                out.write(json.dumps({"id": conversation_id, "user_turn": number, **result.call.as_dict(),
                                      "candidates": result.candidates, "ms": round(result.seconds * 1000, 1)},
                                     ensure_ascii=False) + "\n")
    return {"turns": len(seconds), **latency(seconds)}
