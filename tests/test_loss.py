"""The trained-positions-only loss equals the standard full-logits loss, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from dialogtune.collate import CausalCollator
from dialogtune.loss import core_model, forward_loss, full_logits_loss, synchronised_in_forward, trained_loss


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


# The fused loss against the standard computation; the loss through the model's forward (used
# under DDP/FSDP/DeepSpeed) against the fused one.
@pytest.mark.parametrize(("computed", "reference"), [(trained_loss, full_logits_loss), (forward_loss, trained_loss)],
                         ids=["fused", "through-forward"])
def test_losses_and_gradients_equal_the_reference(computed, reference):
    model = tiny_llama()
    batch = packed_batch()
    loss, count = computed(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected, expected_count = reference(model, batch)
    expected.backward()
    assert int(count) == int(expected_count) == 5
    assert abs(loss.item() - expected.item()) < 1e-5
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-6), name


def test_lora_model_uses_the_same_path():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = packed_batch()
    loss, _ = trained_loss(model, batch)
    reference, _ = full_logits_loss(model, batch)
    assert abs(loss.item() - reference.item()) < 1e-5


class Wrapper(torch.nn.Module):
    """Holds the model as `.module` and runs it in its forward, as DDP and DeepSpeed do."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_a_wrapped_model_is_run_through_its_wrappers_forward():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    wrapped = Wrapper(model)
    assert synchronised_in_forward(wrapped) and not synchronised_in_forward(model)
    assert core_model(wrapped) is model.get_base_model()
    loss, count = trained_loss(wrapped, packed_batch())
    assert wrapped.calls == 1  # the engine's forward ran: that is where it synchronises
    reference, _ = trained_loss(model, packed_batch())
    assert abs(loss.item() - reference.item()) < 1e-5 and int(count) == 5


def test_collator_pads_as_a_separate_sequence_without_mask():
    batch = packed_batch()
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert batch["labels"][1, 4:].tolist() == [-100] * 4
    assert batch["input_ids"][1, 4:].tolist() == [0] * 4


def test_fused_chunked_head_equals_cross_entropy_in_value_and_gradients(monkeypatch):
    from dialogtune import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 97 * 3)  # 3 positions a chunk: 4 chunks for 11
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (11,))
    fused = loss_module.LinearCrossEntropy.apply(hidden, weight, targets)
    (fused * 0.5).backward()  # a scale from outside (1 / trained tokens) reaches both gradients
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (reference * 0.5).backward()
    assert abs(fused.item() - reference.item()) < 1e-4
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_fused_head_computes_only_the_gradients_asked_for():
    from dialogtune.loss import LinearCrossEntropy

    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(13, 8)  # frozen, as under LoRA
    LinearCrossEntropy.apply(hidden, weight, torch.randint(0, 13, (5,))).backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        value = LinearCrossEntropy.apply(hidden, weight, torch.tensor([1, 2, 3, 4, 5]))
    assert value.item() == pytest.approx(torch.nn.functional.cross_entropy(hidden @ weight.T, torch.tensor([1, 2, 3, 4, 5]),
                                                                            reduction="sum").item(), rel=1e-6)
