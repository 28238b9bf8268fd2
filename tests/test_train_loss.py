"""The trained-positions-only loss equals the standard full-logits loss, in value and gradient."""

from __future__ import annotations

import torch

from dialogtune.train.collate import CausalCollator
from dialogtune.train.loss import full_logits_loss, trained_loss


def tiny_llama(vocab=97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256))


def packed_batch():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12], "labels": [-100, -100, -100, 8, 9, -100, -100, 12],
         "position_ids": [0, 1, 2, 3, 4, 0, 1, 2]},
        {"input_ids": [20, 21, 22, 23], "labels": [-100, 21, 22, -100], "position_ids": [0, 1, 2, 3]},
    ]
    return CausalCollator(pad_token_id=0)(rows)


def test_trained_loss_and_gradients_equal_full_logits():
    model = tiny_llama()
    batch = packed_batch()
    loss, count = trained_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference, reference_count = full_logits_loss(model, batch)
    reference.backward()
    assert int(count) == int(reference_count) == 5
    assert abs(loss.item() - reference.item()) < 1e-5
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-6), name


def test_lora_model_uses_the_same_path():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = packed_batch()
    loss, _ = trained_loss(model, batch)
    reference, _ = full_logits_loss(model, batch)
    assert abs(loss.item() - reference.item()) < 1e-5


def test_collator_pads_as_a_separate_sequence_without_mask():
    batch = packed_batch()
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert batch["labels"][1, 4:].tolist() == [-100] * 4
    assert batch["input_ids"][1, 4:].tolist() == [0] * 4
