"""The loss over trained positions only.

Dialogue data is mostly context the model does not learn to produce. For a causal LM the
backbone runs on every position, but the LM head and cross-entropy run only where the
(shifted) label is not -100: on SmolLM2 the 49k-vocabulary head is about a fifth of the
forward FLOPs, and most positions are untrained. Returns the summed loss and the number of
trained tokens, so gradient accumulation can normalise by the tokens of the whole step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Models that transform logits after the head (soft-capping, scaling): computed the standard way.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def core_model(model):
    """The transformers model under a PEFT wrapper (LoRA layers are inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def needs_full_logits(core) -> bool:
    return core.config.is_encoder_decoder or any(getattr(core.config, a, None) for a in _LOGIT_TRANSFORMS)


def trained_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of trained tokens) for a batch from the collators."""
    core = core_model(model)
    if needs_full_logits(core):
        return full_logits_loss(model, batch)
    losses, keep = token_losses(model, batch)
    return losses.sum(), keep.sum()


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trained token's loss (in row order) and where they are: a mask over the shifted
    labels, shape (batch, length - 1). Causal LMs only."""
    core = core_model(model)
    backbone = getattr(core, core.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                      attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = core.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="none"), keep


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
