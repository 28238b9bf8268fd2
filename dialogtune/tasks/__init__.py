"""Tasks turn a `Dialogue` into template-agnostic `Example`s: chat messages, each with a
`train` flag saying whether the model learns to produce it. Tasks know nothing of tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Example:
    messages: list[dict[str, Any]]  # {"role", "content", "name"?, "train"}
    dialogue_id: str
    group: str
    source: str
    line: int | None

    def chat(self) -> list[dict[str, str]]:
        """The messages as a chat template sees them (no `train`, no empty `name`)."""
        out = []
        for m in self.messages:
            message = {"role": m["role"], "content": m["content"]}
            if m.get("name"):
                message["name"] = m["name"]
            out.append(message)
        return out


def message(role: str, content: str, name: str | None = None, train: bool = False,
            session: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"role": role, "content": content, "train": train}
    if name:
        out["name"] = name
    if session is not None:  # multi-session chat: evaluation reports perplexity per session
        out["session"] = session
    return out
