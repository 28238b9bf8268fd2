"""Small helpers shared by the test files (imported as `helpers`; pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def split_items(items) -> tuple[list[Dialogue], list[Reject]]:
    """A reader's output as (dialogues, rejects)."""
    items = list(items)
    return [o for o in items if isinstance(o, Dialogue)], [o for o in items if isinstance(o, Reject)]


def turn_pairs(dialogue: Dialogue) -> list[tuple[str | None, str]]:
    return [(t.speaker, t.text) for t in dialogue.turns]
