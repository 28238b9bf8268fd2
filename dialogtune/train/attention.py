"""Attention over packed, padding-free batches: each example attends only within itself.

A training batch is one flat row: the examples of the batch laid end to end, `position_ids`
restarting at 0 for each (collate.py). transformers' SDPA path would turn that into one
block-diagonal mask over the whole row, and the CPU kernels compute every block of it,
masked or not: for four rows of 512 flattened into ~2,000 tokens that is about 4x the
attention work of the rows kept apart, and padding the rows instead wastes the matmuls.

`segment_attention` finds the examples from the positions and runs causal SDPA on each:
the attention work is the sum of each example's own triangle, and no token is padding.
Sliding windows (Mistral, Qwen2's sliding layers) are honoured. It is registered with
transformers' AttentionInterface under ATTENTION and switched on only for training. Before
it is used, `use_segment_attention` checks on the model itself that a packed row gives the
same logits as its examples run alone, so a model whose attention has anything more than a
(windowed) causal mask (sinks, soft-capping, ...) keeps its own attention.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

ATTENTION = "dialogtune_segments"


def segment_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive positions in one row: one span per example."""
    breaks = (torch.diff(position_ids) != 1).nonzero().flatten() + 1
    edges = [0, *breaks.tolist(), position_ids.shape[-1]]
    return list(itertools.pairwise(edges))


# Queries per block in a long example: SDPA's CPU kernels compute every block of a causal
# square, masked or not; cutting the queries into blocks that each see only the keys up to
# their end skips most of the masked half (about 30% less attention time at 512 tokens on a CPU).
QUERY_BLOCK = 128


def _causal(query, key, value, scaling, dropout, window: int | None = None) -> torch.Tensor:
    """Causal attention of one example, (1, heads, length, dim), in query blocks. With a sliding
    `window`, a query sees itself and the window - 1 keys before it (transformers' convention)."""
    length = query.shape[2]
    if window is not None and window >= length:
        window = None  # every query's window reaches back past the example's start
    pieces = []
    for start in range(0, length, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, length)
        if start == 0 and window is None:
            pieces.append(F.scaled_dot_product_attention(query[:, :, :end], key[:, :, :end], value[:, :, :end],
                                                         dropout_p=dropout, is_causal=True, scale=scaling))
            continue
        first = 0 if window is None else max(0, start - window + 1)  # the earliest key this block sees
        rows = torch.arange(start, end, device=query.device).unsqueeze(1)
        cols = torch.arange(first, end, device=query.device).unsqueeze(0)
        mask = cols <= rows  # a causal mask aligned bottom-right
        if window is not None:
            mask &= cols > rows - window
        pieces.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, first:end],
                                                     value[:, :, first:end], attn_mask=mask, dropout_p=dropout,
                                                     scale=scaling))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      position_ids=None, sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """query (batch, heads, length, dim); key and value (batch, kv_heads, length, dim).
    Returns (batch, length, heads, dim) as transformers' attention functions do."""
    if attention_mask is not None:
        raise ValueError("segment attention takes examples from position_ids, not from an attention mask")
    if query.shape[2] != key.shape[2]:
        raise ValueError("segment attention is for training: the keys must be the queries' own tokens (no cache)")
    if softcap is not None or s_aux is not None:  # the model's attention is more than a (windowed) causal softmax
        raise ValueError("segment attention has no logit soft-capping or attention sinks")
    if position_ids is None:
        position_ids = torch.arange(query.shape[2], device=query.device).expand(query.shape[0], -1)
    position_ids = position_ids.expand(query.shape[0], -1)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    rows = []
    for row in range(query.shape[0]):
        pieces = [_causal(query[row : row + 1, :, start:end], key[row : row + 1, :, start:end],
                          value[row : row + 1, :, start:end], scaling, dropout, sliding_window)
                  for start, end in segment_spans(position_ids[row])]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    output = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, segment_attention)


def _probe_logits(core) -> bool:
    """True when a row holding two examples gives each the logits it gets alone."""
    vocab = core.get_input_embeddings().weight.shape[0]
    device = core.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=generator).to(device) for n in (5, 7))
    packed_ids = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)
    was_training = core.training
    core.eval()
    try:
        with torch.no_grad():
            packed = core(input_ids=packed_ids, position_ids=positions, use_cache=False).logits.float()
            previous = core.config._attn_implementation
            core.set_attn_implementation("sdpa")
            try:
                alone = torch.cat([core(input_ids=ids, use_cache=False).logits.float() for ids in (first, second)], 1)
            finally:
                core.set_attn_implementation(previous)
    finally:
        core.train(was_training)
    tolerance = 1e-3 if packed.dtype == torch.float32 and core.dtype == torch.float32 else 5e-2
    scale = alone.abs().max().clamp(min=1.0)
    return bool(((packed - alone).abs().max() / scale) <= tolerance)


def use_segment_attention(core) -> bool:
    """Switch a causal LM to segment attention if it supports it and the probe agrees; the
    model is left as it was otherwise. Returns whether it was switched."""
    if core.config.is_encoder_decoder or not getattr(core, "_supports_attention_backend", False):
        return False
    register()
    previous = core.config._attn_implementation
    try:
        core.set_attn_implementation(ATTENTION)
    except (ValueError, KeyError, ImportError):
        return False
    if core.config._attn_implementation != ATTENTION:
        return False
    try:
        agrees = _probe_logits(core)
    except (ValueError, RuntimeError, TypeError):
        agrees = False
    if not agrees:
        core.set_attn_implementation(previous)
    return agrees


def restore_attention(core, implementation: str = "sdpa") -> None:
    """Back to the standard implementation (generation needs masks and a cache)."""
    if core.config._attn_implementation == ATTENTION:
        core.set_attn_implementation(implementation)
