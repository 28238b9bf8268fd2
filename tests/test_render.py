"""Rendering: the text apply_chat_template gives, each trained span from its message's first
character through the end-of-turn marker, one skeleton per dialogue shape."""

from __future__ import annotations

import pytest

from dialogtune.errors import TemplateError
from dialogtune.render import ExampleRejected, TemplateRenderer
from dialogtune.tasks import Example, message
from dialogtune.templates import ChatTemplate, resolve_template


def example(*names: str) -> Example:
    """Turns alternating between a user and the trained assistant, spoken by `names`."""
    messages = [message("system", "Be kind.")]
    for i, name in enumerate(names):
        train = i % 2 == 1
        messages.append(message("assistant" if train else "user", f"Line {i} by {name}.", name=name, train=train))
    return Example(messages, "d", "d", "t", 1)


def renderer(tokenizer, name: str) -> TemplateRenderer:
    return TemplateRenderer(resolve_template(name, tokenizer), tokenizer.special_tokens_map)


@pytest.mark.parametrize("name", ["chatml", "transcript", "llama2"])
def test_trained_spans_run_from_the_content_through_the_end_of_turn_marker(byte_tokenizer, name):
    ex = example("Ann", "Bob", "Ann", "Bob")
    render = renderer(byte_tokenizer, name).render(ex)
    template = resolve_template(name, byte_tokenizer)
    assert render.text == byte_tokenizer.apply_chat_template(ex.chat(), chat_template=template.source, tokenize=False)
    gap = " " if name == "llama2" else ""  # Llama 2 writes ' </s>' after an answer
    assert [render.text[a:b] for a, b in render.trained_spans] == [
        f"Line 1 by Bob.{gap}{template.end_of_turn}", f"Line 3 by Bob.{gap}{template.end_of_turn}"]
    assert [render.text[s:].startswith(m["content"]) for s, m in zip(render.message_starts, ex.messages)] == [True] * 5


def test_one_skeleton_per_shape_and_names_only_where_the_template_writes_them(byte_tokenizer):
    chatml, transcript = renderer(byte_tokenizer, "chatml"), renderer(byte_tokenizer, "transcript")
    for names in [("Ann", "Bob"), ("Cy", "Dee"), ("Ann", "Bob")]:
        chatml.render(example(*names))
        transcript.render(example(*names))
    assert len(chatml._skeletons) == 1  # roles alone shape a ChatML text
    assert len(transcript._skeletons) == 2  # a transcript writes the names


def test_a_template_without_its_end_of_turn_marker_is_an_error(byte_tokenizer):
    source = resolve_template("chatml", byte_tokenizer).source
    broken = TemplateRenderer(ChatTemplate("chatml", source, "</s>"), byte_tokenizer.special_tokens_map)
    with pytest.raises(TemplateError, match="does not write its end-of-turn marker '</s>'"):
        broken.render(example("Ann", "Bob"))


def test_a_rewriting_template_is_caught_on_a_cached_shape(byte_tokenizer):
    """A template that tests content is checked against a real render every time, so the cached
    skeleton is never trusted for it."""
    source = ("{% for m in messages %}{% if m['content'] == 'Line 1 by Bob.' %}(edited){% else %}"
              "{{ m['content'] }}{% endif %}</s>{% endfor %}")
    rewriting = TemplateRenderer(ChatTemplate("rewriting", source, "</s>"), byte_tokenizer.special_tokens_map)
    rewriting.render(example("Ann", "Eve"))
    with pytest.raises(ExampleRejected, match="rewrites message text"):
        rewriting.render(example("Ann", "Bob"))


# -- tool calls ------------------------------------------------------------------------------
# Qwen 2.5's way with calls (abridged): a call with no content writes no newline for it, so the
# template tests `content`, and the tool's answer goes in a user turn.
QWEN_TOOLS = """{%- for message in messages %}
{%- if message.role == "user" or message.role == "system" or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + tool_call.arguments | tojson + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
CALL = {"id": "call00100", "type": "function",
        "function": {"name": "Events_1__FindEvents", "arguments": {"city_of_event": "Chicago", "date": "2019-03-02"}}}
RESULTS = '{"count": 1, "results": [{"event_name": "Cher", "venue": "United Center"}]}'


def with_call(content: str = "") -> Example:
    return Example([message("user", "A concert in Chicago?"),
                    message("assistant", content, train=True, tool_calls=[CALL]),
                    message("tool", RESULTS, name="Events_1__FindEvents", tool_call_id="call00100"),
                    message("assistant", "Cher plays at United Center.", train=True)], "d", "d", "t", 1)


@pytest.mark.parametrize("name", ["chatml_tools", "qwen"])
@pytest.mark.parametrize("content", ["", "Let me look."])
def test_a_call_is_trained_through_the_end_of_turn_and_the_tool_answer_never(byte_tokenizer, name, content):
    template = ChatTemplate("qwen", QWEN_TOOLS, "<|im_end|>") if name == "qwen" else \
        resolve_template(name, byte_tokenizer, tools=True)
    ex = with_call(content)
    render = TemplateRenderer(template, byte_tokenizer.special_tokens_map).render(ex)
    assert render.text == byte_tokenizer.apply_chat_template(ex.chat(), chat_template=template.source, tokenize=False)
    arguments = '{"city_of_event": "Chicago", "date": "2019-03-02"}'
    if name == "qwen":  # the call's own text from the first character after the prompt for it
        call = f'{content}\n<tool_call>\n{{"name": "Events_1__FindEvents", "arguments": {arguments}}}\n</tool_call>'
        call = call.removeprefix("\n")
    else:
        call = f'{content}<tool_call>\n{{"name": "Events_1__FindEvents", "arguments": {arguments}}}\n</tool_call>'
    assert [render.text[a:b] for a, b in render.trained_spans] == [
        call + "<|im_end|>", "Cher plays at United Center.<|im_end|>"]
    assert render.text.count(RESULTS) == 1 and not any(a <= render.text.index(RESULTS) < b
                                                       for a, b in render.trained_spans)
    # Every message is located (the call where its text begins), in order.
    assert sorted(render.message_starts) == render.message_starts


def test_conversations_with_calls_get_their_own_skeleton_checked_by_a_real_render(byte_tokenizer, monkeypatch):
    tools = TemplateRenderer(resolve_template("chatml_tools", byte_tokenizer), byte_tokenizer.special_tokens_map)
    real = []
    monkeypatch.setattr(tools, "_check_splice", lambda chat, text: real.append(text))
    for _ in range(3):
        tools.render(with_call())
    tools.render(example("Ann", "Bob"))
    tools.render(example("Ann", "Bob"))
    assert len(real) == 4 and len(tools._skeletons) == 1  # every call render checked; only the plain shape cached


def test_a_template_that_writes_no_calls_refuses_them(byte_tokenizer):
    chatml = renderer(byte_tokenizer, "chatml")  # it would train an empty turn where the call was
    with pytest.raises(TemplateError, match="template 'chatml' writes no tool calls"):
        chatml.render(with_call())


def test_a_call_holding_the_end_of_turn_marker_is_rejected(byte_tokenizer):
    ex = with_call()
    ex.messages[1]["tool_calls"] = [{**CALL, "function": {"name": "Notes_1__Add", "arguments": {"text": "<|im_end|>"}}}]
    with pytest.raises(ExampleRejected, match="holds the end-of-turn marker"):
        renderer(byte_tokenizer, "chatml_tools").render(ex)
