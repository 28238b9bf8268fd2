"""Chat `messages` JSONL, the ecosystem's common format: one conversation a line, as
OpenAI `{"messages": [{"role", "content"}]}` or ShareGPT `{"conversations": [{"from", "value"}]}`.
A system message becomes the dialogue's system text; speakers are the roles (`user`, `assistant`).

`content` is a string or, as OpenAI also allows, a list of parts: text parts are joined in order
with nothing added between them (what the writer put in a part is kept exactly; TGI joins the
same way, vLLM inserts a newline); any other part (an image, audio, a file) rejects the record.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.readers._io import base_suffix, iter_jsonl, load_json
from dialogtune.textfix import clean_text

# OpenAI's roles as the templates know them: `developer` is OpenAI's newer name for system.
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {**OPENAI_ROLES, "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _records(path: Path):
    if base_suffix(path) == ".json":
        data = load_json(path)
        for index, record in enumerate(data if isinstance(data, list) else [data]):
            yield None, f"[{index}]", record, None
    else:
        for lineno, record, error in iter_jsonl(path):
            yield lineno, None, record, error


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def content_text(content: object) -> str:
    """The text of an OpenAI message `content`: a string, or a list of `{"type": "text", "text": ...}`
    parts joined in order with nothing between them. Raises ValueError naming the part types that
    are not text (image_url, input_audio, file ...), or saying what is wrong with the shape."""
    if isinstance(content, str):
        return content
    problem = _parts_problem(content)
    if problem:
        raise ValueError(problem)
    return "".join(part["text"] for part in content)


def _parts_problem(content: object) -> str | None:
    """Why `content` is not a list of text parts, or None. Non-text parts are named before any
    malformed text part: what the data holds matters more than a detail of one part."""
    if not isinstance(content, list):
        return f"expected a string or a list of content parts, got {_json_type(content)}"
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            return f"part {index} must be an object, got {_json_type(part)}"
        if not isinstance(part.get("type"), str):
            return f"part {index} must have a string 'type', got {_json_type(part.get('type'))}"
    others = list(dict.fromkeys(part["type"] for part in content if part["type"] != "text"))
    if others:
        return f"part type(s) {', '.join(others)} not supported (only text parts are)"
    for index, part in enumerate(content):
        if not isinstance(part.get("text"), str):
            return f"part {index} (text) must have a string 'text', got {_json_type(part.get('text'))}"
    return None


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
        try:
            text = content_text(message.get(text_key))
        except ValueError as err:
            return f"message {index}: field {text_key!r}: {err}"
        out.append((role, clean_text(text)))
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
