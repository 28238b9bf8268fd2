"""The loss of each evaluation sample's reference turn, given its context, as the model reads it.

Each sample is scored in a window of its own: for a causal LM its example up to the end of the
turn, for an encoder-decoder its context as the encoder input and the turn as the decoder
labels. A window longer than the model's context is cut from the left like a prompt
(samples.ContextFit). For a causal LM the turn's loss is the same as in the whole example (no
token sees what comes after it), so scoring one window per sample changes no number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dialogtune.collate import CausalCollator, Seq2SeqCollator
from dialogtune.evaluate.samples import ContextFit, Sample
from dialogtune.infer import ChatModel
from dialogtune.loss import seq2seq_token_losses, token_losses
from dialogtune.tokenize import IGNORE_INDEX


@dataclass
class SampleLoss:
    loss: float  # summed over the scored tokens
    tokens: int
    cut: int  # context tokens cut to fit the window into the model


def window(sample: Sample, fit: ContextFit, limit: int, encoder_decoder: bool) -> tuple[dict, int]:
    """The sample as one prepared-style row (only its turn trained), and how many tokens were cut."""
    turn = sample.example_ids[sample.start : sample.end]
    if encoder_decoder:  # the limit is the encoder's; the decoder reads the turn alone
        context = fit(sample.context_ids, limit)
        ids, trained = context + turn, len(turn)
        cut = sample.start - len(context)
    else:
        ids = fit(sample.example_ids[: sample.end], limit)
        trained = min(len(turn), len(ids) - 1)  # the first token is never predicted
        cut = sample.end - len(ids)
    labels = [IGNORE_INDEX] * (len(ids) - trained) + ids[len(ids) - trained :]
    return {"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}, cut


def sample_losses(chat: ChatModel, samples: list[Sample], fit: ContextFit, batch_size: int = 8) -> list[SampleLoss]:
    encoder_decoder = chat.is_encoder_decoder
    pad = chat.tokenizer.pad_token_id or chat.tokenizer.eos_token_id or 0
    collate = Seq2SeqCollator(pad) if encoder_decoder else CausalCollator(pad)
    per_token = seq2seq_token_losses if encoder_decoder else token_losses
    out: list[SampleLoss] = []
    with torch.no_grad():
        for begin in range(0, len(samples), batch_size):
            rows, cuts = zip(*(window(s, fit, chat.context_length, encoder_decoder)
                               for s in samples[begin : begin + batch_size]), strict=True)
            batch = {k: v.to(chat.model.device) for k, v in collate(list(rows)).items()}
            losses, keep = per_token(chat.model, batch)
            counts = keep.sum(dim=1).tolist()
            out += [SampleLoss(float(row_losses.sum()), n, cut)
                    for row_losses, n, cut in zip(losses.split(counts), counts, cuts, strict=True)]
    return out
