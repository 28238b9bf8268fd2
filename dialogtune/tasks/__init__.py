"""Tasks turn a `Dialogue` into template-agnostic `Example`s: chat messages, each with a
`train` flag saying whether the model learns to produce it. Tasks know nothing of tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What a chat template may read of a message besides role and content, when it is there: OpenAI's
# shape of a call (an assistant's `tool_calls`, the `tool` message's `tool_call_id`), as
# transformers' templates expect it (`arguments` an object, not a JSON string).
TEMPLATE_FIELDS = ("name", "tool_calls", "tool_call_id")


@dataclass(slots=True)
class Example:
    messages: list[dict[str, Any]]  # {"role", "content", "name"?, "tool_calls"?, "tool_call_id"?, "train"}
    dialogue_id: str
    group: str
    source: str
    line: int | None

    def chat(self) -> list[dict[str, Any]]:
        """The messages as a chat template sees them (no `train`, no empty `name`)."""
        out = []
        for m in self.messages:
            message = {"role": m["role"], "content": m["content"]}
            message.update((key, m[key]) for key in TEMPLATE_FIELDS if m.get(key))
            out.append(message)
        return out


def message(role: str, content: str, name: str | None = None, train: bool = False,
            session: int | None = None, tool_calls: list[dict] | None = None,
            tool_call_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"role": role, "content": content, "train": train}
    if name:
        out["name"] = name
    if session is not None:  # multi-session chat: evaluation reports perplexity per session
        out["session"] = session
    if tool_calls:
        out["tool_calls"] = tool_calls
    if tool_call_id:
        out["tool_call_id"] = tool_call_id
    return out
