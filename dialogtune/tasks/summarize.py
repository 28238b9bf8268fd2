"""`summarize`: dialogue in, summary out. The user message is the instruction followed by the
dialogue as `Name: text` lines; the assistant message (trained) is the summary."""

from __future__ import annotations

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.tasks import Example, message

DEFAULT_INSTRUCTION = "Summarize the following dialogue:"


def dialogue_lines(dialogue: Dialogue) -> str:
    return "\n".join(f"{t.speaker}: {t.text}" if t.speaker else t.text for t in dialogue.turns)


def summary_request(dialogue: Dialogue, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user message asking for a summary: what a summarize run was trained on, and what chat
    sends a summary model when earlier sessions must make room (dialogtune.memory.summary)."""
    return f"{instruction}\n{dialogue_lines(dialogue)}"


def summarize(dialogue: Dialogue, instruction: str = DEFAULT_INSTRUCTION, system_prompt: str | None = None) -> list[Example] | Reject:
    summary = dialogue.meta.get("summary")
    if not summary:
        return Reject(dialogue.source, dialogue.line, "no summary to learn", stage="task", item=dialogue.id)
    messages = [message("system", system_prompt)] if system_prompt else []
    messages.append(message("user", summary_request(dialogue, instruction)))
    messages.append(message("assistant", summary, train=True))
    return [Example(messages, dialogue.id, dialogue.group, dialogue.source, dialogue.line)]
