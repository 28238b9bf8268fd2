"""`respond`: the model speaks as one or more chosen speakers.

- `context: full`: one example per dialogue (or scene), every target turn trained. Over-long
  dialogues are split at turn boundaries when tokenized, earlier turns carried as untrained
  context.
- `context: {rounds: N}`: one example per target turn, with the N previous turns as untrained
  context. The target turn is an assistant message, so the template writes its speaker tag
  (`Bob:` / `<|im_start|>assistant`) before it: training sees the same trailing tag that
  inference ends its prompt with.
Targets become `assistant` messages, everyone else `user`, narration a nameless `user` message.
"""

from __future__ import annotations

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.tasks import Example, message

ALL_SPEAKERS = "*"


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


def respond(
    dialogue: Dialogue,
    targets: set[str],
    rounds: int | None = None,
    system_prompt: str | None = None,
    persona: bool = False,
) -> list[Example] | Reject:
    every = ALL_SPEAKERS in targets
    body = [
        message(
            "assistant" if (every and turn.speaker is not None) or turn.speaker in targets else "user",
            turn.text,
            name=turn.speaker,
            session=turn.session,
        )
        for turn in dialogue.turns
    ]
    trained = [i for i, m in enumerate(body) if m["role"] == "assistant"]
    if not trained:
        # Not bad data (a scene without the character), just nothing to learn: stage "unused".
        return Reject(dialogue.source, dialogue.line, f"no turn by {', '.join(sorted(targets))}",
                      stage="unused", item=dialogue.id)
    system = system_text(dialogue, system_prompt, persona, targets)
    head = [message("system", system)] if system else []

    def example(messages: list[dict]) -> Example:
        return Example(head + messages, dialogue.id, dialogue.group, dialogue.source, dialogue.line)

    if rounds is None:
        for i in trained:
            body[i]["train"] = True
        return [example(body)]
    examples = []
    for i in trained:
        window = [dict(m) for m in body[max(0, i - rounds) : i + 1]]
        window[-1]["train"] = True
        examples.append(example(window))
    return examples
