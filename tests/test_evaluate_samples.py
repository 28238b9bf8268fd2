"""Evaluation samples from prepared rows, and cutting contexts to fit a model, on hand-made rows."""

from __future__ import annotations

import numpy as np
import pytest

from dialogtune.evaluate.samples import ContextFit, samples_of, trained_runs
from dialogtune.models import load_tokenizer
from dialogtune.tokenize import IGNORE_INDEX as X

HEAD = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSummarize the following dialogue:"


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_model_dir):
    """The byte-level test tokenizer with the ChatML template, as a model directory holds it."""
    return load_tokenizer(str(tiny_model_dir))


def test_trained_runs_are_the_runs_of_labelled_positions():
    assert trained_runs(np.array([X, 5, 6, X, X, 7, X, 8])) == [(1, 3), (5, 6), (7, 8)]
    assert trained_runs(np.array([X, X])) == []


def test_samples_are_the_trained_turns_with_their_references_and_sessions(byte_tokenizer):
    def row(texts_trained, sessions):
        ids, labels = [], []
        for text, trained in texts_trained:
            piece = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [X] * len(piece)
        return {"input_ids": ids, "labels": labels, "turn_sessions": sessions}

    rows = [row([("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False), ("Hello<|im_end|>", True),
                 ("\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False), (" Bye now<|im_end|>", True),
                 ("\n", False)], [1, 2]),
            # Two trained turns with nothing between read as one: which session it is cannot be told.
            row([("Tom: ", False), ("Yes<|im_end|>", True), ("No<|im_end|>", True)], [1, 1])]
    samples = samples_of(rows, byte_tokenizer, "<|im_end|>")
    assert [(s.index, s.reference, s.session) for s in samples] == [(0, "Hello", 1), (1, "Bye now", 2), (2, "Yes", -1)]
    assert byte_tokenizer.decode(samples[1].context_ids).endswith("Bye<|im_end|>\n<|im_start|>assistant\n")
    assert samples[0].example_ids is samples[1].example_ids  # one copy per example
    assert [s.key for s in samples_of(rows, byte_tokenizer, "<|im_end|>", limit=2)] == [(0, "Hello"), (1, "Bye now")]


def test_samples_take_their_reference_from_the_source_text(metaspace_tokenizer):
    """This tokenizer knows no 'O' or 'v': the turn decodes as '<unk>li<unk>er ...', but the
    reference (and the key two models are compared by) is the text the data had."""
    tok = metaspace_tokenizer
    source = "Oliver votes for the liberals."
    context = tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    turn = tok(f"{source}<|im_end|>", add_special_tokens=False)["input_ids"]
    row = {"input_ids": context + turn, "labels": [X] * len(context) + turn, "turn_sessions": [-1]}
    assert tok.decode(turn, skip_special_tokens=False) == "<unk>li<unk>er <unk>otes for the liberals.<|im_end|>"
    (sample,) = samples_of([{**row, "trained_messages": [source], "system_messages": ["Be brief."]}], tok, "<|im_end|>")
    assert (sample.reference, sample.key, sample.system) == (source, (0, source), "Be brief.")
    # Data prepared before the column existed: the turn decoded, as before.
    (old,) = samples_of([row], tok, "<|im_end|>")
    assert (old.reference, old.system) == ("<unk>li<unk>er <unk>otes for the liberals.", None)
    # Two trained turns that touch read as one run: which text is whose cannot be told.
    (merged,) = samples_of([{**row, "trained_messages": [source, "Yes."]}], tok, "<|im_end|>")
    assert merged.reference == "<unk>li<unk>er <unk>otes for the liberals."


def test_a_long_context_keeps_its_head_and_its_end(chatml_tokenizer):
    lines = "\n".join(f"Tim: line {i}." for i in range(40))
    ids = chatml_tokenizer(f"{HEAD}\n{lines}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    fit = ContextFit(chatml_tokenizer, "Be brief.", "Summarize the following dialogue:")
    head = fit.head_length(ids, "Be brief.")
    assert chatml_tokenizer.decode(ids[:head]) == f"{HEAD}\n"  # the template's text up to the dialogue
    cut, dropped = fit(ids, 100, "Be brief.")
    assert len(cut) == 100 and cut[:head] == ids[:head] and cut[head:] == ids[-(100 - head):] and not dropped
    text = chatml_tokenizer.decode(cut)
    assert text.startswith(HEAD) and text.endswith("Tim: line 39.<|im_end|>\n<|im_start|>assistant\n")
    assert "line 0." not in text
    assert fit(ids, len(ids), "Be brief.") == (ids, False)


def test_the_whole_system_message_stays_persona_lines_and_all(chatml_tokenizer):
    """No system prompt is configured: the system message is the data's (persona lines, `rows`
    contexts). It stays whole, with the header of the message after it."""
    system = "Your persona: I like trains.\nYour persona: I have a dog."
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Line {i} of the chat."} for i in range(30)]
    text = chatml_tokenizer.apply_chat_template([{"role": "system", "content": system}, *turns], tokenize=False,
                                                add_generation_prompt=True)
    ids = chatml_tokenizer(text, add_special_tokens=False)["input_ids"]
    fit = ContextFit(chatml_tokenizer)
    head = fit.head_length(ids, system)
    assert chatml_tokenizer.decode(ids[:head]) == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    cut, dropped = fit(ids, 150, system)
    assert not dropped and cut[:head] == ids[:head] and cut[head:] == ids[-(150 - head):]
    # A first message by the assistant: its header instead.
    text = chatml_tokenizer.apply_chat_template([{"role": "system", "content": system}, *turns[1:]], tokenize=False)
    ids = chatml_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chatml_tokenizer.decode(ids[: fit.head_length(ids, system)]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # Data that does not record its system message: the configured system prompt, found in the text.
    assert chatml_tokenizer.decode(ids[: ContextFit(chatml_tokenizer, "Your persona").head_length(ids)]).endswith(
        "system\nYour persona")
    assert ContextFit(chatml_tokenizer).head_length(ids) == 0


def test_a_head_longer_than_half_the_room_or_leaving_no_room_for_the_tail_is_not_kept(chatml_tokenizer):
    lines = "\n".join(f"Tim: hello there, how are you doing today, {i}?" for i in range(10))
    ids = chatml_tokenizer(f"{HEAD}\n{lines}", add_special_tokens=False)["input_ids"]
    fit = ContextFit(chatml_tokenizer, None, "Summarize the following dialogue:")
    head = fit.head_length(ids, "Be brief.")
    assert 10 < head and len(ids) > 2 * head
    assert fit(ids, 10, "Be brief.") == (ids[-10:], True)
    assert fit(ids, 2 * head, "Be brief.") == (ids[:head] + ids[-head:], False)
    assert fit(ids, 2 * head, "Be brief.", tail=head + 1) == (ids[-2 * head:], True)
    assert ContextFit(chatml_tokenizer, "not in the text").head_length(ids) == 0
