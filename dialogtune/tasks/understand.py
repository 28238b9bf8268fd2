"""`understand`: a user turn in, the function call it asks for out.

One example per user turn, a short conversation with every answer trained:

    system     the instruction and the candidate functions (retrieved for this turn), each with
               its description and a few exemplar templates, then `none`
    user       the recent conversation, ending with the turn, and "which function?"
    assistant  the function's name, or `none`                                   (trained)
    user       one argument: its description, type, possible values            } once per parameter
    assistant  the value this turn gives it, or `null`                          } (trained)

Stage 1 is one prompt over all candidates (not one yes/no question per candidate, which costs a
forward pass per candidate); stage 2 asks one argument at a time, each question after the
previous answer, so at inference every question reuses the key/value cache of everything before
it and training sees exactly the prompts inference builds. Arguments are what the turn *changes*;
the dialogue state (`dialogtune.state`) folds them into the call.

Candidates come from the retrieval index, as at inference, never from the gold label: a turn
whose function the index does not return is trained to answer `none` (counted). The function in
progress (the previous turn's) is always offered, because "7 pm, please" retrieves nothing
useful by itself. Built from the same dialogues the index holds, a turn would find its own
exemplar: a training turn never sees its own dialogue's exemplars.

Prompts are kept within `max_tokens`; what gives way, in order: exemplars (from the last
candidate up), the oldest context turns, candidates (from the last). The turn itself and the
function in progress never do. Everything dropped is counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.retrieval.schemas import service_of
from dialogtune.state import sgd_user_turns
from dialogtune.tasks import Example, message

NONE = "none"  # stage 1's answer when the turn calls nothing
NULL = "null"  # stage 2's answer when the turn does not give the argument
NO_PREFERENCE = "dontcare"  # SGD: the user accepts any value (allowed for every argument)
INSTRUCTION = ("Decide which function the user's last turn calls, then give the value the turn "
               "sets for each of its arguments.")
MESSAGE_OVERHEAD = 8  # tokens a chat template adds around one message (role header, end marker)
ANSWER_ROOM = 4  # tokens kept per argument answer when the answers are not known yet (most are `null`)
SPEAKERS = {"USER": "User", "SYSTEM": "System"}


@dataclass
class PromptStats:
    turns: int = 0
    gold_not_retrieved: int = 0  # turns trained to answer `none` because the index missed the function
    second_calls: int = 0  # functions a turn opens beside its first (one call per turn is trained)
    dropped: Counter = field(default_factory=Counter)  # what gave way to the token budget -> count


@dataclass(frozen=True)
class Offered:
    """A candidate as the prompt shows it."""
    name: str
    description: str
    templates: tuple[str, ...]
    in_progress: bool = False


def function_line(offered: Offered) -> str:
    lines = [f"- {offered.name}{' (in progress)' if offered.in_progress else ''}: {offered.description}"]
    lines += [f'    e.g. "{template}"' for template in offered.templates]
    return "\n".join(lines)


def system_prompt(offered: Sequence[Offered]) -> str:
    return "\n".join([INSTRUCTION, "Functions:", *map(function_line, offered),
                      f"- {NONE}: the turn calls none of these"])


def conversation_prompt(context: Sequence[tuple[str, str]], utterance: str) -> str:
    lines = [f"{SPEAKERS.get(speaker, speaker)}: {text}" for speaker, text in context]
    lines.append(f"User: {utterance}")
    return "\n".join(["Conversation:", *lines, "", "Which function does the last User turn call?"])


def argument_question(parameter) -> str:
    """One argument's question: name, description, and the closed set of values where there is one."""
    parts = [f"Argument {parameter.name}: {parameter.description.rstrip('.')}."]
    if parameter.enum:
        parts.append(f"One of: {', '.join(map(str, parameter.enum))}.")
    parts.append(f"Its value in the last User turn, or {NULL}?")
    return " ".join(parts)


def argument_options(parameter) -> list[str] | None:
    """The answers a categorical argument may take (None: free text)."""
    if not parameter.enum:
        return None
    return [*map(str, parameter.enum), NO_PREFERENCE, NULL]


class UnderstandPrompts:
    """Builds stage-1 prompts from a retrieval index, the same way for training and inference.

    `measure(text) -> tokens`: the tokenizer's count (the prompt budget is in tokens)."""

    def __init__(self, index, candidates: int = 8, exemplars: int = 2, measure: Callable[[str], int] | None = None,
                 max_tokens: int | None = None, fusion: str = "rrf", dialogue_services: bool = False):
        self.index = index
        self.dialogue_services = dialogue_services  # offer only the functions of the dialogue's services
        self.candidates = candidates
        self.exemplars = exemplars
        self.measure = measure
        self.max_tokens = max_tokens
        self.fusion = fusion
        self.stats = PromptStats()
        self._tail_sizes: dict[str, int] = {}  # function name -> tokens its stage 2 needs (see _tail_tokens)

    def over(self, index) -> UnderstandPrompts:
        """The same settings over another index."""
        return UnderstandPrompts(index, self.candidates, self.exemplars, self.measure, self.max_tokens, self.fusion,
                                 self.dialogue_services)

    def allowed(self, services: Sequence[str] | None) -> set[str] | None:
        """The functions a dialogue may call, when prompts keep to its services (SGD names them
        per dialogue, as DSTC8 evaluates); None: every function of the index."""
        if not self.dialogue_services or not services:
            return None
        return {f.name for f in self.index.functions if service_of(f.name) in services}

    def offered(self, utterance: str, in_progress: str | None, exclude_group: str | None = None,
                vectors=None, forced: str | None = None, allowed: set[str] | None = None) -> list[Offered]:
        """The candidates, best first, the function in progress always among them. `vectors`: the
        utterance's query vectors, when embedded already (RetrievalIndex.embed_queries).
        `forced`: a function the caller makes stage 1 answer (serve's tool_choice), offered too.
        `allowed`: retrieve among these functions only (see `allowed`)."""
        found = self.index.retrieve(utterance, top_k=self.candidates, fusion=self.fusion,
                                    max_exemplars=max(self.exemplars, 1), exclude_group=exclude_group, vectors=vectors,
                                    allowed=allowed)
        names = [c.function.name for c in found][:self.candidates]
        pinned = [name for name in (in_progress, forced) if name is not None and name in self.index.by_name]
        for name in pinned:  # each missing one takes the place of the last candidate not pinned
            if name not in names:
                others = [i for i, n in enumerate(names) if n not in pinned]
                if len(names) >= self.candidates and others:
                    del names[others[-1]]
                names.append(name)
        by_name = {c.function.name: c for c in found}
        offered = []
        for name in names:
            function = self.index.by_name[name]
            candidate = by_name.get(name)
            templates = tuple(dict.fromkeys(e.template for e in candidate.exemplars))[:self.exemplars] \
                if candidate else ()
            offered.append(Offered(name, function.description, templates, name == in_progress))
        return offered

    def _size(self, parts: Sequence[str]) -> int:
        return sum(self.measure(part) + MESSAGE_OVERHEAD for part in parts)

    def fit(self, offered: list[Offered], context: list[tuple[str, str]], utterance: str,
            tail: Sequence[str] | None = None, forced: str | None = None) -> tuple[list[Offered], list[tuple[str, str]]]:
        """Drop what the budget cannot hold (see the module doc). `tail`: the texts that follow the
        stage-1 prompt in the same sequence (answers and argument questions); None at inference,
        where they are not known yet: room is kept for the longest any offered function needs.
        `forced`: a function stage 1 must answer (see `offered`); it never gives way either."""
        if self.measure is None or self.max_tokens is None:
            return offered, context

        given = self._size(tail) if tail is not None else None  # the tail never gives way: measured once

        def size() -> int:
            rest = given if given is not None else max((self._tail_tokens(o.name) for o in offered), default=0)
            return self._size([system_prompt(offered), conversation_prompt(context, utterance)]) + rest

        while size() > self.max_tokens:
            with_templates = [i for i, o in enumerate(offered) if o.templates]
            droppable = [i for i, o in enumerate(offered) if not o.in_progress and o.name != forced]
            if with_templates:
                i = with_templates[-1]
                offered[i] = Offered(offered[i].name, offered[i].description, offered[i].templates[:-1],
                                     offered[i].in_progress)
                self.stats.dropped["exemplars"] += 1
            elif context:
                context = context[1:]
                self.stats.dropped["context turns"] += 1
            elif len(droppable) > 1 or (droppable and len(offered) > 1):
                offered = offered[:droppable[-1]] + offered[droppable[-1] + 1:]
                self.stats.dropped["candidates"] += 1
            else:
                break  # only the turn and one function left: the encoder reports what is still too long
        return offered, context

    def _tail_tokens(self, name: str) -> int:
        """The tokens stage 2 of `name` will add: its name, each question, and an answer of
        ANSWER_ROOM words' worth each (the decoder stops earlier or at the context's end). Measured
        once per function: inference asks it of every candidate of every turn."""
        if name not in self._tail_sizes:
            room = " ".join(["value"] * ANSWER_ROOM)
            questions = (text for p in self.index.by_name[name].parameters for text in (argument_question(p), room))
            self._tail_sizes[name] = self._size([name, *questions])
        return self._tail_sizes[name]

    def function_messages(self, offered: Sequence[Offered], context: Sequence[tuple[str, str]],
                          utterance: str) -> list[dict[str, Any]]:
        return [message("system", system_prompt(offered)), message("user", conversation_prompt(context, utterance))]


def understand(dialogue: Dialogue, prompts: UnderstandPrompts, rounds: int | None = 2) -> list[Example] | Reject:
    """The examples of one SGD dialogue: one per user turn (see the module doc). `rounds`: the
    previous turns shown as context (None: all)."""
    turns = list(sgd_user_turns(dialogue))
    if not turns:
        return Reject(dialogue.source, dialogue.line, "no USER turn with SGD frames (understand needs SGD data)",
                      stage="task", item=dialogue.id)
    examples = []
    in_progress: str | None = None
    vectors = prompts.index.embed_queries([dialogue.turns[t.index].text for t in turns])  # one batch per dialogue
    allowed = prompts.allowed(dialogue.meta.get("services"))
    for turn, query in zip(turns, vectors, strict=True):
        prompts.stats.turns += 1
        prompts.stats.second_calls += len(turn.also)
        utterance = dialogue.turns[turn.index].text
        context = [(t.speaker or "", t.text) for t in dialogue.turns[max(0, turn.index - rounds)
                                                                        if rounds is not None else 0: turn.index]]
        offered = prompts.offered(utterance, in_progress, exclude_group=dialogue.id, vectors=query, allowed=allowed)
        target = turn.function
        if target is not None and target not in {o.name for o in offered}:
            prompts.stats.gold_not_retrieved += 1
            target = None
        function = prompts.index.by_name.get(target) if target else None
        tail: list[str] = [target or NONE]
        answers = []
        for parameter in function.parameters if function else ():
            answers.append((argument_question(parameter), turn.changes.get(parameter.name, NULL)))
            tail += answers[-1]
        offered, context = prompts.fit(offered, context, utterance, tail)
        messages = prompts.function_messages(offered, context, utterance)
        messages.append(message("assistant", target or NONE, train=True))
        for question, answer in answers:
            messages += [message("user", question), message("assistant", answer, train=True)]
        examples.append(Example(messages, dialogue.id, dialogue.group, dialogue.source, dialogue.line))
        in_progress = turn.function or in_progress
    return examples
