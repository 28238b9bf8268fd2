"""The canonical data model every reader produces and every task consumes.

Pure data: no tokenizer, no template. A `Reject` is how a reader says "this record could
not be used" without stopping the run or losing track of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Turn:
    """One utterance. `speaker` is None for narration (stage directions, scene text)."""

    speaker: str | None
    text: str
    session: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Dialogue:
    """A conversation (or a scene of a script). `group` is the unit that train/validation
    splitting keeps together: an episode for scripts, otherwise the dialogue itself."""

    id: str
    turns: list[Turn]
    source: str = ""
    line: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return self.meta.get("group", self.id)

    def speakers(self) -> list[str]:
        seen: dict[str, None] = {}
        for turn in self.turns:
            if turn.speaker is not None:
                seen.setdefault(turn.speaker)
        return list(seen)


@dataclass(slots=True)
class Reject:
    """A record that was not used: where it is and why. Written to rejects.jsonl."""

    source: str
    line: int | None
    reason: str
    stage: str = "read"
    item: str | None = None  # position inside a JSON document, e.g. "[17].turns[3]"

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "line": self.line,
            "item": self.item,
            "stage": self.stage,
            "reason": self.reason,
        }

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
        if self.item:
            where += f" {self.item}"
        return f"{where}: {self.reason}"
