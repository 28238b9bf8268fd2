"""Small helpers shared by the test files (imported as `helpers`; pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def split_items(items) -> tuple[list[Dialogue], list[Reject]]:
    """A reader's output as (dialogues, rejects)."""
    items = list(items)
    return [o for o in items if isinstance(o, Dialogue)], [o for o in items if isinstance(o, Reject)]


def turn_pairs(dialogue: Dialogue) -> list[tuple[str | None, str]]:
    return [(t.speaker, t.text) for t in dialogue.turns]


def save_with_chatml(directory: Path, model, tokenizer) -> Path:
    """A model and its tokenizer on disk, the tokenizer carrying the shipped ChatML template (the
    shared tokenizer object is left as it was)."""
    from dialogtune.templates import shipped_source

    model.save_pretrained(directory)
    tokenizer.chat_template = shipped_source("chatml")
    tokenizer.save_pretrained(directory)
    tokenizer.chat_template = None
    return directory


def tiny_llama(tokenizer, layers: int = 2):
    """A tiny random Llama-style causal LM (seeded) for `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
