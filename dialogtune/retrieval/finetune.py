"""Fine-tune the retrieval embedder on exemplars: `dialogtune train-embedder CONFIG`.

    dialogtune train-embedder examples/sgd_embedder.yaml
    dialogtune index sgd/train sgd/dev --exemplars sgd/train --embedder embedder-sgd -o sgd-index-ft

Each labelled utterance (an exemplar with an owner function and an utterance) is an anchor for
up to two pairs: its own template (`<slot>` read as the slot's words, as the index reads it) and
its function's description. Each pair gets exactly one hard negative, mined by the base model:
the highest-scoring text of the same kind (template, or description) owned by a function the
utterance does not mean. "Does not mean" excludes every function labelled on that turn (an SGD
turn can open two intents at once) and any text equal to the positive. A pair for which no such
text exists is dropped and counted.

The loss is sentence-transformers' MultipleNegativesRankingLoss: for each anchor, its positive
against its hard negative and every other text in the batch. Batches come from the
`no_duplicates` sampler, so one text never appears twice in a batch (it would be both the
positive and an in-batch negative). The validation pairs are the utterances of a seeded share of
dialogues (hand-written exemplars: of files), their negatives mined from every template; the
training pairs never see a held-out template, not even as a negative. The loss on the validation
pairs and on a sample of training pairs is reported before and after training.

The output is a plain sentence-transformers model directory (plus train_embedder.json, what this
run did) that `dialogtune index --embedder DIR` loads like any other.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dialogtune.config import EmbedderTrainConfig, build_config, check_passed_through, load_yaml, merge, relative_to
from dialogtune.errors import ConfigError, DataError
from dialogtune.files import staged_dir, write_json
from dialogtune.retrieval.embedder import embed, load_embedder
from dialogtune.retrieval.exemplars import Exemplar, read_exemplars
from dialogtune.retrieval.index import template_text
from dialogtune.retrieval.schemas import Function, load_functions
from dialogtune.split import validation_groups

PAIR_KINDS = ("template", "description")
# train.* keys this command sets itself, and what to do instead
PROTECTED = {"output_dir": "; set output instead", "batch_sampler": " (no_duplicates, which the loss needs)"}
TRAIN_LOSS_SAMPLE = 1024  # training pairs whose loss is measured before and after
SUMMARY_FILE = "train_embedder.json"
MINING_CHUNK = 1024  # anchors scored at once (a chunk x pool matrix of float32)


@dataclass(frozen=True)
class Pair:
    anchor: str  # the utterance
    positive: str  # its template, or its function's description
    kind: str  # "template" or "description"
    function: str  # the positive's owner
    group: str  # the dialogue (or hand-written file) the utterance comes from
    excluded: frozenset[str] = frozenset()  # functions the utterance means: never a negative's owner


@dataclass
class PairStats:
    pairs: Counter = field(default_factory=Counter)  # kind -> pairs built
    no_template: int = 0  # utterances whose template could not be built: no template pair
    no_utterance: int = 0  # hand-written templates without an utterance: negatives only, no anchor
    no_negative: Counter = field(default_factory=Counter)  # kind -> pairs dropped, nothing to contrast


@dataclass(frozen=True)
class Pool:
    """The texts negatives are mined from, one kind: (owner function, text), deduplicated."""
    functions: tuple[str, ...]
    texts: tuple[str, ...]


def build_pairs(exemplars: Sequence[Exemplar], functions: Sequence[Function],
                kinds: Sequence[str] = PAIR_KINDS) -> tuple[list[Pair], PairStats]:
    """The (utterance, positive) pairs of the kinds asked for, in exemplar order. Exemplars without
    an owner (out-of-domain turns) are not anchors: no function is their positive."""
    descriptions = {function.name: function.description for function in functions}
    meant: dict[tuple, set[str]] = {}  # (source, utterance) -> every function labelled on that turn
    for e in exemplars:
        if e.function is not None and e.utterance is not None:
            meant.setdefault((e.source, e.utterance), set()).add(e.function)
    stats, pairs = PairStats(), []
    for e in exemplars:
        if e.function is None:
            continue
        if e.function not in descriptions:
            raise DataError(f"exemplar {e.source}: function {e.function!r} is not in the schemas given")
        if e.utterance is None:
            stats.no_utterance += 1
            continue
        excluded = frozenset(meant[(e.source, e.utterance)])
        for kind in kinds:
            if kind == "template":
                if e.template is None:
                    stats.no_template += 1
                    continue
                positive = template_text(e.template)
            else:
                positive = descriptions[e.function]
            pairs.append(Pair(e.utterance, positive, kind, e.function, str(e.source[0]), excluded))
            stats.pairs[kind] += 1
    return pairs, stats


def template_pool(exemplars: Sequence[Exemplar], held_out: set[str] = frozenset()) -> Pool:
    """Every owned template, as the index reads it, except those of held-out groups."""
    seen = dict.fromkeys((e.function, template_text(e.template)) for e in exemplars
                         if e.function is not None and e.template is not None and str(e.source[0]) not in held_out)
    return Pool(tuple(f for f, _ in seen), tuple(t for _, t in seen))


def description_pool(functions: Sequence[Function]) -> Pool:
    return Pool(tuple(f.name for f in functions), tuple(f.description for f in functions))


def mine_hard_negatives(anchor_vectors: np.ndarray, pairs: Sequence[Pair], pool: Pool,
                        pool_vectors: np.ndarray) -> list[int | None]:
    """For each pair, the row of the pool's best-scoring text (dot product of unit vectors)
    whose owner is not among the functions the anchor means and which differs from the positive;
    None when there is none. Equal scores go to the earlier row."""
    rows_of: dict[str, list[int]] = {}
    for row, name in enumerate(pool.functions):
        rows_of.setdefault(name, []).append(row)
    rows_of_text: dict[str, list[int]] = {}
    for row, text in enumerate(pool.texts):
        rows_of_text.setdefault(text, []).append(row)
    chosen: list[int | None] = []
    for start in range(0, len(pairs), MINING_CHUNK):
        chunk = pairs[start:start + MINING_CHUNK]
        scores = anchor_vectors[start:start + len(chunk)] @ pool_vectors.T
        for i, pair in enumerate(chunk):
            for name in pair.excluded | {pair.function}:
                scores[i, rows_of.get(name, [])] = -np.inf
            scores[i, rows_of_text.get(pair.positive, [])] = -np.inf
        best = np.argmax(scores, axis=1) if len(pool.texts) else np.zeros(len(chunk), dtype=int)
        chosen += [int(row) if len(pool.texts) and np.isfinite(scores[i, row]) else None
                   for i, row in enumerate(best)]
    return chosen


def embed_once(model, texts: Sequence[str], known: dict[str, np.ndarray]) -> np.ndarray:
    """The texts' vectors, embedding only those not in `known` (which keeps them): the training
    and validation pools share their descriptions and most templates."""
    new = [text for text in dict.fromkeys(texts) if text not in known]
    if new:
        known.update(zip(new, embed(model, new), strict=True))
    return np.stack([known[text] for text in texts])


def with_negatives(model, pairs: Sequence[Pair], pools: dict[str, Pool], stats: PairStats,
                   known: dict[str, np.ndarray] | None = None) -> list[tuple[Pair, str]]:
    """Each pair with its mined negative; pairs without one are dropped (and counted). `known`
    holds vectors already embedded, shared between calls."""
    known = {} if known is None else known
    anchors = sorted({pair.anchor for pair in pairs})
    anchor_vectors = dict(zip(anchors, embed_once(model, anchors, known), strict=True)) if anchors else {}
    kept = []
    for kind, pool in pools.items():
        of_kind = [pair for pair in pairs if pair.kind == kind]
        if not of_kind:
            continue
        vectors = np.stack([anchor_vectors[pair.anchor] for pair in of_kind])
        for pair, row in zip(of_kind, mine_hard_negatives(vectors, of_kind, pool, embed_once(model, pool.texts, known)),
                             strict=True):
            if row is None:
                stats.no_negative[kind] += 1
            else:
                kept.append((pair, pool.texts[row]))
    return kept


def no_duplicate_batches(mined: Sequence[tuple[Pair, str]], size: int, seed: int) -> list[list[int]]:
    """Seeded batches in which no text occurs twice, as the trainer's `no_duplicates` sampler
    makes them: a pair that would repeat a text waits for a later batch."""
    order = list(range(len(mined)))
    random.Random(seed).shuffle(order)
    batches = []
    while order:
        batch, texts, rest = [], set(), []
        for row in order:
            pair, negative = mined[row]
            own = {pair.anchor, pair.positive, negative}
            if len(batch) < size and not own & texts:
                batch.append(row)
                texts |= own
            else:
                rest.append(row)
        batches.append(batch)
        order = rest
    return batches


def pairs_loss(model, loss, mined: Sequence[tuple[Pair, str]], batch_size: int, seed: int) -> float | None:
    """The mean loss over `mined` in fixed batches, without dropout or gradients: comparable
    before and after training (the trainer's own evaluation draws its batches afresh)."""
    import torch

    if not mined:
        return None
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for batch in no_duplicate_batches(mined, batch_size, seed):
                columns = ([mined[r][0].anchor for r in batch], [mined[r][0].positive for r in batch],
                           [mined[r][1] for r in batch])
                features = [{k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                             for k, v in model.preprocess(texts).items()} for texts in columns]
                total += float(loss(features, None)) * len(batch)
    finally:
        model.train(was_training)
    return total / len(mined)


def _dataset(mined: Sequence[tuple[Pair, str]]):
    from datasets import Dataset

    return Dataset.from_dict({"anchor": [p.anchor for p, _ in mined], "positive": [p.positive for p, _ in mined],
                              "negative": [negative for _, negative in mined]})


# --- config and data -----------------------------------------------------------------------------

def load_config(path: Path, overrides: dict[str, Any] | None = None) -> EmbedderTrainConfig:
    """The config file, with `schemas` and `exemplars` relative to it (configs travel with data)."""
    raw = merge(load_yaml(path), overrides or {})
    for key in ("schemas", "exemplars"):
        if key in raw:
            raw[key] = relative_to(path, raw[key])
    return build_config(raw, str(path), schema=EmbedderTrainConfig)


def training_arguments(config: EmbedderTrainConfig, output_dir: str):
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments

    check_passed_through(config.train, SentenceTransformerTrainingArguments, PROTECTED, "dialogtune train-embedder")
    batch = config.train.get("per_device_train_batch_size", 32)
    defaults: dict[str, Any] = {
        "per_device_train_batch_size": batch, "per_device_eval_batch_size": batch, "learning_rate": 2e-5,
        "num_train_epochs": 1, "warmup_steps": 0.1, "seed": config.seed, "logging_steps": 10,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": False,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    try:
        return SentenceTransformerTrainingArguments(output_dir=output_dir, batch_sampler="no_duplicates",
                                                    **{**defaults, **config.train})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"train: {err}") from err


def _is_ours(path: Path) -> bool:
    return (path / SUMMARY_FILE).exists()


# --- the command ---------------------------------------------------------------------------------

def train_embedder(config: EmbedderTrainConfig) -> dict[str, Any]:
    """Mine, train, measure, save. Returns the summary also written to OUTPUT/train_embedder.json."""
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    started = time.perf_counter()
    output = Path(config.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not _is_ours(output):
        raise ConfigError(f"output: {output} exists and is not an embedder written by train-embedder; "
                          "choose another output directory")
    training_arguments(config, tempfile.gettempdir())  # a bad train.* key fails now, not after mining
    functions = load_functions(Path(p) for p in config.schemas)
    exemplars, notes = read_exemplars([Path(p) for p in config.exemplars], functions)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    pairs, stats = build_pairs(exemplars, functions, config.pairs)
    if len({pair.function for pair in pairs}) < 2:
        raise DataError(f"{len(pairs)} pairs over {len({p.function for p in pairs})} function(s): contrasting "
                        "needs labelled utterances of at least two functions (exemplars with an 'utterance')")
    held_out = validation_groups({pair.group for pair in pairs}, config.validation, config.seed)
    model = load_embedder(config.embedder)
    print(f"{len(pairs)} pairs ({', '.join(f'{n} {k}' for k, n in stats.pairs.items())}) from {len(exemplars)} "
          f"exemplars; mining hard negatives with {config.embedder} ...", flush=True)
    descriptions = description_pool(functions)

    def pools(exclude: set[str]) -> dict[str, Pool]:
        return {"template": template_pool(exemplars, exclude), "description": descriptions}

    known: dict[str, np.ndarray] = {}  # every text is embedded once for both mining passes
    train_set = with_negatives(model, [p for p in pairs if p.group not in held_out], pools(held_out), stats, known)
    validation_set = with_negatives(model, [p for p in pairs if p.group in held_out], pools(set()), stats, known)
    if not train_set:
        raise DataError("no training pair has a hard negative: every other function's texts equal the positives")
    sample = random.Random(config.seed).sample(train_set, min(TRAIN_LOSS_SAMPLE, len(train_set)))
    mined_at = time.perf_counter()
    loss = MultipleNegativesRankingLoss(model)
    with tempfile.TemporaryDirectory(prefix="train-embedder-") as scratch:
        args = training_arguments(config, scratch)  # checked again by the trainer's own dataclass
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=_dataset(train_set), loss=loss)

        def losses() -> dict[str, float | None]:
            size = args.per_device_eval_batch_size
            return {"train_sample": pairs_loss(model, loss, sample, size, config.seed),
                    "validation": pairs_loss(model, loss, validation_set, size, config.seed)}

        before = losses()
        result = trainer.train()
        after = losses()
    summary = {
        "embedder": config.embedder, "output": str(output), "pairs": dict(stats.pairs),
        "train_pairs": len(train_set), "validation_pairs": len(validation_set),
        "validation_dialogues": len(held_out), "hard_negatives": len(train_set) + len(validation_set),
        "skipped": {"no_template": stats.no_template, "no_utterance": stats.no_utterance,
                    "no_negative": dict(stats.no_negative)},
        "loss_before": before, "loss_after": after, "steps": result.global_step,
        "train_loss": result.training_loss, "batch_size": args.per_device_train_batch_size,
        "mining_seconds": round(mined_at - started, 1), "seconds": round(time.perf_counter() - started, 1),
        "config": config.model_dump(mode="json"),
    }
    with staged_dir(output, may_replace=_is_ours) as staging:
        model.save(str(staging))
        write_json(staging / SUMMARY_FILE, summary)
    return summary


def describe(summary: dict[str, Any]) -> str:
    def loss(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    before, after = summary["loss_before"], summary["loss_after"]
    skipped = summary["skipped"]
    return "\n".join([
        (f"pairs: {summary['train_pairs']} train, {summary['validation_pairs']} validation "
         f"({summary['validation_dialogues']} held-out dialogues); built {summary['pairs']}"),
        (f"hard negatives mined: {summary['hard_negatives']} (one per pair; dropped without one: "
         f"{sum(skipped['no_negative'].values())}); utterances without a template: {skipped['no_template']}"),
        (f"loss (MultipleNegativesRanking) validation: {loss(before['validation'])} -> {loss(after['validation'])}; "
         f"train sample: {loss(before['train_sample'])} -> {loss(after['train_sample'])}"),
        (f"{summary['steps']} steps, batch {summary['batch_size']}, {summary['seconds']:.1f}s "
         f"(mining {summary['mining_seconds']:.1f}s) -> {summary['output']}"),
    ])
