"""The memory for decoder-only models, on a tiny random Llama: what is read and written, reset,
padding, gradients through time, and files."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from dialogtune.memory.causal import CausalMemoryModel

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
LABELS = torch.tensor([[-100, -100, 7, 8, 9, 10], [-100, 12, 13, -100, -100, -100]])


@pytest.fixture
def model(byte_tokenizer):
    torch.manual_seed(0)
    return CausalMemoryModel(tiny_llama(byte_tokenizer), slots=4)


def test_the_memory_changes_after_a_turn_and_changes_the_next_turns_logits(model):
    first = model.step(IDS, MASK, LABELS, None)
    assert not torch.allclose(first.memory, model.initial_memory(2), atol=1e-3)
    carried = model.step(IDS, MASK, LABELS, first.memory, return_logits=True)
    fresh = model.step(IDS, MASK, LABELS, None, return_logits=True)
    assert (carried.logits - fresh.logits).abs().max() > 1e-3
    assert carried.loss_sum != fresh.loss_sum


def test_reset_restores_the_initial_memory_for_flagged_rows_only(model):
    written = model.step(IDS, MASK, LABELS, None).memory
    reset = torch.tensor([True, False])
    mixed = model.step(IDS, MASK, LABELS, written, reset, return_logits=True)
    fresh = model.step(IDS, MASK, LABELS, None, return_logits=True)
    carried = model.step(IDS, MASK, LABELS, written, return_logits=True)
    torch.testing.assert_close(mixed.logits[0], fresh.logits[0])
    torch.testing.assert_close(mixed.memory[0], fresh.memory[0])
    torch.testing.assert_close(mixed.logits[1], carried.logits[1])
    torch.testing.assert_close(mixed.memory[1], carried.memory[1])


def test_padded_and_unpadded_rows_give_the_same_outputs(model):
    memory = model.step(IDS, MASK, LABELS, None).memory
    batch = model.step(IDS, MASK, LABELS, memory, return_logits=True, per_row=True)
    for row, length in ((0, 6), (1, 3)):
        alone = model.step(IDS[row:row + 1, :length], MASK[row:row + 1, :length], LABELS[row:row + 1, :length],
                           memory[row:row + 1], return_logits=True, per_row=True)
        torch.testing.assert_close(batch.logits[row, :length], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.memory[row], alone.memory[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.loss_sum[row], alone.loss_sum[0], atol=1e-5, rtol=1e-5)
    assert batch.count.tolist() == [4, 2]


def test_per_row_sums_add_up_to_the_fused_total(model):
    total = model.step(IDS, MASK, LABELS, None)
    rows = model.step(IDS, MASK, LABELS, None, per_row=True)
    torch.testing.assert_close(rows.loss_sum.sum(), total.loss_sum, atol=1e-4, rtol=1e-5)
    assert int(total.count) == int(rows.count.sum()) == 6


def test_the_first_label_is_predicted_from_the_memory(model):
    """A turn's first token is learned too: the last read slot predicts it."""
    labels = torch.full_like(IDS, -100)
    labels[0, 0] = IDS[0, 0]
    out = model.step(IDS, MASK, labels, None, return_logits=True)
    assert int(out.count) == 1 and float(out.loss_sum.detach()) > 0


def test_gradients_flow_through_carried_memory_and_stop_where_it_is_detached(model):
    first = model.step(IDS, MASK, LABELS, None)
    first.memory.retain_grad()
    second = model.step(IDS, MASK, LABELS, first.memory)
    third = model.step(IDS, MASK, LABELS, second.memory)
    third.loss_sum.backward()
    assert first.memory.grad is not None and first.memory.grad.abs().sum() > 0
    model.zero_grad()
    edge = model.step(IDS, MASK, LABELS, None)
    after = model.step(IDS, MASK, LABELS, edge.memory.detach())
    edge.memory.retain_grad()
    after.loss_sum.backward()
    assert edge.memory.grad is None
    assert model.memory_init.grad is None  # only reachable through the detached memory


def test_the_initial_memory_and_write_start_from_the_models_own_embeddings(model):
    embeddings = model.base.get_input_embeddings().weight
    assert all(any(torch.equal(row, e) for e in embeddings) for row in model.memory_init)
    scale = embeddings.float().pow(2).mean().sqrt()
    torch.testing.assert_close(model.write_proj.weight, torch.eye(32) * scale)
    hidden = torch.randn(1, 4, 32)
    gate = torch.sigmoid(model.write_gate(torch.cat([model.write_proj(hidden), hidden], -1)))
    assert 0.4 < float(gate.mean().detach()) < 0.6  # half open: the old memory and the turn count alike at first


def test_without_slots_it_is_the_plain_model(byte_tokenizer):
    torch.manual_seed(0)
    base = tiny_llama(byte_tokenizer)
    plain = CausalMemoryModel(base, slots=0)
    out = plain.step(IDS, MASK, LABELS, None, return_logits=True)
    reference = base(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(out.logits[0], reference[0], atol=1e-5, rtol=1e-5)
    targets = LABELS[:, 1:]
    keep = (targets != -100) & (MASK[:, 1:] == 1)
    expected = torch.nn.functional.cross_entropy(reference[:, :-1][keep], targets[keep], reduction="sum")
    torch.testing.assert_close(out.loss_sum, expected, atol=1e-4, rtol=1e-5)
    assert out.memory.shape == (2, 0, 32)


def test_generate_reply_writes_the_memory_of_the_prompt_with_its_reply(model):
    prompt = IDS[:1, :4]
    reply, memory = model.generate_reply(prompt, None, max_new_tokens=3, do_sample=False)
    assert reply.shape == (1, 3)
    whole = torch.cat([prompt, reply], 1)
    step = model.step(whole, torch.ones_like(whole), None, None, return_logits=True)
    torch.testing.assert_close(memory, step.memory)
    # Greedy: each generated token is the argmax after the tokens before it.
    assert step.logits[0, 3:5].argmax(-1).tolist() == reply[0, :2].tolist()


def test_save_and_load_round_trip_with_lora(tmp_path, byte_tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    from dialogtune.models import quiet_peft

    torch.manual_seed(0)
    with quiet_peft():
        base = get_peft_model(tiny_llama(byte_tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    model = CausalMemoryModel(base, slots=3)
    with torch.no_grad():
        model.write_position.normal_()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "memory.json", "memory.safetensors"]
    with quiet_peft():
        loaded = CausalMemoryModel(PeftModel.from_pretrained(tiny_llama(byte_tokenizer), tmp_path), slots=3)
    loaded.load_memory_parameters(tmp_path)
    a = model.step(IDS, MASK, LABELS, None, return_logits=True)
    b = loaded.step(IDS, MASK, LABELS, None, return_logits=True)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.memory, b.memory)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"memory_init", "write_position", "write_proj.weight", "write_gate.weight"} <= trainable
    assert not any("embed_tokens" in n for n in trainable)  # the base is frozen under LoRA
