"""Per-sample losses against plain transformers forward passes, for an encoder-decoder model and
for replies longer than the model (decoder-only models are checked end to end in test_evaluate_run.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dialogtune.evaluate.perplexity import sample_losses
from dialogtune.evaluate.samples import ContextFit, samples_of
from dialogtune.models import load_tokenizer
from dialogtune.tokenize import IGNORE_INDEX as X


@pytest.fixture(scope="module")
def tiny_bart(byte_tokenizer):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(byte_tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=byte_tokenizer.pad_token_id,
                        bos_token_id=byte_tokenizer.bos_token_id, eos_token_id=byte_tokenizer.eos_token_id,
                        decoder_start_token_id=byte_tokenizer.eos_token_id)
    return BartForConditionalGeneration(config).eval()


def test_encoder_decoder_losses_are_the_decoder_targets_given_the_context(tiny_bart, byte_tokenizer):
    def row(context: str, reply: str) -> dict:
        source = byte_tokenizer(context, add_special_tokens=False)["input_ids"]
        target = byte_tokenizer(reply, add_special_tokens=False)["input_ids"]
        return {"input_ids": source + target, "labels": [X] * len(source) + target}

    long_context = "Hello there! How are you doing today? " * 10  # over the model's 64 positions
    rows = [row("Alice: Where is it?\nBob: ", "In San Jose.</s>"), row(long_context, "Fine, thanks.</s>")]
    chat = SimpleNamespace(model=tiny_bart, tokenizer=byte_tokenizer, context_length=64, is_encoder_decoder=True)
    samples = samples_of(rows, byte_tokenizer, "</s>")
    fit = ContextFit(byte_tokenizer)
    losses = sample_losses(chat, samples, fit)
    for sample, loss in zip(samples, losses, strict=True):
        source = sample.context_ids[-64:]  # nothing to keep at the head: the end of the context
        target = sample.example_ids[sample.start : sample.end]
        with torch.no_grad():
            mean = tiny_bart(input_ids=torch.tensor([source]), labels=torch.tensor([target])).loss.item()
        assert loss.tokens == len(target)
        assert loss.loss == pytest.approx(mean * len(target), rel=1e-5)
        assert loss.cut == len(sample.context_ids) - len(source)
    assert losses[0].cut == 0 and losses[1].cut > 0


@pytest.fixture(scope="module")
def tiny_llama_64(byte_tokenizer):
    """A causal LM that reads 64 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(byte_tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64,
                         pad_token_id=byte_tokenizer.pad_token_id, eos_token_id=byte_tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def chatml_row(tokenizer, system: str, user: str, reply: str) -> dict:
    text = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)
    context = tokenizer(text, add_special_tokens=False)["input_ids"]
    target = tokenizer(f"{reply}<|im_end|>", add_special_tokens=False)["input_ids"]
    return {"input_ids": context + target, "labels": [X] * len(context) + target, "system_messages": [system]}


def test_a_reply_that_does_not_fit_after_the_head_is_scored_without_the_head(tiny_llama_64, tiny_model_dir):
    """The head (system message and the user's header, about 20 tokens) stays only when the whole
    reply fits after it in the 64 positions. Otherwise the window is the last 64 tokens up to the
    end of the reply, and only reply tokens in it are scored: all of them when the reply is
    shorter than the window, all but the window's first (which nothing predicts) when longer."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [chatml_row(tokenizer, "Be brief.", "Tell me. " * 20, "Fine."),  # head kept
            chatml_row(tokenizer, "Be brief.", "Tell me. " * 20, "Fine, thanks for asking. " * 5),  # 51 reply tokens
            chatml_row(tokenizer, "Be brief.", "Hi.", "Fine, thanks for asking. " * 8)]  # reply longer than 64
    chat = SimpleNamespace(model=tiny_llama_64, tokenizer=tokenizer, context_length=64, is_encoder_decoder=False)
    samples = samples_of(rows, tokenizer, "<|im_end|>")
    fit = ContextFit(tokenizer)
    head = fit.head_length(samples[0].example_ids, "Be brief.")
    assert tokenizer.decode(samples[0].example_ids[:head]) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    turns = [s.end - s.start for s in samples]
    assert head + turns[0] <= 64 < head + turns[1] and turns[1] < 64 < turns[2]
    losses = sample_losses(chat, samples, fit)

    def expected(ids: list[int], trained_from: int) -> tuple[float, int]:
        with torch.no_grad():
            logits = tiny_llama_64(input_ids=torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor(ids[1:])[trained_from - 1 :]
        return F.cross_entropy(logits[trained_from - 1 :], targets, reduction="sum").item(), len(targets)

    first = samples[0].example_ids
    kept = first[:head] + first[samples[0].end - (64 - head) : samples[0].end]
    windows = [(kept, 64 - turns[0]),
               (samples[1].example_ids[samples[1].end - 64 : samples[1].end], 64 - turns[1]),
               (samples[2].example_ids[samples[2].end - 64 : samples[2].end], 1)]
    for sample, loss, (ids, trained_from) in zip(samples, losses, windows, strict=True):
        total, count = expected(ids, trained_from)
        assert (loss.tokens, loss.cut) == (count, sample.end - 64)
        assert loss.loss == pytest.approx(total, rel=1e-5)
    assert [loss.tokens for loss in losses] == [turns[0], turns[1], 63]
    assert [loss.head_dropped for loss in losses] == [False, True, True]


def test_an_encoder_decoder_reply_longer_than_the_decoder_is_scored_on_its_first_positions(tiny_bart, byte_tokenizer):
    context = byte_tokenizer("Alice: How are you?\nBob: ", add_special_tokens=False)["input_ids"]
    target = byte_tokenizer("Fine, thanks for asking. " * 8 + "</s>", add_special_tokens=False)["input_ids"]
    assert len(target) > 64  # the decoder's positions
    chat = SimpleNamespace(model=tiny_bart, tokenizer=byte_tokenizer, context_length=64, is_encoder_decoder=True)
    samples = samples_of([{"input_ids": context + target, "labels": [X] * len(context) + target}], byte_tokenizer, "</s>")
    (loss,) = sample_losses(chat, samples, ContextFit(byte_tokenizer))
    with torch.no_grad():
        mean = tiny_bart(input_ids=torch.tensor([context]), labels=torch.tensor([target[:64]])).loss.item()
    assert (loss.tokens, loss.cut, loss.head_dropped) == (64, len(target) - 64, False)
    assert loss.loss == pytest.approx(mean * 64, rel=1e-5)
