import pytest
import torch

from dialogtune.collate import CausalCollator
from dialogtune.loss import trained_loss
from dialogtune.train.attention import (
    ATTENTION,
    restore_attention,
    segment_attention,
    segment_spans,
    use_segment_attention,
)


def _tiny(kind: str = "llama", **extra):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=256, **extra)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }[kind]
    return model_class(config_class(**common)).float()


def _rows(seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in ([9, 14], [20], [5, 6, 7]):  # packed rows: examples with restarting positions
        ids, labels, positions = [], [], []
        for n in lengths:
            tokens = torch.randint(3, 97, (n,), generator=generator).tolist()
            ids += tokens
            labels += [-100] + [t if i % 3 else -100 for i, t in enumerate(tokens[1:])]
            positions += list(range(n))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


def test_spans_are_runs_of_consecutive_positions():
    assert segment_spans(torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])) == [(0, 3), (3, 5), (5, 9)]
    assert segment_spans(torch.tensor([0, 1, 2])) == [(0, 3)]
    assert segment_spans(torch.tensor([4, 5, 0])) == [(0, 2), (2, 3)]


# A sliding window of 6 tokens: shorter than most of the examples, longer than the probe's first.
@pytest.mark.parametrize(("kind", "extra"), [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 6})])
def test_flattened_batch_loss_and_gradients_equal_the_padded_masked_path(kind, extra):
    from peft import LoraConfig, get_peft_model

    rows = _rows()
    reference = get_peft_model(_tiny(kind, **extra), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    padded = CausalCollator(pad_token_id=0)(rows)
    loss_ref, count_ref = trained_loss(reference, padded)
    loss_ref.backward()

    model = get_peft_model(_tiny(kind, **extra), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.load_state_dict(reference.state_dict())
    assert use_segment_attention(model.get_base_model())
    assert model.config._attn_implementation == ATTENTION
    flat = CausalCollator(pad_token_id=0, flatten=True)(rows)
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    loss, count = trained_loss(model, flat)
    loss.backward()

    assert int(count) == int(count_ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert len(grads) == 8  # lora A and B of q and v in two layers
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6)


def test_examples_do_not_see_each_other():
    model = _tiny().eval()
    assert use_segment_attention(model)
    rows = _rows()
    flat = CausalCollator(pad_token_id=0, flatten=True)(rows)
    with torch.no_grad():
        packed = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits[0]
        restore_attention(model)
        alone = [model(input_ids=torch.tensor([r["input_ids"][s:e]])).logits[0]
                 for r in rows for s, e in segment_spans(torch.tensor(r["position_ids"]))]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_a_model_with_more_than_a_causal_softmax_keeps_its_attention():
    # Gemma-2 soft-caps its attention logits, which segment attention does not do: it refuses, and
    # the model is left as it was.
    model = _tiny("gemma2", head_dim=16, attn_logit_softcapping=5.0, sliding_window=4)
    previous = model.config._attn_implementation
    assert not use_segment_attention(model)
    assert model.config._attn_implementation == previous
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="soft-capping"):
        segment_attention(model.model.layers[0].self_attn, q, q, q, None, softcap=5.0)


def test_encoder_decoder_models_keep_their_attention():
    from transformers import BartConfig, BartForConditionalGeneration

    model = BartForConditionalGeneration(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=32, decoder_ffn_dim=32))
    assert not use_segment_attention(model)


def test_restored_model_generates_as_before():
    model = _tiny().eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    before = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert use_segment_attention(model)
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), before)


def test_segment_attention_refuses_a_mask_or_a_cache():
    model = _tiny().eval()
    assert use_segment_attention(model)
    with pytest.raises(ValueError, match="not from an attention mask"):
        model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool).tril())
    with torch.no_grad():
        first = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
        with pytest.raises(ValueError, match="no cache"):
            model(input_ids=torch.tensor([[8]]), cache=first.cache, use_cache=True)


def test_long_examples_in_query_blocks_equal_one_causal_attention(monkeypatch):
    from dialogtune.train import attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)  # 3 blocks for 11 queries, the last one short
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 4, 11, 8, requires_grad=True) for _ in range(3))
    blocked = attention._causal(query, key, value, None, 0.0)
    blocked.square().sum().backward()
    grads = [t.grad.clone() for t in (query, key, value)]
    for t in (query, key, value):
        t.grad = None
    whole = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
    whole.square().sum().backward()
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    for got, t in zip(grads, (query, key, value), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-6)


def test_sliding_window_in_query_blocks_equals_a_windowed_mask(monkeypatch):
    from dialogtune.train import attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 2, 11, 8) for _ in range(3))
    i, j = torch.arange(11).unsqueeze(1), torch.arange(11).unsqueeze(0)
    window = 3  # a query sees itself and the two keys before it
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=(j <= i) & (j > i - window))
    torch.testing.assert_close(attention._causal(query, key, value, None, 0.0, window), expected, rtol=1e-5, atol=1e-6)
    # A window longer than the example is plain causal attention.
    torch.testing.assert_close(attention._causal(query, key, value, None, 0.0, 11),
                               attention._causal(query, key, value, None, 0.0), rtol=1e-6, atol=1e-7)
