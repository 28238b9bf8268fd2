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
