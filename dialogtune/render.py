"""Render an example with its chat template, knowing where every message sits in the text.

How a message is located without guessing: the template is rendered with each message's
content replaced by a unique placeholder, and the real contents are spliced back in. This
gives every message's character span in the exact text `apply_chat_template` produces. The
placeholder render (the skeleton) depends only on the roles and names, so it is done once per
dialogue shape and checked against a real render (see VERIFY_EVERY). A trained message's span
runs from its first character through the template's end-of-turn marker.

Tool calls are written by the template from a message's `tool_calls`, not its content, and
their arguments differ in every example: a conversation with calls gets its own skeleton (never
cached) and is always checked against a real render. A call with no content (the usual case)
has no placeholder, and templates test for that (Qwen's `if message.content`), so its span
starts where the prompt for it ends: the conversation before it rendered with the generation
prompt, which must be where the whole render starts. The call's text is trained, through the
end-of-turn marker; a `tool` message is context like any other untrained message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from dialogtune.errors import TemplateError
from dialogtune.tasks import Example
from dialogtune.templates import ChatTemplate, content_is_opaque, renders_tool_calls, uses_names

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
    message_starts: list[int | None]  # character offset of each message's content (a bare call's own text)


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
        self._writes_calls = renders_tool_calls(template.source)

    def render(self, example: Example) -> Rendered:
        chat = example.chat()
        # Messages with calls and no content: located by their prompt, not by a placeholder.
        bare_calls = {i for i, m in enumerate(chat) if m.get("tool_calls") and not m["content"]}
        calls = bare_calls or any(m.get("tool_calls") for m in chat)
        if calls and not self._writes_calls:  # it would train an empty turn where the call was
            raise TemplateError(f"template {self.template.name!r} writes no tool calls; render conversations"
                                " with calls with one that does (chatml_tools, or the model's own if it has them)")
        literals, order, new_shape = self._skeleton(chat, bare_calls, cache=not calls)
        pieces: list[str] = [literals[0]]
        starts: list[int | None] = [None] * len(chat)
        ends: list[int | None] = [None] * len(chat)
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
        for index in sorted(bare_calls):
            starts[index] = ends[index] = self._prompt_end(chat, index, text)
        if calls:
            self._check_calls(chat, example.messages)
        located = sorted((start, index) for index, start in enumerate(starts) if start is not None)
        spans = []
        for position, (start, index) in enumerate(located):
            if not example.messages[index]["train"]:
                continue
            gap_end = located[position + 1][0] if position + 1 < len(located) else len(text)
            marker = text.find(self.template.end_of_turn, ends[index], gap_end)
            if marker < 0:
                raise TemplateError(
                    f"template {self.template.name!r} does not write its end-of-turn marker"
                    f" {self.template.end_of_turn!r} after an assistant message"
                )
            spans.append((start, marker + len(self.template.end_of_turn)))
        for index, message in enumerate(example.messages):
            if message["train"] and starts[index] is None:
                raise TemplateError(f"template {self.template.name!r} does not render {message['role']!r} messages")
        return Rendered(text, spans, starts)

    def _prompt_end(self, chat: list[dict], index: int, text: str) -> int:
        """Where message `index` begins: after the conversation before it and the generation
        prompt (what inference would give the model to continue)."""
        prompt = self._render_text(chat[:index], add_generation_prompt=True)
        if not text.startswith(prompt):
            raise ExampleRejected(
                f"the chat template writes the conversation before tool call message {index} otherwise than as"
                " a prompt for it; the call cannot be located exactly"
            )
        return len(prompt)

    def _check_calls(self, chat: list[dict], messages: list[dict]) -> None:
        """A call's text runs on to the first end-of-turn marker after it: one inside its
        arguments would cut its trained span short."""
        for m, message in zip(chat, messages, strict=True):
            if message["train"] and m.get("tool_calls") and \
                    self.template.end_of_turn in json.dumps(m["tool_calls"], ensure_ascii=False):
                raise ExampleRejected(
                    f"a tool call holds the end-of-turn marker {self.template.end_of_turn!r}; it cannot be labelled exactly"
                )

    def _render_text(self, chat: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._variables)
        except jinja2.TemplateError as err:  # e.g. raise_exception("roles must alternate")
            raise ExampleRejected(f"the chat template refuses this conversation: {err}") from err

    def _skeleton(self, chat: list[dict], bare: set[int], cache: bool = True) -> tuple[list[str], list[int], bool]:
        """The template's own text around the messages: literal pieces and the message order.
        It depends only on the roles and names, so it is rendered once per shape of dialogue;
        with tool calls, whose text is the template's, it is rendered each time (`cache` off).
        Messages in `bare` keep their (empty) content: they get no placeholder."""
        key = tuple((m["role"], m.get("name") if self._names_matter else None) for m in chat)
        cached = self._skeletons.get(key) if cache else None
        if cached is not None:
            return (*cached, False)
        skeleton = self._render_text([m if i in bare else {**m, "content": f"\ue000{i}\ue001"}
                                      for i, m in enumerate(chat)])
        literals, order, cursor = [], [], 0
        for match in _PLACEHOLDER.finditer(skeleton):
            literals.append(skeleton[cursor : match.start()])
            order.append(int(match.group(1)))
            cursor = match.end()
        literals.append(skeleton[cursor:])
        if cache:
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
