"""Every shipped template, and SmolLM2's own, gives exactly the ids apply_chat_template gives,
with exactly the trained messages (plus their end-of-turn marker) labelled."""

from __future__ import annotations

import numpy as np
import pytest

from dialogtune.errors import TemplateError
from dialogtune.tasks import Example, message
from dialogtune.templates import SHIPPED, detect_end_of_turn, resolve_template, shipped_source
from dialogtune.tokenize import IGNORE_INDEX, ExampleEncoder

CONVERSATION = [
    message("system", "You are Bob, a friendly travel agent."),
    message("user", "Hello there! How are you doing today?", name="Alice"),
    message("assistant", "I'm fine, thanks for asking.", name="Bob", train=True),
    message("user", "I would like to find a restaurant in San Jose.", name="Alice"),
    message("assistant", "There are 10 restaurants you may like. What about Sushi Sam?", name="Bob", train=True),
]


def example(messages=CONVERSATION) -> Example:
    return Example([dict(m) for m in messages], "d0", "d0", "test", 1)


def reference_ids(tokenizer, chat, source) -> list[int]:
    return tokenizer.apply_chat_template(chat, chat_template=source, tokenize=True, return_dict=False)


def trained_runs(tokenizer, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    mask = labels != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    return [tokenizer.decode(chunk.tolist()) for chunk, m in zip(np.split(ids, edges), np.split(mask, edges)) if m[0]]


def check_exact(tokenizer, template_name: str, source_tokenizer=None):
    template = resolve_template(template_name, tokenizer)
    encoder = ExampleEncoder(tokenizer, template, max_length=4096)
    tokenized, _ = encoder.encode_one(example())
    chat = example().chat()
    assert tokenized.input_ids.tolist() == reference_ids(tokenizer, chat, template.source)
    # Labels equal ids where trained, and the trained runs are exactly the assistant turns + marker.
    trained = tokenized.labels != IGNORE_INDEX
    assert (tokenized.labels[trained] == tokenized.input_ids[trained]).all()
    assert tokenized.labels[0] == IGNORE_INDEX
    runs = trained_runs(tokenizer, tokenized.input_ids, tokenized.labels)
    # Llama 2 writes " </s>" after an answer: the space belongs to the trained turn too.
    gap = " " if template_name == "llama2" else ""
    expected = [m["content"] + gap + template.end_of_turn for m in CONVERSATION if m["train"]]
    assert len(runs) == len(expected)
    for run, want in zip(runs, expected):
        # A token may straddle the end of the marker (a Metaspace "\nA" joins the newline to the
        # next speaker's name); it is trained because it holds the marker. Nothing more may be.
        run = run.lstrip(" ")
        assert run.startswith(want) and len(run) - len(want) <= 1, (run, want)
    return tokenized


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_template_matches_apply_chat_template_byte_level(byte_tokenizer, name):
    check_exact(byte_tokenizer, name)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_template_matches_apply_chat_template_metaspace(metaspace_tokenizer, name):
    check_exact(metaspace_tokenizer, name)


@pytest.mark.parametrize("name", ["user_assistant", "llama2", "vicuna"])
def test_no_double_bos(byte_tokenizer, name):
    tokenized = check_exact(byte_tokenizer, name)
    bos = byte_tokenizer.bos_token_id
    assert tokenized.input_ids[0] == bos
    assert tokenized.input_ids[1] != bos
    # llama2 opens one block per user turn, each with exactly one BOS.
    expected = 2 if name == "llama2" else 1
    assert int((tokenized.input_ids == bos).sum()) == expected


def test_transcript_names_speakers_and_ends_turns_with_newline(byte_tokenizer):
    template = resolve_template("transcript", byte_tokenizer)
    text = byte_tokenizer.apply_chat_template(example().chat(), chat_template=template.source, tokenize=False)
    assert text.splitlines() == [
        "You are Bob, a friendly travel agent.",
        "Alice: Hello there! How are you doing today?",
        "Bob: I'm fine, thanks for asking.",
        "Alice: I would like to find a restaurant in San Jose.",
        "Bob: There are 10 restaurants you may like. What about Sushi Sam?",
    ]
    prompt = byte_tokenizer.apply_chat_template(example().chat()[:4], chat_template=template.source,
                                                tokenize=False, add_generation_prompt=True, assistant_name="Bob")
    assert prompt.endswith("\nBob:")
    assert template.end_of_turn == "\n"


def test_model_template_end_of_turn_is_detected(byte_tokenizer):
    assert detect_end_of_turn(byte_tokenizer, shipped_source("chatml")) == "<|im_end|>"
    with pytest.raises(TemplateError, match="set template.end_of_turn"):
        detect_end_of_turn(byte_tokenizer, shipped_source("transcript"))


def test_tokenizer_without_template_is_refused_with_the_choices(byte_tokenizer):
    assert byte_tokenizer.chat_template is None
    with pytest.raises(TemplateError, match="no chat template of its own.*chatml, user_assistant"):
        resolve_template("model", byte_tokenizer)


def test_unknown_template_suggests_a_name(byte_tokenizer):
    with pytest.raises(TemplateError, match="did you mean 'chatml'"):
        resolve_template("chatlm", byte_tokenizer)


def test_template_that_rewrites_content_is_refused(byte_tokenizer):
    from dialogtune.templates import ChatTemplate
    from dialogtune.tokenize import ExampleRejected

    upper = "{% for m in messages %}{{ m['content'] | upper }}{{ eos_token }}{% endfor %}"
    encoder = ExampleEncoder(byte_tokenizer, ChatTemplate("upper", upper, "</s>"), 512)
    with pytest.raises(ExampleRejected, match="rewrites message text"):
        encoder.encode_one(example())


THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
            "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}")


def test_content_analysis_tells_opaque_templates_from_rewriting_ones():
    from dialogtune.templates import content_is_opaque, uses_names

    assert all(content_is_opaque(shipped_source(n)) for n in ("chatml", "user_assistant", "transcript", "vicuna"))
    assert not content_is_opaque(THINKING)
    assert not content_is_opaque("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}")
    assert not content_is_opaque("{% for m in messages %}{% if m.content %}{{ m.content }}{% endif %}{% endfor %}")
    assert uses_names(shipped_source("transcript")) and not uses_names(shipped_source("chatml"))


def test_tool_calls_pick_a_template_that_writes_them(byte_tokenizer, capsys):
    from dialogtune.templates import renders_tool_calls, uses_names

    assert renders_tool_calls(shipped_source("chatml_tools")) and not renders_tool_calls(shipped_source("chatml"))
    assert not uses_names(shipped_source("chatml_tools"))  # a call's function name is not a speaker's
    byte_tokenizer.chat_template = shipped_source("chatml")  # a model template without calls, like SmolLM2's
    try:
        assert resolve_template("model", byte_tokenizer).name == "model"
        assert capsys.readouterr().err == ""
        tools = resolve_template("model", byte_tokenizer, tools=True)
        assert (tools.name, tools.source, tools.end_of_turn) == (
            "chatml_tools", shipped_source("chatml_tools"), "<|im_end|>")
        assert "writes no tool calls; task.tool_calls renders with the shipped 'chatml_tools'" in capsys.readouterr().err
        byte_tokenizer.chat_template = shipped_source("chatml_tools")  # a model template with calls is kept
        assert resolve_template("model", byte_tokenizer, tools=True).name == "model"
    finally:
        byte_tokenizer.chat_template = None
    assert resolve_template("chatml_tools", byte_tokenizer, tools=True).name == "chatml_tools"
    with pytest.raises(TemplateError, match="template 'chatml' writes no tool calls.*use 'chatml_tools'"):
        resolve_template("chatml", byte_tokenizer, tools=True)


def test_only_the_examples_a_template_rewrites_are_rejected(byte_tokenizer):
    from dialogtune.templates import ChatTemplate
    from dialogtune.tokenize import TokenizeStats

    encoder = ExampleEncoder(byte_tokenizer, ChatTemplate("thinking", THINKING, "<|im_end|>"), 512)
    plain = example(CONVERSATION[1:])
    thinking = example([CONVERSATION[1], message("assistant", "<think>plan</think>Hello.", train=True)])
    stats = TokenizeStats()
    kept = list(encoder.encode([plain, thinking, plain], stats))
    assert len(kept) == 2  # the same shape twice: the cached skeleton is still checked every time
    (reject,) = stats.rejects
    assert "rewrites message text" in reject.reason and reject.stage == "tokenize"
    assert kept[0].input_ids.tolist() == reference_ids(byte_tokenizer, plain.chat(), THINKING)


def test_a_conversation_the_template_refuses_is_a_reject(byte_tokenizer):
    from dialogtune.templates import ChatTemplate
    from dialogtune.tokenize import TokenizeStats

    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{{ m['content'] }}</s>{% endfor %}")
    encoder = ExampleEncoder(byte_tokenizer, ChatTemplate("strict", strict, "</s>"), 512)
    stats = TokenizeStats()
    assert list(encoder.encode([example()], stats)) == []  # starts with a system message: refused
    assert stats.rejects[0].reason == ("the chat template refuses this conversation:"
                                       " Conversation roles must alternate")


@pytest.mark.slow
def test_smollm2_own_template_is_exact():
    from dialogtune.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    template = resolve_template("model", tokenizer)
    assert template.end_of_turn == "<|im_end|>"
    encoder = ExampleEncoder(tokenizer, template, max_length=4096)
    for messages in (CONVERSATION, CONVERSATION[1:]):  # with and without a system prompt
        tokenized, _ = encoder.encode_one(example(messages))
        chat = example(messages).chat()
        assert tokenized.input_ids.tolist() == reference_ids(tokenizer, chat, template.source)
        runs = trained_runs(tokenizer, tokenized.input_ids, tokenized.labels)
        assert runs == [m["content"] + "<|im_end|>" for m in messages if m["train"]]
    # Without a system message SmolLM2's template writes its default one: untrained.
    text = tokenizer.decode(tokenized.input_ids.tolist())
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.slow
def test_smollm2_with_tool_calls_renders_chatml_tools_exactly():
    """SmolLM2's own template writes no calls: the SGD calls go through chatml_tools, exactly."""
    import json

    from helpers import FIXTURES, split_items

    from dialogtune.models import load_tokenizer
    from dialogtune.readers import sgd
    from dialogtune.tasks.respond import respond

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    template = resolve_template("model", tokenizer, tools=True)
    assert template.name == "chatml_tools"
    (dialogue,), _ = split_items(sgd.read(FIXTURES / "sgd_calls"))
    (ex,) = respond(dialogue, {"SYSTEM"}, tool_calls=True)
    tokenized, _ = ExampleEncoder(tokenizer, template, max_length=4096).encode_one(ex)
    assert tokenized.input_ids.tolist() == reference_ids(tokenizer, ex.chat(), template.source)
    calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
             for m in ex.messages if m.get("tool_calls") for c in m["tool_calls"]]
    replies = [m["content"] for m in ex.messages if m["train"] and not m.get("tool_calls")]
    assert trained_runs(tokenizer, tokenized.input_ids, tokenized.labels) == [
        "<tool_call>\n" + calls[0] + "\n</tool_call><|im_end|>", replies[0] + "<|im_end|>", replies[1] + "<|im_end|>",
        "<tool_call>\n" + calls[1] + "\n</tool_call><|im_end|>", replies[2] + "<|im_end|>", replies[3] + "<|im_end|>"]
