"""Prompt formats as Jinja chat templates: the model's own, or one shipped here.

Each template knows its end-of-turn marker: the text after a message that the model must
learn to produce so it stops (`<|im_end|>` for ChatML, the EOS token for most others,
a newline for `Name: text` transcripts).

Conversations with tool calls need a template that writes them (`renders_tool_calls`): the
model's own if it does, else the shipped `chatml_tools`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources

from dialogtune.errors import TemplateError

# name -> end-of-turn marker; "{eos}" stands for the tokenizer's EOS token.
SHIPPED = {
    "chatml": "<|im_end|>",
    "user_assistant": "{eos}",
    "transcript": "\n",
    "dialogpt": "{eos}",
    "llama2": "{eos}",
    "vicuna": "{eos}",
    "chatml_tools": "<|im_end|>",  # ChatML that writes tool calls (TOOLS_TEMPLATE)
}
MODEL_TEMPLATE = "model"  # the tokenizer's own chat template
# What tool-calling conversations (task.tool_calls) are rendered with when the model's own template
# writes no tool calls: a template that ignores `tool_calls` would train an empty assistant turn.
TOOLS_TEMPLATE = "chatml_tools"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    end_of_turn: str


def shipped_source(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def special_token_strings(tokenizer) -> list[str]:
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in tokens if t), key=len, reverse=True)


def detect_end_of_turn(tokenizer, source: str) -> str:
    """The first special token a template writes after an assistant message."""
    probe = "\ue000probe\ue001"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe},
         {"role": "user", "content": "bye"}],
        chat_template=source, tokenize=False,
    )
    after = rendered[rendered.index(probe) + len(probe):]
    found = [(after.find(tok), -len(tok), tok) for tok in special_token_strings(tokenizer) if tok in after]
    if not found:
        raise TemplateError(
            "cannot tell where an assistant turn ends in this chat template (no special token follows"
            f" the message; it is followed by {after[:40]!r}); set template.end_of_turn"
        )
    return min(found)[2]


def _template_ast(source: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source).environment.parse(source)


def _names_field(node, field: str) -> bool:
    from jinja2 import nodes

    return (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == field) or (
        isinstance(node, nodes.Getattr) and node.attr == field)


def content_is_opaque(source: str) -> bool:
    """True when the template only ever writes `content` out as it is: never tests it, filters
    it (`| trim`), splits it or assigns it. Then a render with placeholders, spliced with the
    real texts, is exactly the real render, whatever the texts are. Otherwise (Qwen-style
    `<think>` stripping, Llama-3's `| trim`) every example is checked against a real render."""
    from jinja2 import nodes

    safe = {(nodes.Template, "body"), (nodes.Output, "nodes"), (nodes.Add, "left"), (nodes.Add, "right"),
            (nodes.Concat, "nodes"), (nodes.If, "body"), (nodes.If, "elif_"), (nodes.If, "else_"),
            (nodes.For, "body"), (nodes.For, "else_"), (nodes.CallBlock, "body"), (nodes.Scope, "body")}

    def walk(node, path_safe: bool) -> bool:
        if _names_field(node, "content"):
            return path_safe
        for field in node.fields:
            value = getattr(node, field)
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, nodes.Node) and not walk(child, path_safe and (type(node), field) in safe):
                    return False
        return True

    return walk(_template_ast(source), True)


def uses_names(source: str) -> bool:
    """Whether the template reads a message's `name` (transcripts do; ChatML does not). A tool
    call's `function.name` is not a speaker's name: it is part of the call's own text."""
    from jinja2 import nodes

    return any(_names_field(node, "name") and not _names_field(node.node, "function")
               for node in _template_ast(source).find_all((nodes.Getitem, nodes.Getattr)))


def renders_tool_calls(source: str) -> bool:
    """Whether the template reads a message's `tool_calls` (Qwen, Llama 3.1, Hermes, chatml_tools
    do; SmolLM2's and plain ChatML do not, and would drop the calls without a word)."""
    from jinja2 import nodes

    return any(_names_field(node, "tool_calls")
               for node in _template_ast(source).find_all((nodes.Getitem, nodes.Getattr)))


def resolve_template(name: str, tokenizer, end_of_turn: str | None = None, tools: bool = False) -> ChatTemplate:
    """The template `name` stands for. With `tools` (conversations with tool calls), a model
    template without tool calls gives way to the shipped TOOLS_TEMPLATE (said on stderr), and a
    shipped one without them is refused."""
    if name == MODEL_TEMPLATE:
        source = tokenizer.chat_template
        if not isinstance(source, str) or not source:
            raise TemplateError(
                f"the tokenizer {tokenizer.name_or_path!r} has no chat template of its own;"
                f" choose one with template.name: {', '.join(SHIPPED)}"
            )
        if not tools or renders_tool_calls(source):
            return ChatTemplate(name, source, end_of_turn or detect_end_of_turn(tokenizer, source))
        print(f"note: the chat template of {tokenizer.name_or_path!r} writes no tool calls; task.tool_calls"
              f" renders with the shipped {TOOLS_TEMPLATE!r} template instead (template.name chooses another)",
              file=sys.stderr)
        name = TOOLS_TEMPLATE
    if name not in SHIPPED:
        import difflib

        close = difflib.get_close_matches(name, [*SHIPPED, MODEL_TEMPLATE], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TemplateError(f"unknown template {name!r}{hint}; choose one of: {MODEL_TEMPLATE}, {', '.join(SHIPPED)}")
    if tools and not renders_tool_calls(shipped_source(name)):
        raise TemplateError(f"template {name!r} writes no tool calls, which task.tool_calls trains; use"
                            f" {TOOLS_TEMPLATE!r} or a model template that has them (template.name: {MODEL_TEMPLATE})")
    marker = end_of_turn or SHIPPED[name]
    if "{eos}" in marker:
        if not tokenizer.eos_token:
            raise TemplateError(f"template {name!r} ends turns with the EOS token, but the tokenizer has none")
        marker = marker.replace("{eos}", tokenizer.eos_token)
    return ChatTemplate(name, shipped_source(name), marker)
