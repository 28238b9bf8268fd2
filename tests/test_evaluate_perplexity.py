"""Per-sample losses against plain transformers forward passes, for an encoder-decoder model
(decoder-only models are checked end to end in test_evaluate_run.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dialogtune.evaluate.perplexity import sample_losses
from dialogtune.evaluate.samples import ContextFit, samples_of
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
    fit = ContextFit(byte_tokenizer, ())
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
