"""Shared test fixtures: tiny tokenizers trained on the spot (no downloads), and paths."""

from __future__ import annotations

import pytest
import torch
from helpers import save_with_chatml, tiny_llama, tiny_sentence_embedder

# Tiny models gain nothing from two threads, and OpenMP's spinning makes them 40x slower when
# the other core is busy. One thread keeps the suite fast and its timings steady.
torch.set_num_threads(1)

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CORPUS = [
    "Hello there! How are you doing today? I'm fine, thanks for asking.",
    "Alice: I would like to find a restaurant in San Jose.",
    "Bob: There are 10 restaurants you may like. What about Sushi Sam?",
    "User: Summarize the following dialogue:\nAssistant: Amanda baked cookies.",
    "ASSISTANT: The weather is nice. USER: Yes it is. [INST] <<SYS>> [/INST]",
] * 20


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])


def _metaspace_tokenizer():
    """Llama/SentencePiece-style: words carry a leading '▁', a classic source of off-by-one masks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIALS]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="session")
def byte_tokenizer():
    return _byte_level_tokenizer()


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    return _metaspace_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, byte_tokenizer):
    """A tiny random Llama-style model and its tokenizer (with a ChatML template) on disk."""
    return save_with_chatml(tmp_path_factory.mktemp("tiny-llama"), tiny_llama(byte_tokenizer), byte_tokenizer)


@pytest.fixture(scope="session")
def tiny_job_dir(tmp_path_factory, tiny_model_dir):
    """A directory holding a tiny LoRA run (`run/`) and its prepared data (`prepared/`), trained
    for two steps: what chat, generate and serve load."""
    from test_train_run import job

    from dialogtune.train.run import train

    directory = tmp_path_factory.mktemp("tiny-job")
    train(job(directory, tiny_model_dir, train={"max_steps": 2}, samples=0), quiet=True)
    return directory


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory, byte_tokenizer):
    """A tiny random BART (encoder-decoder) and its tokenizer (with a ChatML template) on disk."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(byte_tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=256, pad_token_id=byte_tokenizer.pad_token_id,
                        bos_token_id=byte_tokenizer.bos_token_id, eos_token_id=byte_tokenizer.eos_token_id,
                        decoder_start_token_id=byte_tokenizer.eos_token_id, forced_eos_token_id=None)
    return save_with_chatml(tmp_path_factory.mktemp("tiny-bart"), BartForConditionalGeneration(config), byte_tokenizer)


@pytest.fixture(scope="session")
def tiny_bart_run(tmp_path_factory, tiny_bart_dir):
    """A directory holding a tiny BART LoRA run (`run/`) and its prepared data (`prepared/`: one
    example per assistant turn, pack: false, as an encoder-decoder needs), trained by dialogtune
    for eight steps: enough to end some replies with <|im_end|>."""
    from test_train_run import job

    from dialogtune.train.run import train

    directory = tmp_path_factory.mktemp("tiny-bart-job")
    train(job(directory, tiny_bart_dir, pack=False, task={"as": "assistant", "context": {"rounds": 2}},
              train={"max_steps": 8}, eval={"every": None}, samples=0), quiet=True)
    return directory


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory):
    """A tiny random sentence-transformers model without a Normalize module."""
    return tiny_sentence_embedder(tmp_path_factory.mktemp("tiny-embedder"))


@pytest.fixture(scope="session")
def tiny_understand_run(tmp_path_factory, byte_tokenizer, tiny_embedder_dir):
    """A directory holding a tiny understand run (`run/`) trained on the retrieval fixture's SGD
    dialogues, with its index (`index/`, the tiny embedder) and prepared data (`prepared/`)."""
    from helpers import FIXTURES

    from dialogtune.config import TrainJobConfig, build_config
    from dialogtune.retrieval.exemplars import extract_sgd_exemplars
    from dialogtune.retrieval.index import build_index, save_index
    from dialogtune.retrieval.schemas import read_functions
    from dialogtune.train.run import train

    sgd = FIXTURES / "retrieval" / "sgd"
    directory = tmp_path_factory.mktemp("tiny-understand")
    # 1024 positions: five candidates and their arguments' questions, at a byte-level vocabulary's rate
    model_dir = save_with_chatml(directory / "model", tiny_llama(byte_tokenizer, positions=1024), byte_tokenizer)
    index = build_index(read_functions(sgd), extract_sgd_exemplars(sgd)[0], embedder=str(tiny_embedder_dir))
    save_index(index, directory / "index")
    config = build_config({
        "data": {"path": str(sgd), "format": "sgd"},
        "task": {"name": "understand", "index": str(directory / "index"), "candidates": 5, "exemplars": 0,
                 "context": {"rounds": 1}},
        "split": {"validation": 0.0}, "model": {"name": str(model_dir)}, "template": {"name": "chatml"},
        "max_length": 1024, "output": str(directory / "prepared"), "method": "full",
        "train": {"max_steps": 80, "learning_rate": 0.01, "per_device_train_batch_size": 3, "logging_steps": 1,
                  "warmup_steps": 0, "lr_scheduler_type": "constant", "report_to": []},
        "eval": {"every": None}, "run_dir": str(directory / "run"), "samples": 0,
    }, schema=TrainJobConfig)
    train(config, quiet=True)
    return directory


@pytest.fixture(scope="session")
def memory_run_dir(tmp_path_factory, tiny_model_dir):
    """A tiny memory run (task: memory, LoRA, 4 slots) trained for six steps on the MSC fixture.
    Shared: tests that write memories give their own directories."""
    from helpers import tiny_memory_run

    return tiny_memory_run(tmp_path_factory.mktemp("tiny-memory"), tiny_model_dir)
