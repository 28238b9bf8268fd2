"""Function calling behind `dialogtune serve`: an understand run answers OpenAI `tools` requests.

    dialogtune serve runs/sgd-understand --port 8000

    reply = client.chat.completions.create(model="sgd-understand", messages=messages, tools=tools,
                                           tool_choice="auto")
    call = reply.choices[0].message.tool_calls[0].function   # .name, .arguments (a JSON string)

The server keeps no conversation: each request carries its own, and the dialogue state is
rebuilt by understanding its user turns in order (`dialogtune.understand`). That costs one
understanding per earlier user turn, so the conversation after each user turn is cached (a
bounded LRU keyed by a hash chain over the turns): an agent that sends its growing conversation
pays for its new turn only. Answers never depend on the cache, which only holds what the replay
would compute.

- Turns: user messages are understood; assistant text is the system's side of the conversation
  (context); assistant `tool_calls` and `tool` results belong to the agent loop and are read
  for one thing only: a user turn that an assistant tool call answered is replayed with that
  function forced (when it is among the tools), so the state follows the calls the client saw
  whatever `tool_choice` produced them. System messages are accepted and not read: the run's
  prompts are the ones it was trained with.
- The turn answered is the last user message. After a tool result (the agent has acted on that
  turn) `auto` answers no call, so an agent loop ends; `required` or a named function understand
  the last user turn again, as the choice demands.
- `tools`: candidates are retrieved among these only, over an index built for them with the run
  index's embedder and its exemplars of the same names (cached per set of tools); a tool the run
  never saw is offered by its description. Without `tools`, the run's own functions are offered.
- `tool_choice`: "auto" (the model may answer none), "none" (no call, no model run), "required"
  (stage 1 may not answer none), or {"type": "function", "function": {"name": X}} (X is called,
  the model fills its arguments).
- The answer: one call at most (one per user turn, as the run was trained); its arguments are
  the dialogue state's values for the function's parameters, as the tool's JSON types say where
  the text reads as one ("2" is 2 for an integer). No call: an assistant message with empty
  content (this model understands, it writes no replies) and finish_reason "stop".
- Decoding is greedy and constrained: temperature, top_p, seed, max_tokens, n and
  parallel_tool_calls are accepted and ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dialogtune.errors import DataError
from dialogtune.readers.messages import OPENAI_ROLES, content_text
from dialogtune.retrieval.schemas import Function, Parameter, functions_from_tools, tools_json
from dialogtune.understand import Conversation, Understander

TOOL_INDEXES = 16  # indexes built for distinct tools lists, kept (an agent sends the same list every time)
CONVERSATIONS = 256  # conversations after a user turn, kept (a few per conversation in flight)
NO_REPLY = ""  # an answer without a call: the model writes no text
INTEGER = re.compile(r"-?\d+")
NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")


# --- the request ------------------------------------------------------------------------------

class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: str = "function"
    function: CalledFunction


class OpenAIMessage(BaseModel):
    """What every OpenAI message shares: `developer` is the system role, and `content` may be a
    list of text parts. Subclasses say which roles and whether content may be null."""
    model_config = ConfigDict(extra="allow")

    @field_validator("role", mode="before", check_fields=False)
    @classmethod
    def _developer_is_system(cls, role: object) -> object:
        return OPENAI_ROLES.get(role, role) if isinstance(role, str) else role  # developer -> system

    @field_validator("content", mode="before", check_fields=False)
    @classmethod
    def _text_parts(cls, content: object) -> str | None:
        # content_text's ValueError (naming the parts that are not text) becomes the 400
        return None if content is None else content_text(content)


class ToolMessage(OpenAIMessage):
    """An OpenAI message as an agent sends it: also assistant tool calls and tool results."""
    role: Literal["system", "user", "assistant", "tool", "function"]  # function: the deprecated tool result
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # n, parallel_tool_calls, response_format ...: ignored
    model: str | None = None
    messages: list[ToolMessage] = Field(min_length=1)
    tools: list[Any] | None = None
    tool_choice: str | dict | None = None
    stream: bool = False
    # checked as OpenAI checks them, then ignored: decoding is greedy and constrained
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None


class ToolRequestError(ValueError):
    """A request the server answers with a 400 naming `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Cancelled(Exception):
    """The client went away before its answer was computed."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One turn of the conversation before the one answered."""
    speaker: str  # USER or SYSTEM
    text: str
    forced: str | None = None  # USER: the function an assistant tool call answered it with


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one request asks, checked: the work to do on the worker thread."""
    steps: tuple[Step, ...]  # the conversation before the turn answered
    utterance: str | None  # the turn answered; None: answer no call without running the model
    functions: tuple[Function, ...] | None  # the request's tools; None: the run's own functions
    tools_key: str  # a fingerprint of those functions ("run" for the run's own)
    forced: str | None
    required: bool


@dataclasses.dataclass(frozen=True)
class ToolAnswer:
    function: str | None
    arguments: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def tools_fingerprint(functions: tuple[Function, ...]) -> str:
    return hashlib.sha256(json.dumps(tools_json(functions), sort_keys=True).encode()).hexdigest()


def request_functions(tools: list | None) -> tuple[Function, ...] | None:
    if tools is None:
        return None
    if not tools:
        raise ToolRequestError("tools: give at least one tool, or leave `tools` out to offer the run's own functions",
                               "tools")
    try:
        functions = functions_from_tools(tools, Path("tools"))
    except DataError as err:  # "tools: tools[2] function 'x' parameter 'y': ..." -> from "tools[2]" on
        raise ToolRequestError(str(err).removeprefix("tools: "), "tools") from None
    seen: set[str] = set()
    for position, function in enumerate(functions):
        if function.name in seen:
            raise ToolRequestError(f"tools[{position}]: function name {function.name!r} is given twice", "tools")
        seen.add(function.name)
    return tuple(functions)


def request_choice(choice: str | dict | None, names: set[str]) -> tuple[str, str | None]:
    """("auto" | "none" | "required" | "function", the function's name)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto", None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise ToolRequestError('tool_choice: expected "auto", "none", "required" or '
                               '{"type": "function", "function": {"name": ...}}', "tool_choice")
    if name not in names:
        raise ToolRequestError(f"tool_choice: function {name!r} is not among the tools offered "
                               f"({', '.join(sorted(names))})", "tool_choice")
    return "function", name


def plan_request(request: ToolCompletionRequest, run_functions: list[Function]) -> Plan:
    """Check a request and say what answering it takes (see the module doc for the rules)."""
    functions = request_functions(request.tools)
    names = {f.name for f in (functions if functions is not None else run_functions)}
    choice, forced = request_choice(request.tool_choice, names)
    steps: list[Step] = []
    last_user: int | None = None  # the last user turn's place in `steps`
    called = False  # a tool call answered the last user turn
    for position, m in enumerate(request.messages):
        if m.role == "user":
            if m.content is None:
                raise ToolRequestError(f"messages.{position}.content: a user message needs content", "messages")
            steps.append(Step("USER", m.content))
            last_user, called = len(steps) - 1, False
        elif m.role == "assistant":
            if m.tool_calls and last_user is not None and not called:
                name = m.tool_calls[0].function.name
                if name in names:
                    steps[last_user] = Step("USER", steps[last_user].text, name)
                called = True
            if m.content and m.content.strip():
                steps.append(Step("SYSTEM", m.content))
    if last_user is None:
        raise ToolRequestError("messages: no user message to understand", "messages")
    last = [m for m in request.messages if m.role != "system"][-1]
    if last.role == "assistant":
        raise ToolRequestError("messages: the last message must be from the user or a tool result"
                               + (" (the assistant's tool calls await their results, role tool)" if last.tool_calls
                                  else ""), "messages")
    acted_on = last.role != "user"  # a tool result ends the conversation: the agent has acted on the turn
    utterance = None if choice == "none" or (acted_on and choice == "auto") else steps[last_user].text
    return Plan(tuple(steps[:last_user]), utterance, functions,
                "run" if functions is None else tools_fingerprint(functions), forced, choice == "required")


# --- answering ------------------------------------------------------------------------------

def typed_value(parameter: Parameter | None, value: str) -> Any:
    """A value as its parameter's JSON type says, where the text reads as one (answers are text)."""
    kind = parameter.type if parameter is not None else "string"
    if kind == "integer" and INTEGER.fullmatch(value):
        return int(value)
    if kind == "number" and NUMBER.fullmatch(value):
        return int(value) if INTEGER.fullmatch(value) else float(value)
    if kind == "boolean" and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _key(previous: str, step: Step) -> str:
    return hashlib.sha256(json.dumps([previous, step.speaker, step.text, step.forced]).encode()).hexdigest()


class ToolCaller:
    """An understand run answering tools requests, with its caches. Used from one thread at a
    time (the server's worker): the caches take no locks."""

    def __init__(self, understander: Understander):
        self.understander = understander
        self.indexes: OrderedDict[str, Any] = OrderedDict()
        self.conversations: OrderedDict[str, Conversation] = OrderedDict()
        self.run_key = tools_fingerprint(tuple(self.run_functions))

    @property
    def run_functions(self) -> list[Function]:
        return self.understander.prompts.index.functions

    def plan(self, request: ToolCompletionRequest) -> Plan:
        plan = plan_request(request, self.run_functions)
        if plan.tools_key == self.run_key:  # the run's own functions sent as tools: its own index serves them
            plan = dataclasses.replace(plan, functions=None, tools_key="run")
        return plan

    # --- caches -----------------------------------------------------------------------------
    def index_for(self, plan: Plan):
        """None (the run's own index) or an index over the request's functions."""
        if plan.functions is None:
            return None
        if plan.tools_key in self.indexes:
            self.indexes.move_to_end(plan.tools_key)
            return self.indexes[plan.tools_key]
        from dialogtune.retrieval.index import build_index

        run = self.understander.prompts.index
        names = {f.name for f in plan.functions}
        index = build_index(plan.functions, [e for e in run.exemplars if e.function in names], embedder=run.embedder,
                            query_instruction=run.query_instruction, model=run.model)
        self.indexes[plan.tools_key] = index
        if len(self.indexes) > TOOL_INDEXES:
            self.indexes.popitem(last=False)
        return index

    def _remember(self, key: str, conversation: Conversation) -> None:
        self.conversations[key] = copy.deepcopy(conversation)
        self.conversations.move_to_end(key)
        if len(self.conversations) > CONVERSATIONS:
            self.conversations.popitem(last=False)

    def _recall(self, key: str) -> Conversation | None:
        if key not in self.conversations:
            return None
        self.conversations.move_to_end(key)
        return copy.deepcopy(self.conversations[key])

    # --- the answer -------------------------------------------------------------------------
    def answer(self, plan: Plan, cancel: threading.Event | None = None, seconds: float | None = None) -> ToolAnswer:
        """Replay the conversation, then understand its last user turn as the plan says. Raises
        TimeoutError past `seconds` (checked between turns) and Cancelled once `cancel` is set."""
        deadline = time.monotonic() + seconds if seconds is not None else None

        def check() -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"understanding the conversation took longer than the server's timeout "
                                   f"({seconds:g} s; `dialogtune serve --timeout`)")

        check()
        if plan.utterance is None:  # nothing to understand: the model reads nothing
            return ToolAnswer(None, {}, 0, 0)
        index = self.index_for(plan)
        keys, key = [], plan.tools_key
        for step in plan.steps:
            key = _key(key, step)
            keys.append(key)
        conversation, start = Conversation(), 0
        for position in reversed(range(len(plan.steps))):
            if plan.steps[position].speaker == "USER" and (found := self._recall(keys[position])) is not None:
                conversation, start = found, position + 1
                break
        for position in range(start, len(plan.steps)):
            step = plan.steps[position]
            if step.speaker == "SYSTEM":
                conversation.turns.append(("SYSTEM", step.text))
                continue
            check()
            self.understander.turn(conversation, step.text, index, forced=step.forced)
            self._remember(keys[position], conversation)
        check()
        previous = keys[-1] if keys else plan.tools_key
        result = self.understander.turn(conversation, plan.utterance, index, forced=plan.forced,
                                        required=plan.required)
        # Stored under the keys a later request's replay of this turn will use: forced to the
        # function answered (a forced function is decoded as the one option, so the computation
        # is the same), and as `auto` when that is how it was understood.
        if result.function is not None:
            self._remember(_key(previous, Step("USER", plan.utterance, result.function)), conversation)
        if plan.forced is None and not plan.required:
            self._remember(_key(previous, Step("USER", plan.utterance)), conversation)
        by_name = (index or self.understander.prompts.index).by_name
        read = self._prompt_tokens(plan, [f"{name}: {by_name[name].description}" for name in result.candidates])
        if result.function is None:
            return ToolAnswer(None, {}, read, 0)
        function = by_name[result.function]
        arguments = {name: typed_value(function.parameter(name), value) for name, value in result.call.arguments.items()}
        written = self._count(result.function) + self._count(json.dumps(arguments, ensure_ascii=False))
        return ToolAnswer(result.function, arguments, read, written)

    def _count(self, text: str) -> int:
        return len(self.understander.chat.tokenizer(text, add_special_tokens=False).input_ids)

    def _prompt_tokens(self, plan: Plan, candidates: Sequence[str]) -> int:
        """Approximate: the conversation's turns and the candidates offered (name: description),
        in the run's tokens; the prompts the model reads add an instruction, exemplars and one
        question per argument, and show only the last few turns."""
        texts = [step.text for step in plan.steps] + ([plan.utterance] if plan.utterance else []) + list(candidates)
        return sum(map(self._count, texts))


# --- the response -----------------------------------------------------------------------------

def message_of(answer: ToolAnswer, call_id: str) -> tuple[dict, str]:
    """The choice's message and finish_reason."""
    if answer.function is None:
        return {"role": "assistant", "content": NO_REPLY}, "stop"
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": call_id, "type": "function",
        "function": {"name": answer.function, "arguments": answer.arguments_json}}]}, "tool_calls"


def argument_pieces(arguments: dict[str, Any]) -> list[str]:
    """The arguments' JSON in pieces, one per argument, as a model would stream it."""
    if not arguments:
        return ["{}"]
    pieces = [("{" if i == 0 else ", ") + json.dumps(name, ensure_ascii=False) + ": "
              + json.dumps(value, ensure_ascii=False) for i, (name, value) in enumerate(arguments.items())]
    return [*pieces, "}"]


def stream_deltas(answer: ToolAnswer, call_id: str) -> list[tuple[dict, str | None]]:
    """(delta, finish_reason) per chunk, in OpenAI's protocol: the call's id and name first, then
    its arguments in pieces, then the finish."""
    if answer.function is None:
        return [({"role": "assistant", "content": NO_REPLY}, None), ({}, "stop")]
    first = {"role": "assistant", "content": None, "tool_calls": [{
        "index": 0, "id": call_id, "type": "function", "function": {"name": answer.function, "arguments": ""}}]}
    pieces = [({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None)
              for piece in argument_pieces(answer.arguments)]
    return [(first, None), *pieces, ({}, "tool_calls")]
