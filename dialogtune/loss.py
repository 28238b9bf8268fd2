"""The loss over trained positions only.

Dialogue data is mostly context the model does not learn to produce. For a causal LM the
backbone runs on every position, but the LM head and cross-entropy run only where the
(shifted) label is not -100: on SmolLM2 the 49k-vocabulary head is about a fifth of the
forward FLOPs, and most positions are untrained. Returns the summed loss and the number of
trained tokens, so gradient accumulation can normalise by the tokens of the whole step.

The head and the cross-entropy are fused and chunked (`LinearCrossEntropy`): each chunk's
logits are turned into the loss and straight into their gradients, so the (trained positions x
vocabulary) logits are never held and the backward is one multiplication.

Under an engine that synchronises in the model's forward (DDP, FSDP, DeepSpeed), the loss goes
through that forward instead (`forward_loss`): the head still runs at trained positions only,
but their logits are formed.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from dialogtune.tokenize import IGNORE_INDEX

# Models that transform logits after the head (soft-capping, scaling): computed the standard way.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def core_model(model):
    """The transformers model under an engine's wrapper (DDP, DeepSpeed: `.module`) and a PEFT
    wrapper (LoRA layers are inside it)."""
    model = unwrapped(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unwrapped(model):
    """The model an engine wraps (DDP and DeepSpeed hold it as `.module`), or the model itself."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def synchronised_in_forward(model) -> bool:
    """Whether an engine does its work in the model's forward: DDP and DeepSpeed wrap the model;
    FSDP2 makes its modules FSDPModules (gathering the shards before they run)."""
    if unwrapped(model) is not model:
        return True
    if not torch.distributed.is_available():  # a torch built without it has no FSDP either
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def transforms_logits(config) -> bool:
    """Whether a model changes its logits after the output layer (soft-capping, scaling)."""
    return any(getattr(config, a, None) for a in _LOGIT_TRANSFORMS)


def needs_full_logits(core) -> bool:
    return core.config.is_encoder_decoder or transforms_logits(core.config)


# Positions x vocabulary per chunk: 64M fp32 logits (256 MB) at a time, whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 26


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)), with the gradients of hidden and weight
    formed chunk by chunk in the forward (softmax minus one-hot, times weight or hidden)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            part, wanted = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (part @ weight.T).float()
            norm = torch.logsumexp(logits, dim=-1)
            total += (norm - logits.gather(1, wanted[:, None]).squeeze(1)).sum()
            if want_hidden or want_weight:
                probs = logits.sub_(norm[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(wanted), device=probs.device), wanted] -= 1.0
                probs = probs.to(weight.dtype)
                if want_hidden:
                    grad_hidden[start : start + chunk] = probs @ weight
                if want_weight:
                    grad_weight += (probs.T @ part).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None, None)


def _fusable_head(core):
    """The output layer's weight when it is a plain linear map (no bias, no adapter, no quantisation)."""
    head = core.get_output_embeddings()
    return head.weight if type(head) is torch.nn.Linear and head.bias is None else None


def trained_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of trained tokens) for a batch from the collators."""
    core = core_model(model)
    if needs_full_logits(core):
        return full_logits_loss(model, batch)
    if synchronised_in_forward(model):
        keeps_logits = "logits_to_keep" in inspect.signature(core.forward).parameters
        return forward_loss(model, batch) if keeps_logits else full_logits_loss(model, batch)
    hidden, targets, keep = _trained_hidden(core, batch)
    weight = _fusable_head(core)
    if weight is None:
        logits = core.get_output_embeddings()(hidden).float()
        return F.cross_entropy(logits, targets, reduction="sum"), keep.sum()
    return LinearCrossEntropy.apply(hidden, weight, targets), keep.sum()


def forward_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`trained_loss` through the model's own forward (causal LMs taking `logits_to_keep`): the
    head runs at the positions that predict a trained label."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    predicting = F.pad(keep, (0, 1))  # position t predicts label t+1; the last one predicts nothing
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=predicting).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()


def _trained_hidden(core, batch: dict[str, torch.Tensor]):
    """The last hidden states that predict a trained label, those labels, and the mask."""
    backbone = getattr(core, core.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                      attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep], keep


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trained token's loss (in row order) and where they are: a mask over the shifted
    labels, shape (batch, length - 1). Causal LMs only."""
    hidden, targets, keep = _trained_hidden(core_model(model), batch)
    logits = core_model(model).get_output_embeddings()(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none"), keep


def seq2seq_token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_losses` for encoder-decoder models (a batch from Seq2SeqCollator): each trained
    decoder token's loss and where they are, a mask over the labels, shape (batch, target length)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                   use_cache=False).logits
    keep = batch["labels"] != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), batch["labels"][keep], reduction="none"), keep


def full_logits_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard computation (logits at every position), the reference for `trained_loss`."""
    core = core_model(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if core.config.is_encoder_decoder:
        logits = model(**inputs, labels=batch["labels"], use_cache=False).logits.float()
        targets = batch["labels"]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, keep.sum()
