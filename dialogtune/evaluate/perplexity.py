"""The loss of each evaluation sample's reference turn, given its context, as the model reads it.

Each sample is scored in a window of its own: for a causal LM its example up to the end of the
turn, for an encoder-decoder its context as the encoder input and the turn as the decoder
labels. A window longer than the model's context is cut from the left like a prompt
(samples.ContextFit). For a causal LM the turn's loss is the same as in the whole example (no
token sees what comes after it), so scoring one window per sample changes no number.

Only reply tokens are ever scored. A causal window keeps its head only if the whole reply fits
after it; otherwise it is the last tokens up to the end of the reply (a reply longer than the
model is scored on its end, less the window's first token, which nothing predicts). An
encoder-decoder's decoder has positions of its own: a reply longer than them is scored on its
first ones (the decoder must read a reply from its start).
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
    cut: int  # tokens cut to fit the window into the model (context, and reply tokens past the model's room)
    head_dropped: bool = False  # the context's head (system message, instruction) was cut too, for room


@dataclass
class Window:
    row: dict  # a prepared-style row: only reply tokens trained
    cut: int
    head_dropped: bool


def window(sample: Sample, fit: ContextFit, limit: int, encoder_decoder: bool) -> Window:
    """The sample as one prepared-style row (only reply tokens trained), and what was cut."""
    turn = sample.example_ids[sample.start : sample.end]
    if encoder_decoder:  # the limit is the encoder's, and the decoder's for the turn alone
        context, dropped = fit(sample.context_ids, limit, sample.system)
        target = turn[:limit]
        ids, trained = context + target, len(target)
        cut = sample.start - len(context) + len(turn) - len(target)
    else:  # the head stays only if the whole turn fits after it: the last `trained` ids are the turn's
        ids, dropped = fit(sample.example_ids[: sample.end], limit, sample.system, tail=len(turn))
        trained = min(len(turn), len(ids) - 1)  # the first token is never predicted
        cut = sample.end - len(ids)
    labels = [IGNORE_INDEX] * (len(ids) - trained) + ids[len(ids) - trained :]
    return Window({"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}, cut, dropped)


def sample_losses(chat: ChatModel, samples: list[Sample], fit: ContextFit, batch_size: int = 8) -> list[SampleLoss]:
    encoder_decoder = chat.is_encoder_decoder
    pad = chat.tokenizer.pad_token_id or chat.tokenizer.eos_token_id or 0
    collate = Seq2SeqCollator(pad) if encoder_decoder else CausalCollator(pad)
    per_token = seq2seq_token_losses if encoder_decoder else token_losses
    out: list[SampleLoss] = []
    with torch.no_grad():
        for begin in range(0, len(samples), batch_size):
            windows = [window(s, fit, chat.context_length, encoder_decoder) for s in samples[begin : begin + batch_size]]
            batch = {k: v.to(chat.model.device) for k, v in collate([w.row for w in windows]).items()}
            losses, keep = per_token(chat.model, batch)
            counts = keep.sum(dim=1).tolist()
            out += [SampleLoss(float(row_losses.sum()), n, w.cut, w.head_dropped)
                    for row_losses, n, w in zip(losses.split(counts), counts, windows, strict=True)]
    return out
