"""Chat `messages` JSONL: OpenAI `messages` and ShareGPT `conversations`."""

from __future__ import annotations

import json

from helpers import FIXTURES, split_items, turn_pairs

from dialogtune.readers import messages

MESSAGES = FIXTURES / "messages.jsonl"




def test_openai_messages_with_system_text():
    dialogues, _ = split_items(messages.read(MESSAGES))
    first = dialogues[0]
    assert (first.id, first.line, first.source) == ("conv-1", 1, str(MESSAGES))
    assert first.meta == {"system": "You are a patient cooking assistant."}
    assert turn_pairs(first) == [
        ("user", "How long should I rest a steak?"),
        ("assistant", "About five minutes for a thin cut, ten for a thick one."),
        ("user", "Covered or uncovered?"),
        ("assistant", "Loosely tented with foil."),
    ]


def test_sharegpt_conversations():
    dialogues, _ = split_items(messages.read(MESSAGES))
    assert len(dialogues) == 2
    sharegpt = dialogues[1]
    assert (sharegpt.id, sharegpt.line, sharegpt.meta) == ("messages.jsonl#1", 2, {})
    assert turn_pairs(sharegpt) == [
        ("user", "Write a haiku about autumn."),
        ("assistant", "Crisp leaves drift and fall\nwhispering to the cold ground\nsummer's last goodbye"),
    ]


def test_unknown_role_and_empty_conversation_are_rejected_with_line_numbers():
    _, rejects = split_items(messages.read(MESSAGES))
    assert [(r.source, r.line, r.item, r.reason) for r in rejects] == [
        (str(MESSAGES), 3, None, "message 1: unknown role 'narrator'"),
        (str(MESSAGES), 4, None, "no non-empty user or assistant message"),
    ]


def test_json_file_and_malformed_records(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello."}]},
        {"messages": [{"role": "user", "content": ["an", "array"]}]},
        {"messages": ["hi"]},
        {"prompt": "hi"},
        "just text",
    ]))
    dialogues, rejects = split_items(messages.read(path))
    assert [(d.id, d.line, d.meta, turn_pairs(d)) for d in dialogues] == [
        ("chats.json#0", None, {"system": "Be brief."}, [("user", "Hi"), ("assistant", "Hello.")]),
    ]
    assert [(r.line, r.item, r.reason) for r in rejects] == [
        (None, "[1]", "message 0: field 'content' must be a string"),
        (None, "[2]", "message 0 is not an object"),
        (None, "[3]", "expected a list field 'messages' (OpenAI) or 'conversations' (ShareGPT)"),
        (None, "[4]", "expected an object, got str"),
    ]


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n{"messages": [\n')
    dialogues, rejects = split_items(messages.read(path))
    assert [turn_pairs(d) for d in dialogues] == [[("user", "Hi")]]
    assert [r.line for r in rejects] == [2]
    assert rejects[0].reason.startswith("malformed JSON: ")
