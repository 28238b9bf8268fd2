"""Chat `messages` JSONL: OpenAI `messages` and ShareGPT `conversations`."""

from __future__ import annotations

import json

import pytest
from helpers import FIXTURES, split_items, turn_pairs

from dialogtune.readers import messages
from dialogtune.readers.messages import content_text

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


def test_a_developer_message_is_the_system_text(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "developer", "content": "Be terse."},
                                             {"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    (dialogue,), rejects = split_items(messages.read(path))
    assert dialogue.meta == {"system": "Be terse."} and rejects == []
    assert turn_pairs(dialogue) == [("user", "Hi"), ("assistant", "Hello.")]


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
        (None, "[1]", "message 0: field 'content': part 0 must be an object, got a string"),
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


def test_text_parts_are_joined_in_order_as_written(tmp_path):
    path = tmp_path / "parts.jsonl"
    record = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Translate: "}, {"type": "text", "text": "bonjour"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello", "annotations": []},
                                          {"type": "text", "text": "\n(a greeting)"}]},
    ]}
    path.write_text(json.dumps(record) + "\n")
    dialogues, rejects = split_items(messages.read(path))
    assert rejects == []
    assert [(d.meta, turn_pairs(d)) for d in dialogues] == [
        ({"system": "Be brief."}, [("user", "Translate: bonjour"), ("assistant", "Hello\n(a greeting)")]),
    ]


def test_parts_that_are_not_text_reject_the_record_by_type(tmp_path):
    path = tmp_path / "vision.jsonl"
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image, audio, image]},
                      {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dialogues, rejects = split_items(messages.read(path))
    assert dialogues == []
    assert [(r.line, r.reason) for r in rejects] == [
        (1, "message 0: field 'content': part type(s) image_url, input_audio not supported (only text parts are)"),
        (2, "message 1: field 'content': part type(s) refusal not supported (only text parts are)"),
    ]


def test_content_text_joins_text_parts_with_nothing_added():
    assert content_text("plain") == "plain"
    assert content_text([]) == ""
    assert content_text([{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]) == "one two"
    assert content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"


@pytest.mark.parametrize(("content", "message"), [
    (None, "expected a string or a list of content parts, got null"),
    (42, "expected a string or a list of content parts, got a number"),
    ({"type": "text", "text": "hi"}, "expected a string or a list of content parts, got an object"),
    (["hi"], "part 0 must be an object, got a string"),
    ([{"type": "text", "text": "hi"}, {"text": "no type"}], "part 1 must have a string 'type', got null"),
    ([{"type": "text", "text": ["nested"]}], "part 0 (text) must have a string 'text', got a list"),
    ([{"type": "file", "file": {"file_id": "f1"}}, {"type": "text", "text": None}],
     "part type(s) file not supported (only text parts are)"),
])
def test_content_text_says_what_is_wrong(content, message):
    with pytest.raises(ValueError) as err:
        content_text(content)
    assert str(err.value) == message
