"""`respond`: the model speaks as one or more chosen speakers.

- `context: full`: one example per dialogue (or scene), every target turn trained. Over-long
  dialogues are split at turn boundaries when tokenized, earlier turns carried as untrained
  context.
- `context: {rounds: N}`: one example per target turn, with the N previous turns as untrained
  context. The target turn is an assistant message, so the template writes its speaker tag
  (`Bob:` / `<|im_start|>assistant`) before it: training sees the same trailing tag that
  inference ends its prompt with.
Targets become `assistant` messages, everyone else `user`, narration a nameless `user` message.

`tool_calls`: a target turn whose reader recorded the service calls behind it (SGD system turns,
`turn.meta["tool_calls"]`) becomes three messages: the assistant's call (trained), the tool's
answer (never trained: the model reads results, it does not invent them) and the reply that uses
it (trained). Without it, the model learns replies that state facts it was never shown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.tasks import Example, message

ALL_SPEAKERS = "*"
# Results a tool message shows, of each call's (SGD returns up to 10, ~80 tokens each). Replies
# name the first nearly always (2,006 of the 2,108 offers found in the results of 6 SGD train
# files; 4 name one past the third), and the count, which the message keeps whole:
# {"count": 10, "results": [the first 3]}.
TOOL_RESULTS_SHOWN = 3


@dataclass
class ToolCallStats:
    """What `tool_calls` wrote, for `stats.json`: nothing cut goes uncounted."""

    calls: int = 0
    results: int = 0  # results the calls returned
    results_left_out: int = 0  # of them, past TOOL_RESULTS_SHOWN in their call's tool message

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "results": self.results, "results_left_out": self.results_left_out,
                "results_shown_per_call": TOOL_RESULTS_SHOWN}


def system_text(dialogue: Dialogue, system_prompt: str | None, persona: bool, targets: set[str]) -> str:
    parts = []
    if system_prompt:
        parts.append(system_prompt)
    if dialogue.meta.get("system"):
        parts.append(dialogue.meta["system"])
    if persona:
        personas = dialogue.meta.get("personas", {})
        facts = [fact for speaker in sorted(targets) for fact in personas.get(speaker, [])]
        if facts:
            parts.append("\n".join(f"Your persona: {fact}" for fact in facts))
    return "\n".join(parts)


def tool_result(results: list[dict]) -> str:
    """A tool message's content: how many results there were and the first few, as JSON."""
    return json.dumps({"count": len(results), "results": results[:TOOL_RESULTS_SHOWN]}, ensure_ascii=False)


def turn_messages(turn: Turn, role: str, number: int, tool_calls: bool, stats: ToolCallStats | None) -> list[dict]:
    """A turn as messages: one, or (an assistant turn with calls, under `tool_calls`) the call,
    a tool message per call and the reply. Calls on turns the model does not speak stay unwritten:
    a user does not call tools."""
    calls = turn.meta.get("tool_calls") if tool_calls and role == "assistant" else None
    reply = message(role, turn.text, name=turn.speaker, session=turn.session)
    if not calls:
        return [reply]
    # Ids as OpenAI gives them; 9 letters and digits, the one shape Mistral's templates accept.
    ids = [f"call{number:03d}{k:02d}" for k in range(len(calls))]
    call = message("assistant", "", name=turn.speaker, session=turn.session, tool_calls=[
        {"id": i, "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for i, c in zip(ids, calls, strict=True)])
    answers = [message("tool", tool_result(c["results"]), name=c["name"], session=turn.session, tool_call_id=i)
               for i, c in zip(ids, calls, strict=True)]
    if stats is not None:
        stats.calls += len(calls)
        stats.results += sum(len(c["results"]) for c in calls)
        stats.results_left_out += sum(max(0, len(c["results"]) - TOOL_RESULTS_SHOWN) for c in calls)
    return [call, *answers, reply]


def respond(
    dialogue: Dialogue,
    targets: set[str],
    rounds: int | None = None,
    system_prompt: str | None = None,
    persona: bool = False,
    tool_calls: bool = False,
    tool_stats: ToolCallStats | None = None,
) -> list[Example] | Reject:
    every = ALL_SPEAKERS in targets
    roles = ["assistant" if (every and turn.speaker is not None) or turn.speaker in targets else "user"
             for turn in dialogue.turns]
    # One group of messages per turn: `rounds` counts turns, and a turn trains all it says.
    groups = [turn_messages(turn, role, number, tool_calls, tool_stats)
              for number, (turn, role) in enumerate(zip(dialogue.turns, roles, strict=True))]
    trained = [i for i, role in enumerate(roles) if role == "assistant"]
    if not trained:
        # Not bad data (a scene without the character), just nothing to learn: stage "unused".
        return Reject(dialogue.source, dialogue.line, f"no turn by {', '.join(sorted(targets))}",
                      stage="unused", item=dialogue.id)
    system = system_text(dialogue, system_prompt, persona, targets)
    head = [message("system", system)] if system else []

    def example(window: list[list[dict]]) -> Example:
        messages = [dict(m) for group in window for m in group]
        return Example(head + messages, dialogue.id, dialogue.group, dialogue.source, dialogue.line)

    def trained_turn(group: list[dict]) -> list[dict]:
        return [{**m, "train": m["role"] == "assistant"} for m in group]

    if rounds is None:
        return [example([trained_turn(g) if role == "assistant" else g for g, role in zip(groups, roles, strict=True)])]
    return [example([*groups[max(0, i - rounds) : i], trained_turn(groups[i])]) for i in trained]
