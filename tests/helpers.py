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


def tiny_llama(tokenizer, layers: int = 2, positions: int = 512):
    """A tiny random Llama-style causal LM (seeded) for `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def tiny_sentence_embedder(directory: Path, normalize: bool = False) -> Path:
    """A tiny random sentence-transformers model (BERT, 2 layers, 32 dimensions, a WordPiece
    vocabulary of a few sentences' words and single letters, mean pooling) saved in `directory`. Without
    `normalize` it has no Normalize module, so its raw vectors are not unit length."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    corpus = ["book a table at a restaurant for dinner", "find a restaurant in the city",
              "what is the weather like tomorrow", "play a song by an artist", "get me a cab to the airport",
              "reserve restaurant name city party size", "song name weather city destination riders"] * 10
    # The vocabulary is written out, not trained: a trainer breaks frequency ties differently from
    # run to run, and the model's numbers would change with it.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = sorted({word for sentence in corpus for word in sentence.split()})
    pieces = [*specials, *letters, *(f"##{c}" for c in letters), *(w for w in words if w not in letters)]
    tok = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tokenizer = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    backbone = directory / "backbone"
    BertModel(config).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    transformer = Transformer(str(backbone), max_seq_length=64)
    modules = [transformer, Pooling(32, "mean")] + ([Normalize()] if normalize else [])
    SentenceTransformer(modules=modules, device="cpu").save(str(directory / "model"))
    return directory / "model"


def load_without_dialogtune(run: Path, auto_class):
    """A LoRA run loaded the way any PEFT user would: its base model (`auto_class`), the adapter
    on top, and the tokenizer carrying the training template. What dialogtune's replies are
    checked against."""
    import json

    from peft import PeftModel
    from transformers import AutoTokenizer

    info = json.loads((run / "final" / "dialogtune.json").read_text())
    model = PeftModel.from_pretrained(auto_class.from_pretrained(info["base_model_path"]), str(run / "final"))
    return model.eval(), AutoTokenizer.from_pretrained(run / "final")


def tiny_memory_run(directory: Path, model_dir: Path) -> Path:
    """A tiny memory run (`task: memory`, 4 slots, a 16-token window, LoRA) trained for six steps
    on the MSC fixture from `model_dir` (a tiny causal model); returns its run directory."""
    from dialogtune.config import TrainJobConfig, build_config
    from dialogtune.train.memory_run import train_memory

    config = build_config({
        "data": {"path": str(FIXTURES / "msc_parlai.jsonl")}, "task": {"name": "memory"},
        "split": {"validation": 0.34, "seed": 0}, "model": {"name": str(model_dir)}, "max_length": 128,
        "output": str(directory / "prepared"), "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "memory": {"slots": 4, "window": 16, "time_horizon": 3},
        "train": {"max_steps": 6, "learning_rate": 0.01, "per_device_train_batch_size": 2, "logging_steps": 1,
                  "warmup_steps": 0, "lr_scheduler_type": "constant", "report_to": []},
        "eval": {"every": 3}, "run_dir": str(directory / "run"), "samples": 0,
    }, schema=TrainJobConfig)
    train_memory(config, quiet=True)
    return directory / "run"
