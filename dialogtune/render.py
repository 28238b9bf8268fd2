"""Render an example with its chat template, knowing where every message sits in the text.

How a message is located without guessing: the template is rendered with each message's
content replaced by a unique placeholder, and the real contents are spliced back in. This
gives every message's character span in the exact text `apply_chat_template` produces. The
placeholder render (the skeleton) depends only on the roles and names, so it is done once per
dialogue shape and checked against a real render (see VERIFY_EVERY). A trained message's span
runs from its first character through the template's end-of-turn marker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dialogtune.errors import TemplateError
from dialogtune.tasks import Example
from dialogtune.templates import ChatTemplate, content_is_opaque, uses_names

_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
MAX_SKELETONS = 4096
# With a template that writes content only as it is (see templates.content_is_opaque), every
# new dialogue shape and every VERIFY_EVERY-th example is also rendered for real and compared;
# with any other template, every example is. An example whose real text differs is rejected.
VERIFY_EVERY = 1000


class ExampleRejected(ValueError):
    """This example cannot be labelled exactly (the template rewrites or refuses it)."""


@dataclass(slots=True)
class Rendered:
    text: str
    trained_spans: list[tuple[int, int]]  # character spans, end-of-turn included
    message_starts: list[int | None]  # character offset of each message's content


def compile_template(source: str):
    """The same compiled Jinja template `apply_chat_template` renders with."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


class TemplateRenderer:
    def __init__(self, template: ChatTemplate, special_tokens: dict[str, str]):
        self.template = template
        self._compiled = compile_template(template.source)
        # apply_chat_template passes the special tokens (bos_token, eos_token, ...) to the template.
        self._variables = dict(special_tokens)
        self._skeletons: dict[tuple, tuple[list[str], list[int]]] = {}
        self._rendered = 0
        self._verify_every_example = not content_is_opaque(template.source)
        self._names_matter = uses_names(template.source)

    def render(self, example: Example) -> Rendered:
        chat = example.chat()
        literals, order, new_shape = self._skeleton(chat)
        pieces: list[str] = [literals[0]]
        starts: list[int | None] = [None] * len(chat)
        ends: list[int] = [0] * len(chat)
        length = len(literals[0])
        for position, index in enumerate(order):
            content = chat[index]["content"]
            starts[index] = length
            length += len(content)
            ends[index] = length
            literal = literals[position + 1]
            pieces += (content, literal)
            length += len(literal)
        text = "".join(pieces)
        self._rendered += 1
        if new_shape or self._verify_every_example or self._rendered % VERIFY_EVERY == 1:
            self._check_splice(chat, text)
        spans = []
        for position, index in enumerate(order):
            if not example.messages[index]["train"]:
                continue
            gap_end = starts[order[position + 1]] if position + 1 < len(order) else len(text)
            marker = text.find(self.template.end_of_turn, ends[index], gap_end)
            if marker < 0:
                raise TemplateError(
                    f"template {self.template.name!r} does not write its end-of-turn marker"
                    f" {self.template.end_of_turn!r} after an assistant message"
                )
            spans.append((starts[index], marker + len(self.template.end_of_turn)))
        for index, message in enumerate(example.messages):
            if message["train"] and starts[index] is None:
                raise TemplateError(f"template {self.template.name!r} does not render {message['role']!r} messages")
        return Rendered(text, spans, starts)

    def _render_text(self, chat: list[dict]) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=False, **self._variables)
        except jinja2.TemplateError as err:  # e.g. raise_exception("roles must alternate")
            raise ExampleRejected(f"the chat template refuses this conversation: {err}") from err

    def _skeleton(self, chat: list[dict]) -> tuple[list[str], list[int], bool]:
        """The template's own text around the messages: literal pieces and the message order.
        It depends only on the roles and names, so it is rendered once per shape of dialogue."""
        key = tuple((m["role"], m.get("name") if self._names_matter else None) for m in chat)
        cached = self._skeletons.get(key)
        if cached is not None:
            return (*cached, False)
        skeleton = self._render_text([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(chat)])
        literals, order, cursor = [], [], 0
        for match in _PLACEHOLDER.finditer(skeleton):
            literals.append(skeleton[cursor : match.start()])
            order.append(int(match.group(1)))
            cursor = match.end()
        literals.append(skeleton[cursor:])
        if len(self._skeletons) >= MAX_SKELETONS:
            self._skeletons.clear()
        self._skeletons[key] = (literals, order)
        return literals, order, True

    def _check_splice(self, chat: list[dict], text: str) -> None:
        real = self._render_text(chat)  # what apply_chat_template renders
        if real != text:
            at = next((i for i, (a, b) in enumerate(zip(real, text)) if a != b), min(len(real), len(text)))
            raise ExampleRejected(
                f"the chat template rewrites message text here (real render {real[at:at + 40]!r} vs message"
                f" text {text[at:at + 40]!r}); it cannot be labelled exactly"
            )
