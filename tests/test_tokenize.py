"""The encoder end to end: ids equal apply_chat_template's, and exactly the trained messages plus
their end-of-turn marker are labelled. Checked against the slow reference of
benchmarks/check_labels_exact.py on fixtures shaped like the real data sets, token by token on
the shapes real data has (per shipped template), and against transformers' assistant mask."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES

import dialogtune.tokenize
from dialogtune.dialogue import Dialogue, Turn
from dialogtune.errors import TemplateError
from dialogtune.readers import read_dialogues
from dialogtune.tasks import Example, message
from dialogtune.tasks.respond import respond
from dialogtune.templates import SHIPPED, ChatTemplate, resolve_template
from dialogtune.tokenize import IGNORE_INDEX, ExampleEncoder, TokenizeStats

ROOT = Path(__file__).resolve().parents[1]


def test_labels_are_int32_and_ids_match_labels(byte_tokenizer):
    example = Example([message("user", "Hi."), message("assistant", "Hello.", train=True)], "d", "d", "t", 1)
    (piece,) = ExampleEncoder(byte_tokenizer, resolve_template("chatml", byte_tokenizer), 4096).encode(
        [example], TokenizeStats())
    assert piece.input_ids.dtype == np.int32 and piece.labels.dtype == np.int32
    trained = piece.labels != IGNORE_INDEX
    assert np.array_equal(piece.labels[trained], piece.input_ids[trained])


def test_slow_tokenizer_is_refused(byte_tokenizer):

    class Slow:
        name_or_path = "slow-one"

    with pytest.raises(TemplateError, match="not a fast"):
        ExampleEncoder(Slow(), resolve_template("chatml", byte_tokenizer), 10)


# -- the slow reference, on fixtures shaped like the real sets ----------------------------
@pytest.fixture(scope="module")
def label_check():
    """benchmarks/check_labels_exact.py: the check the README's exactness claim rests on."""
    spec = importlib.util.spec_from_file_location("check_labels_exact", ROOT / "benchmarks" / "check_labels_exact.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# name: (fixture, format). SAMSum itself may not be shipped (its licence): samsum_shaped.json
# is written in its shape, with its '<file_photo>' lines and runs of turns by one speaker.
FIXTURE_SETS = {"sgd": ("sgd", "sgd"), "samsum": ("samsum_shaped.json", "rows"), "msc": ("msc_sample.json", "msc"),
                "personachat": ("personachat.txt", "parlai"), "transcript": ("transcript.txt", "transcript"),
                "sgd_tools": ("sgd_calls", "sgd")}  # as tool-calling conversations, with chatml_tools


def fixture_sample() -> dict[str, list[Dialogue]]:
    return {name: [d for d in read_dialogues(FIXTURES / path, fmt) if isinstance(d, Dialogue)]
            for name, (path, fmt) in FIXTURE_SETS.items()}


@pytest.mark.parametrize("tokenizer_name", ["byte_tokenizer", "metaspace_tokenizer"])
def test_ids_and_labels_equal_the_slow_reference_on_every_template_and_length(label_check, request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    rows = label_check.check(tokenizer, fixture_sample(), label_check.templates_for(tokenizer))
    assert [f"{r.source} {r.template} {r.max_length}: {p}" for r in rows for p in r.problems] == []
    assert {r.template for r in rows} == set(SHIPPED) and {r.max_length for r in rows} == {4096, 192, 64}
    # The calls are checked with the one shipped template that writes them, and some are trained.
    tools = [r for r in rows if r.source == "sgd_tools"]
    assert {r.template for r in tools} == {"chatml_tools"} and tools[0].trained > 0
    # Not vacuous: whole examples, examples cut into pieces and turns too long for any piece.
    assert all(r.pieces == r.examples and not r.too_long for r in rows if r.max_length == 4096)
    assert sum(r.pieces - r.examples for r in rows if r.max_length == 192) > 0
    assert sum(r.too_long for r in rows if r.max_length == 64) > 0


def test_the_reference_check_catches_wrong_labels_and_lost_pieces(label_check, byte_tokenizer, monkeypatch):
    sample = {"sgd": fixture_sample()["sgd"]}
    chatml = [resolve_template("chatml", byte_tokenizer)]
    labelled = ExampleEncoder._labelled

    def without_end_of_turn(example, render, located):
        tokenized = labelled(example, render, located)
        tokenized.labels[tokenized.input_ids == byte_tokenizer.convert_tokens_to_ids("<|im_end|>")] = IGNORE_INDEX
        return tokenized

    monkeypatch.setattr(ExampleEncoder, "_labelled", staticmethod(without_end_of_turn))
    (row,) = label_check.check(byte_tokenizer, sample, chatml, max_lengths=(4096,))
    assert row.labels == row.pieces > 0
    monkeypatch.undo()
    fit = dialogtune.tokenize.fit
    monkeypatch.setattr(dialogtune.tokenize, "fit", lambda *args: list(fit(*args))[:-1])
    (row,) = label_check.check(byte_tokenizer, sample, chatml, max_lengths=(64,))
    assert row.fitting > 0 and row.labels == 0


# -- token-exact masks on the shapes real data has ---------------------------------------
SCENE = Dialogue("scene", [Turn("Alice", "Good morning!"), Turn(None, "Bob walks in."), Turn("Bob", "Coffee?"),
                           Turn("Alice", "Yes please."), Turn(None, "He pours two cups."), Turn("Bob", "Here you go.")])
CHAT = Dialogue("chat", [Turn("Alice", "Hi."), Turn("Alice", "Anyone there?"), Turn("Bob", "Hello."),
                         Turn("Bob", "How can I help?"), Turn("Alice", "A table for two."), Turn("Bob", "Done.")])
# shape: (examples as `respond` makes them, the trained messages of each example)
SHAPES = {
    # Narration (turns without a speaker) is untrained context, whatever the template makes of it.
    "narration": (lambda: respond(SCENE, {"Bob"}), [["Coffee?", "Here you go."]]),
    # Two turns in a row by one speaker: each is trained, each with its own end-of-turn marker.
    "consecutive turns": (lambda: respond(CHAT, {"Bob"}), [["Hello.", "How can I help?", "Done."]]),
    # One example per turn with one turn of context; Bob's earlier turn, as context, is untrained.
    "rounds": (lambda: respond(CHAT, {"Bob"}, rounds=1), [["Hello."], ["How can I help?"], ["Done."]]),
}
# What each shipped template trains of an assistant message besides its content: the space after
# a speaker tag ('Assistant: ', 'Bob: ') shares a token with the first word (' Hello'), so it is
# trained with it; then the end-of-turn marker, which Llama 2 writes after a space.
AROUND_CONTENT = {
    "chatml": ("", "<|im_end|>"),
    "chatml_tools": ("", "<|im_end|>"),
    "user_assistant": (" ", "</s>"),
    "transcript": (" ", "\n"),
    "dialogpt": ("", "</s>"),
    "llama2": (" ", " </s>"),
    "vicuna": (" ", "</s>"),
}


@pytest.fixture(scope="module")
def word_tokenizer():
    """Byte-level BPE with every word of SHAPES as one token, with or without the space before
    it ('ĠHello', 'Hello'), as large tokenizers have common words: trained tokens read plainly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [turn.text for dialogue in (SCENE, CHAT) for turn in dialogue.turns]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts + [" " + text for text in texts], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_trained_tokens_are_exactly_each_trained_message_and_its_end_of_turn(word_tokenizer, name, shape):
    template = resolve_template(name, word_tokenizer)
    encoder = ExampleEncoder(word_tokenizer, template, 4096)
    make, trained = SHAPES[shape]
    before, after = AROUND_CONTENT[name]
    examples = make()
    assert len(examples) == len(trained)
    for example, contents in zip(examples, trained):
        tokenized, _ = encoder.encode_one(example)
        assert tokenized.input_ids.tolist() == word_tokenizer.apply_chat_template(
            example.chat(), chat_template=template.source, tokenize=True, return_dict=False)
        got = word_tokenizer.convert_ids_to_tokens(tokenized.input_ids[tokenized.labels != IGNORE_INDEX].tolist())
        # e.g. transcript, narration: ['ĠCoffee', '?', 'Ċ', 'ĠHere', 'Ġyou', 'Ġgo', '.', 'Ċ']
        assert got == [token for content in contents for token in word_tokenizer.tokenize(before + content + after)]


# -- tool calls: the call and the reply trained, the tool's answer never ----------------------
@pytest.mark.parametrize("max_length", [4096, 800])
def test_a_call_and_its_reply_are_trained_token_for_token_and_the_tool_answer_never(word_tokenizer, max_length):
    """SGD with task.tool_calls under chatml_tools, whole and cut into pieces by `fit`: every
    piece's ids are apply_chat_template's, and its trained tokens are exactly an independent
    tokenization of each trained message's own text (the call as the template writes it) and
    '<|im_end|>', in order: nothing of a tool message, nothing of anyone else's turn."""
    (dialogue,) = [d for d in read_dialogues(FIXTURES / "sgd_calls", "sgd") if isinstance(d, Dialogue)]
    examples = respond(dialogue, {"SYSTEM"}, tool_calls=True)
    template = resolve_template("chatml_tools", word_tokenizer, tools=True)
    stats = TokenizeStats()
    pieces = list(ExampleEncoder(word_tokenizer, template, max_length).encode(examples, stats))
    assert stats.rejects == [] and (len(pieces) > 1) == (max_length == 800)

    def own_text(m: dict) -> str:
        calls = "".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                        + "\n</tool_call>" for c in m.get("tool_calls", []))
        return m["content"] + calls + "<|im_end|>"

    trained_messages = []
    for piece in pieces:
        assert len(piece.input_ids) <= max_length
        assert piece.input_ids.tolist() == word_tokenizer.apply_chat_template(
            piece.example.chat(), chat_template=template.source, tokenize=True, return_dict=False)
        got = word_tokenizer.convert_ids_to_tokens(piece.input_ids[piece.labels != IGNORE_INDEX].tolist())
        trained = [m for m in piece.example.messages if m["train"]]
        assert got == [token for m in trained for token in word_tokenizer.tokenize(own_text(m))]
        assert all(m["role"] == "assistant" for m in trained)
        trained_messages += trained
    # Each of the 6 trained messages (2 calls, 4 replies) in exactly one piece; both tool answers are context.
    assert [bool(m.get("tool_calls")) for m in trained_messages] == [True, False, False, True, False, False]


# -- transformers' assistant mask ----------------------------------------------------------
# ChatML with `{% generation %}` around what the model writes: the content and '<|im_end|>',
# or the content alone.
GENERATION = {
    "content and end of turn": r"""{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}
{%- else -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endif -%}
{%- endfor -%}""",
    "content": r"""{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>\n' }}
{%- else -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endif -%}
{%- endfor -%}""",
}


@pytest.mark.parametrize("marked", GENERATION)
def test_labels_are_the_assistant_tokens_mask_of_generation_markers(byte_tokenizer, marked):
    """Labels and the mask are both indexed by input position (neither is shifted: the model
    shifts). Where `{% generation %}` wraps an assistant message's content and its end-of-turn
    marker, the trained positions are exactly the mask's; where it wraps the content alone,
    they are the mask's plus, after each masked run, the one token of the end-of-turn marker
    (dialogtune trains the model to stop)."""
    source = GENERATION[marked]
    (example,) = respond(CHAT, {"Bob"}, system_prompt="You are Bob.")
    out = byte_tokenizer.apply_chat_template(example.chat(), chat_template=source, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    tokenized, _ = ExampleEncoder(byte_tokenizer, ChatTemplate("generation", source, "<|im_end|>"), 4096
                                  ).encode_one(example)
    assert tokenized.input_ids.tolist() == out["input_ids"]
    mask = np.array(out["assistant_masks"], dtype=bool)
    expected = mask.copy()
    if marked == "content":
        run_ends = np.flatnonzero(mask[:-1] & ~mask[1:])
        assert (tokenized.input_ids[run_ends + 1] == byte_tokenizer.convert_tokens_to_ids("<|im_end|>")).all()
        expected[run_ends + 1] = True
    assert mask.sum() > 0 and ((tokenized.labels != IGNORE_INDEX) == expected).all()
