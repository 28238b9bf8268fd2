"""Chat `messages` JSONL, the ecosystem's common format: one conversation a line, as
OpenAI `{"messages": [{"role", "content"}]}` or ShareGPT `{"conversations": [{"from", "value"}]}`.
A system message becomes the dialogue's system text; speakers are the roles (`user`, `assistant`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.readers._io import base_suffix, iter_jsonl, load_json
from dialogtune.textfix import clean_text

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}


def _records(path: Path):
    if base_suffix(path) == ".json":
        data = load_json(path)
        for index, record in enumerate(data if isinstance(data, list) else [data]):
            yield None, f"[{index}]", record, None
    else:
        for lineno, record, error in iter_jsonl(path):
            yield lineno, None, record, error


def parse_messages(record: dict) -> list[tuple[str, str]] | str:
    """[(role, text)], or the reason the record cannot be used."""
    if isinstance(record.get("messages"), list):
        raw, role_key, text_key = record["messages"], "role", "content"
    elif isinstance(record.get("conversations"), list):
        raw, role_key, text_key = record["conversations"], "from", "value"
    else:
        return "expected a list field 'messages' (OpenAI) or 'conversations' (ShareGPT)"
    out = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            return f"message {index} is not an object"
        role = SHAREGPT_ROLES.get(str(message.get(role_key)).lower())
        if role is None:
            return f"message {index}: unknown {role_key} {message.get(role_key)!r}"
        content = message.get(text_key)
        if not isinstance(content, str):
            return f"message {index}: field {text_key!r} must be a string"
        out.append((role, clean_text(content)))
    return out


def read(path: Path, **_: object) -> Iterator[Dialogue | Reject]:
    source = str(path)
    for number, (line, item, record, error) in enumerate(_records(path)):
        if error is None and not isinstance(record, dict):
            error = f"expected an object, got {type(record).__name__}"
        parsed = error or parse_messages(record)
        if isinstance(parsed, str):
            yield Reject(source, line, parsed, item=item)
            continue
        system = "\n".join(text for role, text in parsed if role == "system" and text)
        turns = [Turn(role, text) for role, text in parsed if role != "system" and text]
        empty = [i for i, (role, text) in enumerate(parsed) if role != "system" and not text]
        if empty and turns:  # the conversation is kept; the empty messages are listed, not lost silently
            yield Reject(source, line, f"empty message(s) {empty} left out of the conversation", item=item)
        if not turns:
            yield Reject(source, line, "no non-empty user or assistant message", item=item)
            continue
        meta = {"system": system} if system else {}
        dialogue_id = str(record.get("id", f"{path.name}#{number}"))
        yield Dialogue(dialogue_id, turns, source=source, line=line, meta=meta)
