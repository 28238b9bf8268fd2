"""MemBart (dialogtune.memory.bart): a BART whose encoder carries a learned memory across turns.

Tiny random models only (d_model 32, 2 + 2 layers, 4 heads, 100 tokens, 4 memory slots)."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from dialogtune.memory.bart import MemBartConfig, MemBartForConditionalGeneration, joint_attention_bias

SLOTS = 4
VOCAB = 100
PAD, START, EOS = 1, 0, 2


def tiny_bart(**overrides) -> BartForConditionalGeneration:
    # An untied head and a start token other than EOS, so greedy decoding is not EOS at once; weights
    # larger than BART's init (std 0.02) so that attention is not near uniform and every effect is clear.
    settings = {"init_std": 0.1, "vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                "max_position_embeddings": 64, "pad_token_id": PAD, "bos_token_id": START, "eos_token_id": EOS,
                "decoder_start_token_id": START, "forced_eos_token_id": None, "tie_word_embeddings": False}
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(**{**settings, **overrides}))


@pytest.fixture
def bart():
    return tiny_bart().eval()


@pytest.fixture
def model(bart):
    torch.manual_seed(1)
    return MemBartForConditionalGeneration.from_bart(bart, SLOTS).eval()


def tokens(*shape, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def turn(seed: int, batch: int = 2, length: int = 6, target: int = 5):
    input_ids = tokens(batch, length, seed=seed)
    return input_ids, torch.ones_like(input_ids), tokens(batch, target, seed=seed + 1000)


def test_memory_changes_after_a_turn_and_steers_the_next(model):
    first, second = turn(1), turn(2)
    step1 = model.step(*first, memory=None)
    assert step1.memory.shape == (2, SLOTS, 32)
    # A turn writes: the memory differs from where a fresh row starts, and differs between rows that read different turns.
    assert (step1.memory - model.initial_memory(2)).abs().max() > 0.05
    assert (step1.memory[0] - step1.memory[1]).abs().max() > 1e-3

    carried = model.step(*second, memory=step1.memory)
    fresh = model.step(*second, memory=step1.memory, reset=torch.tensor([True, True]))
    assert (carried.logits - fresh.logits).abs().max() > 1e-3
    assert (carried.loss_sum - fresh.loss_sum).abs() > 1e-4
    assert (carried.memory - fresh.memory).abs().max() > 1e-3


def test_step_reports_summed_loss_count_and_logits(model):
    input_ids, attention_mask, labels = turn(3)
    labels[1, 3:] = -100
    step = model.step(input_ids, attention_mask, labels, memory=None)
    assert step.loss_sum.dtype == torch.float32 and step.loss_sum.dim() == 0
    assert step.count.dtype == torch.long and step.count.item() == 5 + 3
    assert step.logits.shape == (2, 5, VOCAB)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(step.logits[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(step.loss_sum, expected)
    mean = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, memory=None).loss
    torch.testing.assert_close(mean, step.loss_sum / step.count)
    rows = model.step(input_ids, attention_mask, labels, memory=None, per_row=True)
    torch.testing.assert_close(rows.loss_sum.sum(), step.loss_sum)
    assert rows.count.tolist() == [5, 3]


def test_reset_rows_start_from_the_initial_memory_and_others_are_unaffected(model):
    memory = model.step(*turn(4), memory=None).memory
    memory = model.step(*turn(5), memory=memory).memory  # a memory two turns old, unlike the initial one
    now = turn(6)

    mixed = model.step(*now, memory=memory, reset=torch.tensor([True, False]))
    fresh = model.step(*now, memory=None)
    carried = model.step(*now, memory=memory, reset=None)
    assert torch.equal(mixed.logits[0], fresh.logits[0])
    assert torch.equal(mixed.memory[0], fresh.memory[0])
    assert torch.equal(mixed.logits[1], carried.logits[1])
    assert torch.equal(mixed.memory[1], carried.memory[1])
    assert not torch.allclose(mixed.logits[1], fresh.logits[1], atol=1e-4)  # the reset did something

    # A reset row starts from the learned initial memory, LayerNorm(memory_bias); a carried row from
    # LayerNorm(memory + memory_bias).
    encoder = model.model.encoder
    norm = encoder.memory_layer_norm
    started = encoder.start_memory(memory, torch.tensor([True, False]), 2)
    assert torch.equal(started[0], model.initial_memory(2)[0])
    initial = torch.nn.functional.layer_norm(encoder.memory_bias, (32,), norm.weight, norm.bias)
    torch.testing.assert_close(model.initial_memory(3), initial.expand(3, -1, -1))
    carried_start = torch.nn.functional.layer_norm(memory[1] + encoder.memory_bias, (32,), norm.weight, norm.bias)
    torch.testing.assert_close(started[1], carried_start)
    # A reset row ignores what it carried, even if that is not finite.
    poisoned = memory.clone()
    poisoned[0] = float("nan")
    assert torch.equal(model.step(*now, memory=poisoned, reset=torch.tensor([True, False])).logits, mixed.logits)


def test_padded_rows_equal_the_same_rows_alone(model):
    lengths, targets = [5, 8], [3, 6]
    inputs = [tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    labels = [tokens(1, n, seed=20 + i) for i, n in enumerate(targets)]
    memory = model.step(*turn(7), memory=None).memory  # each row carries a different memory

    input_ids = torch.full((2, max(lengths)), PAD)
    attention_mask = torch.zeros_like(input_ids)
    padded_labels = torch.full((2, max(targets)), -100)
    for row in range(2):
        input_ids[row, : lengths[row]] = inputs[row]
        attention_mask[row, : lengths[row]] = 1
        padded_labels[row, : targets[row]] = labels[row]
    # What sits under the padding must not matter either.
    input_ids[0, lengths[0]:] = tokens(max(lengths) - lengths[0], seed=30)
    batch = model.step(input_ids, attention_mask, padded_labels, memory=memory, per_row=True)

    for row in range(2):
        alone = model.step(inputs[row], torch.ones_like(inputs[row]), labels[row], memory=memory[row : row + 1])
        n = targets[row]
        torch.testing.assert_close(batch.logits[row, :n], alone.logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.memory[row], alone.memory[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.loss_sum[row], alone.loss_sum, atol=1e-5, rtol=0)
        assert batch.count[row] == alone.count == n


def test_joint_attention_mask_layout():
    allowed = joint_attention_bias(torch.tensor([[1, 1, 0]]), memory_len=2, dtype=torch.float32)[0, 0] == 0
    #                             slot0  slot1  tok0  tok1  tok2(pad)
    expected = torch.tensor([[True, False, True, True, False],   # slot 0: itself and the real tokens
                             [False, True, True, True, False],   # slot 1
                             [True, True, True, True, False],    # tokens: every slot and the real tokens
                             [True, True, True, True, False],
                             [True, True, True, True, False]])
    assert torch.equal(allowed, expected)


def test_memory_slots_read_tokens_but_not_each_other(model):
    layer = model.model.encoder.layers[0]
    hidden = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    memory = torch.randn(1, SLOTS, 32, generator=torch.Generator().manual_seed(1))
    bias = joint_attention_bias(torch.tensor([[1, 1, 1, 1, 0]]), SLOTS, torch.float32)
    hidden_out, memory_out = layer(hidden, memory, bias)

    other_slot = memory.clone()
    other_slot[0, 1] += 1.0
    hidden_changed, memory_changed = layer(hidden, other_slot, bias)
    assert torch.equal(memory_changed[0, 0], memory_out[0, 0])  # slot 0 does not read slot 1
    assert (memory_changed[0, 1] - memory_out[0, 1]).abs().max() > 0.01
    assert (hidden_changed[0, :4] - hidden_out[0, :4]).abs().max() > 1e-3  # tokens read every slot

    other_token = hidden.clone()
    other_token[0, 2] += 1.0
    assert (layer(other_token, memory, bias)[1] - memory_out).abs().max() > 1e-3  # slots read the tokens
    other_pad = hidden.clone()
    other_pad[0, 4] += 1.0
    hidden_pad, memory_pad = layer(other_pad, memory, bias)
    assert torch.equal(memory_pad, memory_out)  # nobody reads the padding
    assert torch.equal(hidden_pad[0, :4], hidden_out[0, :4])


def test_write_gate_blends_the_new_memory_with_the_old(model):
    encoder = model.model.encoder
    input_ids, attention_mask, _ = turn(14)
    memory = model.step(*turn(15), memory=None).memory
    old = encoder.start_memory(memory, None, 2)
    layer_outputs = []
    hook = encoder.layers[-1].register_forward_hook(lambda module, args, output: layer_outputs.append(output[1]))
    written = encoder(input_ids, attention_mask, memory=memory).memory
    hook.remove()
    new = layer_outputs[0]
    gate = torch.sigmoid(encoder.memory_gate.score(torch.nn.functional.gelu(encoder.memory_gate.dense(new))))
    assert gate.shape == (2, SLOTS, 1) and 0.05 < gate.min() and gate.max() < 0.95
    torch.testing.assert_close(written, gate * new + (1 - gate) * old)
    assert (new - old).abs().max() > 0.1  # so the blend is not trivially either one

    with torch.no_grad():
        encoder.memory_gate.score.bias.fill_(-100.0)  # closed: the memory is kept as the step began
        torch.testing.assert_close(encoder(input_ids, attention_mask, memory=memory).memory, old)
        encoder.memory_gate.score.bias.fill_(100.0)  # open: the new value is written as is
        torch.testing.assert_close(encoder(input_ids, attention_mask, memory=memory).memory, new)


def test_decoder_reads_the_memory_slots_and_not_the_padding(model):
    input_ids, _, labels = turn(16, batch=1)
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    encoded = model.model.encoder(input_ids, attention_mask, memory=None)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)

    def logits(states):
        outputs = type(encoded)(last_hidden_state=states)
        return model(encoder_outputs=outputs, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits

    states = encoded.last_hidden_state
    reference = logits(states)
    torch.testing.assert_close(reference, model(input_ids=input_ids, attention_mask=attention_mask,
                                                decoder_input_ids=decoder_input_ids).logits)
    other_slot, other_pad = states.clone(), states.clone()
    other_slot[0, 1] += 1.0  # memory slot 1
    other_pad[0, SLOTS + 5] += 1.0  # the last token, padding
    assert (logits(other_slot) - reference).abs().max() > 1e-3
    assert torch.equal(logits(other_pad), reference)


def loss_after_three_turns(model, memory1, detach: bool = False):
    memory2 = model.step(*turn(42), memory=memory1.detach() if detach else memory1).memory
    return model.step(*turn(43), memory=memory2).loss_sum


def test_gradients_flow_through_time_until_detached(model):
    memory1 = model.step(*turn(41), memory=None).memory
    (grad,) = torch.autograd.grad(loss_after_three_turns(model, memory1), memory1)
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-4
    # ...back to the parameters that made the first turn's memory, e.g. the memory start
    bias = model.model.encoder.memory_bias
    with_history = torch.autograd.grad(loss_after_three_turns(model, memory1), bias)[0]
    without = torch.autograd.grad(loss_after_three_turns(model, memory1, detach=True), bias)[0]
    assert (with_history - without).abs().max() > 1e-6

    # Detached between turns 1 and 2, turn 3's loss no longer reaches turn 1's memory.
    (cut,) = torch.autograd.grad(loss_after_three_turns(model, memory1, detach=True), memory1, allow_unused=True)
    assert cut is None

    # The gradient is the right one: a finite difference (in float64) agrees.
    model = model.double()
    memory1 = model.step(*turn(41), memory=None).memory.detach().requires_grad_()
    (grad,) = torch.autograd.grad(loss_after_three_turns(model, memory1), memory1)
    index, epsilon = (1, 2, 3), 1e-6
    with torch.no_grad():
        up, down = memory1.clone(), memory1.clone()
        up[index] += epsilon
        down[index] -= epsilon
        numeric = (loss_after_three_turns(model, up) - loss_after_three_turns(model, down)) / (2 * epsilon)
    assert abs(grad[index].item()) > 1e-4
    assert numeric.item() == pytest.approx(grad[index].item(), rel=1e-4)


def memory_extras(config: MemBartConfig) -> int:
    """What MemBart adds to BART: per encoder layer a second attention's four projections, two
    layer norms and a feed-forward; once the memory start (bias and layer norm) and the gate."""
    d, ffn, slots = config.d_model, config.encoder_ffn_dim, config.memory_len
    per_layer = 4 * (d * d + d) + 2 * (2 * d) + (d * ffn + ffn) + (ffn * d + d)
    once = slots * d + 2 * d + (d * d + d) + (d + 1)
    return config.encoder_layers * per_layer + once


def test_from_bart_copies_the_token_stream_into_the_memory_stream(bart, model):
    assert isinstance(model.config, MemBartConfig) and model.config.model_type == "membart"
    assert model.memory_slots == SLOTS and model.hidden_size == 32
    memory_state = model.state_dict()
    for name, value in bart.state_dict().items():
        assert torch.equal(memory_state[name], value), name
    pairs = {"memory_attn.q_proj": "self_attn.q_proj", "memory_attn.k_proj": "self_attn.k_proj",
             "memory_attn.v_proj": "self_attn.v_proj", "memory_attn.out_proj": "self_attn.out_proj",
             "memory_attn_layer_norm": "self_attn_layer_norm", "memory_fc1": "fc1", "memory_fc2": "fc2",
             "memory_final_layer_norm": "final_layer_norm"}
    for i in range(2):
        for memory_name, token_name in pairs.items():
            for kind in ("weight", "bias"):
                prefix = f"model.encoder.layers.{i}."
                memory_value = memory_state[f"{prefix}{memory_name}.{kind}"]
                assert torch.equal(memory_value, memory_state[f"{prefix}{token_name}.{kind}"])
    assert model.model.encoder.memory_bias.abs().max() > 0  # initialised, not left empty

    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in bart.parameters()) + memory_extras(model.config)
    assert memory_extras(model.config) == 2 * (4 * 1056 + 128 + 2112 + 2080) + (128 + 64 + 1056 + 33)

    step = model.step(*turn(8), memory=None)
    assert torch.isfinite(step.loss_sum) and step.count == 10


def test_from_bart_keeps_what_a_trained_bart_knows():
    """A BART that has memorised eight pairs still knows them with memory added (chance: ln 100 = 4.6 nats)."""
    bart = tiny_bart(init_std=0.02, dropout=0.0)
    input_ids = tokens(8, 6, seed=50)
    optimizer = torch.optim.Adam(bart.parameters(), lr=1e-2)
    for _ in range(60):
        loss = bart(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bart.eval()
    with torch.no_grad():
        bart_loss = bart(input_ids=input_ids, labels=input_ids).loss.item()
        torch.manual_seed(1)
        model = MemBartForConditionalGeneration.from_bart(bart, SLOTS).eval()
        first = model.step(input_ids, torch.ones_like(input_ids), input_ids, memory=None)
        second = model.step(input_ids, torch.ones_like(input_ids), input_ids, memory=first.memory)
    assert bart_loss < 0.02
    assert (first.loss_sum / first.count).item() < 0.1
    assert (second.loss_sum / second.count).item() < 0.1


def test_save_and_load_round_trip(model, tmp_path):
    with torch.no_grad():  # make the memory weights differ from the copies and initial values a reload would give
        for name, parameter in model.named_parameters():
            if "memory" in name:
                parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    loaded, info = MemBartForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(loaded.config, MemBartConfig) and loaded.config.memory_len == SLOTS

    memory = model.step(*turn(9), memory=None).memory
    before = model.step(*turn(10), memory=memory, reset=torch.tensor([False, True]))
    after = loaded.step(*turn(10), memory=memory, reset=torch.tensor([False, True]))
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.memory, after.memory)
    assert torch.equal(loaded.initial_memory(1), model.initial_memory(1))


def greedy_by_steps(model, input_ids, memory, steps: int) -> list[int]:
    """Greedy decoding by full forward passes: each time the argmax of the last position."""
    decoded = [START]
    for _ in range(steps):
        logits = model(input_ids=input_ids, decoder_input_ids=torch.tensor([decoded]), memory=memory).logits
        decoded.append(int(logits[0, -1].argmax()))
        if decoded[-1] == EOS:
            break
    return decoded[1:]


def test_generate_reply_writes_steps_memory_and_decodes_greedily(model):
    memory = model.step(*turn(11, batch=1), memory=None).memory
    input_ids, attention_mask, labels = turn(12, batch=1)

    reply, new_memory = model.generate_reply(input_ids, memory, max_new_tokens=6, do_sample=False)
    step = model.step(input_ids, attention_mask, labels, memory=memory)
    torch.testing.assert_close(new_memory, step.memory, atol=1e-6, rtol=0)
    expected = greedy_by_steps(model, input_ids, memory, 6)
    assert reply[0].tolist() == expected
    assert len(set(expected)) > 1  # a real sequence, not one token repeated
    assert reply[0, 0] == step.logits[0, 0].argmax()  # step's first position predicts from the start token

    # Plain generate() runs the memory encoder too; a reset row decodes as from no memory.
    plain = model.generate(input_ids, memory=memory, max_new_tokens=6, do_sample=False)
    assert plain[0, 1:].tolist() == expected
    reset_reply, reset_memory = model.generate_reply(input_ids, memory, reset=torch.tensor([True]),
                                                     max_new_tokens=6, do_sample=False)
    fresh_reply, fresh_memory = model.generate_reply(input_ids, None, max_new_tokens=6, do_sample=False)
    assert torch.equal(reset_reply, fresh_reply) and torch.equal(reset_memory, fresh_memory)


def test_generate_reply_batches_padded_rows(model):
    short, long = tokens(1, 4, seed=60), tokens(1, 7, seed=61)
    input_ids = torch.full((2, 7), PAD)
    input_ids[0, :4], input_ids[1] = short[0], long[0]
    attention_mask = (torch.arange(7)[None] < torch.tensor([[4], [7]])).long()
    memory = model.step(*turn(13), memory=None).memory
    replies, new_memory = model.generate_reply(input_ids, memory, attention_mask=attention_mask,
                                               max_new_tokens=5, do_sample=False)
    for row, alone in enumerate((short, long)):
        reply, row_memory = model.generate_reply(alone, memory[row : row + 1], max_new_tokens=5, do_sample=False)
        n = reply.shape[1]
        assert replies[row, :n].tolist() == reply[0].tolist()
        torch.testing.assert_close(new_memory[row], row_memory[0], atol=1e-5, rtol=0)
