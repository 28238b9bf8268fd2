"""`dialogtune prepare`: files -> dialogues -> examples -> tokens -> packed Arrow dataset.

    dialogtune prepare examples/sgd_respond.yaml
    dialogtune prepare dataset.txt --format transcript --as Bob --rounds 5 -o out/

The output directory holds `train/` and `validation/` (datasets.load_from_disk reads them; Arrow
shards of about 500 MB), `stats.json`, `rejects.jsonl` and `prepare.json` (config, tokenizer,
template and fingerprint). A second run with the same config, data and tokenizer is a cache hit.

Memory stays bounded whatever the size of the data: dialogues stream from the readers through the
task and the tokenizer (in `num_proc` processes) a batch at a time into an unpacked scratch file;
then each split is read back, packed `pack_buffer` examples at a time and written shard by shard.
Only each dialogue's split rank (8 bytes) and the counts are kept throughout.

The work happens in a staging directory beside the output (`.<output>-staging-*`), renamed into
place at the end: a killed run leaves one behind, and the next preparation of the same output
removes it once no other preparation of that output is running (`preparing`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

import dialogtune
from dialogtune.config import PrepareConfig
from dialogtune.dialogue import Dialogue, Reject
from dialogtune.errors import ConfigError, DataError, StrictError
from dialogtune.files import staged_dir, write_json
from dialogtune.models import load_tokenizer
from dialogtune.packing import int_lists, pack_stream
from dialogtune.readers import TOOL_CALL_FORMATS, detect_format, read_dialogues
from dialogtune.readers._io import no_gc
from dialogtune.records import PREPARED_FILE, PreparedInfo, TemplateInfo, TokenizerInfo
from dialogtune.split import group_rank, validation_cutoff
from dialogtune.tasks import Example
from dialogtune.tasks.respond import ALL_SPEAKERS, ToolCallStats, respond
from dialogtune.tasks.summarize import summarize
from dialogtune.tasks.understand import UnderstandPrompts, understand
from dialogtune.templates import ChatTemplate, resolve_template
from dialogtune.tokenize import IGNORE_INDEX, ExampleEncoder, Tokenized, TokenizeStats, token_counter

BATCH = 512  # examples tokenized together (in parallel, in Rust)
# Part of the fingerprint: raise it whenever what `prepare` writes changes, so old caches are redone.
OUTPUT_FORMAT = 4  # 2: rows carry turn_sessions; 3: and answered_messages; 4: and trained_messages, system_messages
UNUSED = "unused"  # a reject stage for records that are fine but hold nothing to learn (--strict ignores them)
_PARTICULARS = re.compile(r"'[^']*'|\"[^\"]*\"|\d+")
SPLITS = ("train", "validation")


@dataclass
class Prepared:
    directory: Path
    stats: dict[str, Any]
    cache_hit: bool


# -- fingerprint --------------------------------------------------------------------
def _data_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def fingerprint(config: PrepareConfig, tokenizer_id: str, template: ChatTemplate) -> str:
    digest = hashlib.sha256()
    # Only what preparing reads: a training job's other sections (learning rate, memory, run_dir)
    # must not make a new preparation of the same data.
    # num_proc: how many processes tokenize changes nothing that is written.
    prepare_keys = set(PrepareConfig.model_fields) - {"output", "strict", "num_proc"}
    settings = config.model_dump(mode="json", by_alias=True, include=prepare_keys)
    digest.update(json.dumps([dialogtune.__version__, OUTPUT_FORMAT, settings], sort_keys=True).encode())
    digest.update(tokenizer_id.encode())
    digest.update(json.dumps([template.name, template.source, template.end_of_turn]).encode())
    for file in _data_files(config.data.path):
        digest.update(str(file).encode())
        with open(file, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "blake2b").digest())
    if config.task.index:  # understand: the candidates in every prompt come from the index
        digest.update((Path(config.task.index) / "manifest.json").read_bytes())
    return digest.hexdigest()[:32]


def tokenizer_hash(tokenizer) -> str:
    """Identity of a tokenizer by what it does (vocabulary, merges, special tokens), not its name."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True).encode())
    return digest.hexdigest()[:32]


# -- reading and tasks --------------------------------------------------------------
def examples_of(dialogue: Dialogue, config: PrepareConfig, prompts: UnderstandPrompts | None = None,
                tool_stats: ToolCallStats | None = None) -> list[Example] | Reject:
    task = config.task
    if task.name == "summarize":
        return summarize(dialogue, task.instruction, task.system_prompt)
    rounds = None if task.context == "full" else task.context.rounds
    if task.name == "understand":
        return understand(dialogue, prompts, rounds)
    return respond(dialogue, set(task.speakers_as or ()), rounds, task.system_prompt, task.persona,
                   task.tool_calls, tool_stats)


def require_tool_calls(config: PrepareConfig) -> None:
    """`task.tool_calls` trains the calls behind `respond`'s turns: only some readers record them."""
    if not config.task.tool_calls:
        return
    if config.task.name != "respond":
        raise ConfigError(f"task.tool_calls belongs to the respond task, not {config.task.name}; remove it")
    others = [fmt for fmt in data_formats(config) if fmt not in TOOL_CALL_FORMATS]
    if others:
        raise ConfigError(f"task.tool_calls: only {', '.join(TOOL_CALL_FORMATS)} data records the service calls"
                          f" behind replies, and {', '.join(others)} data has none; remove task.tool_calls")


def understand_prompts(config: PrepareConfig, tokenizer) -> UnderstandPrompts | None:
    """The understand task's prompt builder over its index (None for other tasks)."""
    from dialogtune.retrieval.index import load_index

    if config.task.name != "understand":
        return None
    if not config.task.index:
        raise ConfigError("task.index is required for understand: the retrieval index that offers the candidate "
                          "functions (build one with `dialogtune index SCHEMAS --exemplars DATA -o DIR`)")
    return UnderstandPrompts(load_index(Path(config.task.index)), config.task.candidates, config.task.exemplars,
                             token_counter(tokenizer), config.max_length,
                             dialogue_services=config.task.dialogue_services)


def sampled(dialogue: Dialogue, share: float | None) -> bool:
    """Whether `data.sample` keeps this dialogue: a hash of its id, so the same dialogues are kept
    whatever the order or the files they come in."""
    if share is None:
        return True
    return int(hashlib.blake2b(dialogue.id.encode(), digest_size=8).hexdigest(), 16) < share * 2**64


def require_targets(config: PrepareConfig) -> None:
    """Without `as`, `respond` cannot know who the model is: say who could be."""
    if config.task.name != "respond" or config.task.speakers_as:
        return
    seen: Counter[str] = Counter()
    for path in config.data.path:
        for number, item in enumerate(read_dialogues(Path(path), config.data.format, **reader_options(config))):
            if isinstance(item, Dialogue):
                seen.update(t.speaker for t in item.turns if t.speaker)
            if number >= 1000:
                break
    listed = ", ".join(f"{name} ({count})" for name, count in seen.most_common(12))
    raise ConfigError(f"task.as (--as) is required for respond: who should the model speak as? Speakers: {listed}")


def reader_options(config: PrepareConfig) -> dict[str, Any]:
    return {"columns": config.data.columns.model_dump(), "speakers": config.data.speakers,
            "actions": config.data.actions}


# -- the job ------------------------------------------------------------------------
def prepare(config: PrepareConfig, *, force: bool = False, quiet: bool = False) -> Prepared:
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file; the output must be a directory")
    if out.exists() and not is_prepared_dataset(out):
        raise DataError(f"{out}: exists and is not a prepared dataset; choose another output directory")
    for path in config.data.path:
        if not Path(path).exists():
            raise DataError(f"{path}: no such file or directory")
    require_tool_calls(config)
    tokenizer = load_tokenizer(config.model.name)
    if config.task.name == "memory":  # turns as token pieces, no chat template
        from dialogtune.prepare_memory import TEMPLATE as template
    else:
        template = resolve_template(config.template.name, tokenizer, config.template.end_of_turn,
                                    tools=config.task.tool_calls)
    import datasets  # noqa: F401  (a second of imports, pandas included: not preparation work)

    started = time.perf_counter()  # preparation proper: loading libraries and the tokenizer is not part of it
    # Serialising the tokenizer to hash it takes about as long as tokenizing 256 dialogues: once.
    tokenizer_id = tokenizer_hash(tokenizer)
    key = fingerprint(config, tokenizer_id, template)
    previous = out / PREPARED_FILE
    cached = previous.exists() and (out / "stats.json").exists()
    if not force and cached and json.loads(previous.read_text()).get("fingerprint") == key:
        stats = json.loads((out / "stats.json").read_text())
        bad = [r for r in read_rejects(out) if r["stage"] != UNUSED] if config.strict else []
        if config.strict and stats.get("reader_notes"):
            raise StrictError(f"{stats['reader_notes'][0]} (stopped: --strict)")
        if bad:
            raise StrictError(f"{bad[0]['source']}:{bad[0]['line']}: {bad[0]['reason']} (stopped: --strict;"
                              f" {len(bad)} bad records in {out / 'rejects.jsonl'})")
        # A cache hit writes nothing, but a killed `--force` run may have left a staging directory:
        # removed if no preparation of `out` is running (a read-only place has none, and no lock).
        with contextlib.suppress(OSError), preparing(out, quiet=quiet):
            pass
        if not quiet:
            print(f"cache hit: {out} already holds this preparation (fingerprint {key}); nothing to do")
        print_warnings(stats)  # still true of the data: said again, not only the first time
        return Prepared(out, stats, True)
    if config.task.name == "memory":
        from dialogtune.prepare_memory import prepare_memory

        with preparing(out, quiet=quiet):
            stats, _ = prepare_memory(config, tokenizer, out, quiet=quiet, read_options=reader_options(config),
                                      sampled=lambda dialogue: sampled(dialogue, config.data.sample),
                                      manifest_of=lambda speakers: manifest(config, tokenizer, tokenizer_id,
                                                                            template, key, speakers))
        print_warnings(stats)
        return Prepared(out, stats, False)
    require_targets(config)
    prompts = understand_prompts(config, tokenizer)
    tool_stats = ToolCallStats()
    # Closed in reverse: the run's files (and the scratch copy of the corpus) are closed and gone on
    # every path before the staging directory is renamed into place or removed, then the lock.
    with (preparing(out, quiet=quiet), staged_dir(out, may_replace=is_prepared_dataset) as staging,
          contextlib.ExitStack() as run_files):
        # Pass 1, streamed: dialogues -> examples -> tokens, written unpacked to a scratch file;
        # pass 2: each split read back, packed a buffer at a time and written in shards.
        scratch = staging / EXAMPLES_FILE
        run_files.callback(scratch.unlink, missing_ok=True)  # a whole tokenized copy of the corpus: never kept
        reading = Reading(config, run_files.enter_context(RejectLog(staging / "rejects.jsonl", config.strict)))
        tok_stats = TokenizeStats()
        # Listed after the readers' ones.
        tok_rejects = run_files.enter_context(RejectLog(staging / TOKENIZE_REJECTS_FILE, strict=False))
        first_bad: Reject | None = None  # --strict stops at it once reading is done, as the readers' come first
        ranks: list[np.ndarray] = []  # each tokenized group's rank: the split, decided once all are known
        bar = tqdm(desc="prepare", unit=" dialogues", disable=quiet or None, dynamic_ncols=True)
        try:
            # closing: a failure midway stops the readers (their open file) and the tokenizing
            # workers now, not when the traceback is freed.
            batches = run_files.enter_context(contextlib.closing(reading.example_batches(prompts, tool_stats, bar)))
            tables = run_files.enter_context(contextlib.closing(encoded_tables(batches, tokenizer, template, config)))
            # The file opened here, not by new_stream: a writer closes the files it is given, not
            # one it opens from a path (that stays open as long as the writer object lives).
            with no_gc(), pa.OSFile(str(scratch), "wb") as sink, pa.ipc.new_stream(sink, EXAMPLES_SCHEMA) as writer:
                for table, stats in tables:
                    for reject in stats.rejects:
                        tok_rejects.add(reject)
                        if first_bad is None and reject.stage != UNUSED:
                            first_bad = reject
                    stats.rejects.clear()  # in the log: only the counts are kept
                    tok_stats.merge(stats)
                    writer.write_table(table)
                    ranks.append(np.unique(table.column("group_rank").to_numpy()))
        finally:
            bar.close()
        tok_rejects.close()
        if config.strict and first_bad is not None:
            raise StrictError(f"{first_bad} (stopped: --strict)")
        rejects = reading.rejects
        rejects.append(tok_rejects)
        rejects.close()
        groups = np.unique(np.concatenate(ranks)) if ranks else np.zeros(0, np.uint64)
        if not len(groups):
            raise DataError(no_examples_message(config, reading.dialogues, reading.speakers,
                                                [r["reason"] for r in read_rejects(staging)]))
        cutoff = validation_cutoff(groups, config.split.validation)
        held_out = int(np.count_nonzero(groups <= cutoff)) if cutoff is not None else 0
        warnings = list(reading.notes)
        if config.split.validation > 0 and not held_out:
            warnings.append(no_split_warning(len(groups), data_formats(config)))
        speakers = reading.speakers
        if config.task.name == "respond" and ALL_SPEAKERS not in (config.task.speakers_as or []):
            absent = [name for name in config.task.speakers_as or [] if name not in speakers]
            if absent:
                warnings.append(f"speaker {', '.join(map(repr, absent))} never occurs (speakers: "
                                + ", ".join(name for name, _ in speakers.most_common(12)) + ")")
        split_stats = {}
        with datasets_bars(shown=not quiet):
            for split in SPLITS:
                with contextlib.closing(split_examples(scratch, cutoff, split)) as examples:  # closes the scratch
                    split_stats[split] = write_split(staging / split, examples, config, f"{key}-{split}")
        split_stats["train"]["dialogues"] = len(groups) - held_out
        split_stats["validation"]["dialogues"] = held_out
        elapsed = time.perf_counter() - started
        stats = summary(reading.dialogues, speakers, rejects, tok_stats, split_stats, elapsed)
        if config.data.sample is not None:
            stats["sampled_out"] = reading.sampled_out  # dialogues data.sample left out (not rejects: by choice)
        if prompts is not None:
            stats["understand"] = {"turns": prompts.stats.turns,
                                   "gold_not_retrieved": prompts.stats.gold_not_retrieved,
                                   "second_calls_not_trained": prompts.stats.second_calls,
                                   "dropped_for_length": dict(prompts.stats.dropped)}
            if prompts.stats.gold_not_retrieved:
                warnings.append(f"the index did not offer the gold function for {prompts.stats.gold_not_retrieved} of "
                                f"{prompts.stats.turns} turns: they are trained to answer 'none' (raise task.candidates"
                                " or fine-tune the embedder; `dialogtune findk` measures the recall)")
        if config.task.tool_calls:  # calls written, and the results their tool messages left out
            stats["tool_calls"] = tool_stats.as_dict()
            if not tool_stats.calls:
                warnings.append(f"task.tool_calls: no turn by {', '.join(config.task.speakers_as or [])} made a"
                                " service call (SGD's calls are the SYSTEM side's)")
        stats["warnings"] = warnings
        stats["reader_notes"] = reading.notes  # kept apart: --strict refuses them on a cache hit too
        write_json(staging / "stats.json", stats)
        manifest(config, tokenizer, tokenizer_id, template, key, speakers).save(staging)
    if not quiet:
        print(summary_line(out, stats))
    print_warnings(stats)
    return Prepared(out, stats, False)


class RejectLog:
    """rejects.jsonl written as rejects come (nothing kept in memory but the counts by reason);
    with `strict`, a bad record stops the preparation instead."""

    def __init__(self, path: Path, strict: bool):
        self.path = path
        self.strict = strict
        self.count = 0
        self.by_reason: Counter[str] = Counter()
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115  (closed by close() or on leaving `with`)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, reject: Reject) -> None:
        if self.strict and reject.stage != UNUSED:
            raise StrictError(f"{reject} (stopped: --strict)")
        self._file.write(json.dumps(reject.as_dict(), ensure_ascii=False) + "\n")
        self.count += 1
        self.by_reason[f"{reject.stage}: {reason_kind(reject.reason)}"] += 1

    def append(self, other: RejectLog) -> None:
        """Add a closed log's records after this one's (its file copied as written, then removed)
        and its counts."""
        with open(other.path, encoding="utf-8") as fh:
            shutil.copyfileobj(fh, self._file)
        other.path.unlink()
        self.count += other.count
        self.by_reason.update(other.by_reason)

    def close(self) -> None:
        self._file.close()


class Reading:
    """Pass 1's first half: dialogues from the readers through the task into batches of
    examples, counting as it goes (dialogues, speakers, readers' notes, rejects)."""

    def __init__(self, config: PrepareConfig, rejects: RejectLog):
        self.config = config
        self.rejects = rejects
        self.dialogues = 0
        self.sampled_out = 0
        self.speakers: Counter[str] = Counter()
        self.notes: list[str] = []  # what readers noticed about whole files (mostly narration, say)

    def example_batches(self, prompts: UnderstandPrompts | None, tool_stats: ToolCallStats,
                        bar) -> Iterator[list[Example]]:
        config = self.config
        pending: list[Example] = []
        for path in config.data.path:
            # closing: a stop midway (--strict, an error downstream) closes the file now, not when
            # the traceback that holds this frame is freed.
            with contextlib.closing(read_dialogues(Path(path), config.data.format, notes=self.notes,
                                                   **reader_options(config))) as items:
                for item in items:
                    if isinstance(item, Reject):
                        self.rejects.add(item)
                        continue
                    if not sampled(item, config.data.sample):
                        self.sampled_out += 1
                        continue
                    self.dialogues += 1
                    bar.update()
                    self.speakers.update(t.speaker for t in item.turns if t.speaker)
                    made = examples_of(item, config, prompts, tool_stats)
                    if isinstance(made, Reject):
                        self.rejects.add(made)
                        continue
                    pending.extend(made)
                    if len(pending) >= BATCH:
                        yield pending
                        pending = []
            if config.strict and self.notes:
                raise StrictError(f"{self.notes[0]} (stopped: --strict)")
        if pending:
            yield pending


# -- tokenizing, in this process or in `num_proc` worker processes --------------------
def encoded_tables(batches: Iterator[list[Example]], tokenizer, template: ChatTemplate,
                   config: PrepareConfig) -> Iterator[tuple[pa.Table, TokenizeStats]]:
    """Each batch of examples as an examples table (EXAMPLES_SCHEMA) and its tokenizing stats, in
    the order the batches come: the same tables whatever `num_proc`."""
    if config.num_proc > 1:
        yield from _encoded_in_processes(batches, tokenizer, template, config)
        return
    encoder = ExampleEncoder(tokenizer, template, config.max_length)
    # Tokenizing runs in a worker thread (Rust, no GIL) while this thread labels the previous
    # batch and reads and renders the next.
    worker = ThreadPoolExecutor(max_workers=1)
    in_flight: deque[tuple[list[Example], list, Future, TokenizeStats]] = deque()

    def labelled() -> tuple[pa.Table, TokenizeStats]:
        kept, rendered, future, stats = in_flight.popleft()
        return examples_table(list(encoder.label(kept, rendered, future.result(), stats)), config.split.seed), stats

    try:
        for batch in batches:
            stats = TokenizeStats()
            kept, rendered = encoder.render_batch(batch, stats)
            in_flight.append((kept, rendered, worker.submit(encoder.tokenize, rendered), stats))
            if len(in_flight) > 1:  # label the previous batch while the worker tokenizes this one
                yield labelled()
        while in_flight:
            yield labelled()
    finally:
        worker.shutdown(cancel_futures=True)


_WORKER: tuple[ExampleEncoder, int] | None = None  # a worker process's encoder and split seed


def _start_worker(tokenizer, template: ChatTemplate, max_length: int, seed: int) -> None:
    global _WORKER
    # Each process is one core's share: the Rust tokenizer's own threads would only contend.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked with terminated_as_exit's: the main process cleans up
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (ExampleEncoder(tokenizer, template, max_length), seed)


def _encode_in_worker(examples: list[Example]) -> tuple[pa.Table, TokenizeStats]:
    encoder, seed = _WORKER
    stats = TokenizeStats()
    return examples_table(list(encoder.encode(examples, stats)), seed), stats


def _encoded_in_processes(batches: Iterator[list[Example]], tokenizer, template: ChatTemplate,
                          config: PrepareConfig) -> Iterator[tuple[pa.Table, TokenizeStats]]:
    # Reading and the tasks stay here (they keep the counts); workers render, tokenize and label.
    # At most two batches a worker are in flight, so memory stays bounded however fast reading is.
    # fork: a worker starts in milliseconds with the tokenizer already loaded (spawn re-imports
    # transformers in each, seconds).
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(config.num_proc, mp_context=context, initializer=_start_worker,
                               initargs=(tokenizer, template, config.max_length, config.split.seed))
    in_flight: deque[Future] = deque()
    try:
        for batch in batches:
            in_flight.append(pool.submit(_encode_in_worker, batch))
            if len(in_flight) >= 2 * config.num_proc:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


# -- the examples table: one row per tokenized example, what packing concatenates -------
EXAMPLES_FILE = ".examples.arrow"  # pass 1's scratch file, inside the staging directory
TOKENIZE_REJECTS_FILE = ".tokenize-rejects.jsonl"
_INTS, _TEXTS = pa.list_(pa.int32()), pa.list_(pa.string())
EXAMPLES_SCHEMA = pa.schema([
    ("input_ids", _INTS), ("labels", _INTS),
    ("dialogue_ids", _TEXTS),
    # The session of each trained turn, in order (-1 where the data has none): per-session perplexity.
    ("turn_sessions", _INTS),
    # The message each trained turn answers, in order: what `dialogtune train` shows its sample replies to.
    ("answered_messages", _TEXTS),
    # Each trained message's text as the data had it, in order: evaluation's references, the same
    # whatever a model's tokenizer makes of them (T5 and lowercasing tokenizers do not decode it back).
    ("trained_messages", _TEXTS),
    # The example's system message ("" for none): the head evaluation keeps when it cuts a long context.
    ("system_messages", _TEXTS),
    ("group_rank", pa.uint64()),  # the split's rank of the example's group (split.group_rank); not written out
])


def examples_table(items: list[Tokenized], seed: int) -> pa.Table:
    messages = [t.example.messages for t in items]
    return pa.table([
        int_lists([t.input_ids for t in items]), int_lists([t.labels for t in items]),
        pa.array([[t.example.dialogue_id] for t in items], _TEXTS),
        pa.array([[m.get("session", -1) for m in ms if m["train"]] for ms in messages], _INTS),
        pa.array([answered_messages(ms) for ms in messages], _TEXTS),
        pa.array([[m["content"] or "" for m in ms if m["train"]] for ms in messages], _TEXTS),
        pa.array([[system_message(ms)] for ms in messages], _TEXTS),
        pa.array([group_rank(seed, t.example.group) for t in items], pa.uint64()),
    ], schema=EXAMPLES_SCHEMA)


def split_examples(scratch: Path, cutoff: int | None, split: str) -> Iterator[pa.Table]:
    """The examples of one split from the scratch file, a batch at a time, in their original order.
    A group is held out for validation when its rank is at most `cutoff` (None: none is)."""
    if cutoff is None and split == "validation":
        return
    with pa.OSFile(str(scratch)) as source, pa.ipc.open_stream(source) as reader:
        for batch in reader:
            table = pa.Table.from_batches([batch])
            if cutoff is not None:
                held_out = pc.less_equal(table.column("group_rank"), pa.scalar(cutoff, pa.uint64()))
                table = table.filter(held_out if split == "validation" else pc.invert(held_out))
            if table.num_rows:
                yield table.drop_columns(["group_rank"])


# -- writing a split: packed a buffer at a time, in shards ------------------------------
SHARD_BYTES = 500 * 2**20  # a new shard file after this much Arrow data (datasets' own default size)
WRITE_ROWS = 1000  # packed rows handed to the Arrow writer at a time (datasets' own batch size)


def write_split(directory: Path, examples: Iterator[pa.Table], config: PrepareConfig, fingerprint: str) -> dict[str, Any]:
    """Pack and write one split; its counts (without `dialogues`, which the caller knows). An
    empty split is not written: datasets cannot load a dataset with no rows back."""
    counts = Counter()

    def counted(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
        for table in tables:
            labels = pc.list_flatten(table.column("labels"))
            counts["rows"] += table.num_rows
            counts["examples"] += pc.sum(pc.list_value_length(table.column("system_messages"))).as_py() or 0
            counts["tokens"] += len(labels)
            counts["trained_tokens"] += pc.sum(pc.not_equal(labels, IGNORE_INDEX).cast(pa.int64())).as_py() or 0
            yield table
            # Arrow's allocator (mimalloc) keeps what a buffer freed: measured, peak RSS then grew
            # by about 10 MB a buffer of 2,000 SGD examples; handed back, it stays flat.
            pa.default_memory_pool().release_unused()

    write_shards(directory, counted(pack_stream(examples, config.max_length, config.pack_buffer, config.pack)),
                 fingerprint, SHARD_BYTES)
    tokens, capacity = counts["tokens"], counts["rows"] * config.max_length
    return {
        "examples": counts["examples"],
        "rows": counts["rows"],
        "tokens": tokens,
        "trained_tokens": counts["trained_tokens"],
        "padding_fraction": round(1 - tokens / capacity, 4) if capacity else 0.0,
        "packing_efficiency": round(tokens / capacity, 4) if capacity and config.pack else None,
    }


def write_shards(directory: Path, tables: Iterator[pa.Table], fingerprint: str, shard_bytes: int) -> None:
    """Write `tables` as a dataset `datasets.load_from_disk` reads: Arrow shards of about
    `shard_bytes` each (data-00000-of-0000N.arrow, written by datasets' ArrowWriter as they come),
    then the state.json and dataset_info.json `Dataset.save_to_disk` writes."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils.py_utils import asdict  # datasets' own (drops unset fields), as save_to_disk uses

    parts: list[Path] = []
    writer, size, features = None, 0, None
    try:
        for table in tables:
            if writer is None:
                if features is None:
                    directory.mkdir(parents=True)
                    features = datasets.Features.from_arrow_schema(table.schema)
                parts.append(directory / f"data-{len(parts):05d}.partial")
                writer = ArrowWriter(features=features, path=str(parts[-1]))
            for batch in table.to_batches(max_chunksize=WRITE_ROWS):  # the writer copies what it is given
                writer.write_table(pa.Table.from_batches([batch]))
            # A shard closes once it passes shard_bytes: it can exceed them by one table (a packed buffer).
            size += table.nbytes
            if size >= shard_bytes:
                writer.finalize()
                writer.close()
                writer, size = None, 0
        if writer is not None:
            writer.finalize()
    finally:
        if writer is not None:  # on any path: a failed split leaves no open file (its .partial goes with the staging)
            writer.close()
    if not parts:
        return
    names = [f"data-{index:05d}-of-{len(parts):05d}.arrow" for index in range(len(parts))]
    for part, name in zip(parts, names, strict=True):
        part.rename(directory / name)
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": fingerprint,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (directory / datasets.config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(datasets.DatasetInfo(features=features))
    (directory / datasets.config.DATASET_INFO_FILENAME).write_text(json.dumps(dict(sorted(info.items())), indent=2))


@contextlib.contextmanager
def datasets_bars(shown: bool) -> Iterator[None]:
    """datasets draws a bar per split it saves: noise inside eval or train, which prepare quietly."""
    import datasets

    hidden_before = datasets.are_progress_bars_disabled()
    if not shown:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not hidden_before:
            datasets.enable_progress_bars()


def print_warnings(stats: dict[str, Any]) -> None:
    for warning in stats.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


def answered_messages(messages: list[dict[str, Any]]) -> list[str]:
    """For each trained message, the content of the message before it ("" after a system prompt or none)."""
    return [(messages[k - 1]["content"] or "") if k and messages[k - 1]["role"] != "system" else ""
            for k, m in enumerate(messages) if m["train"]]


def system_message(messages: list[dict[str, Any]]) -> str:
    """The text of the system message an example opens with ("" for none; tasks write at most one)."""
    return (messages[0]["content"] or "") if messages and messages[0]["role"] == "system" else ""


def summary(dialogues: int, speakers: Counter, rejects: RejectLog, tok_stats: TokenizeStats,
            split_stats: dict[str, dict], elapsed: float) -> dict[str, Any]:
    tokens = sum(s["tokens"] for s in split_stats.values())
    return {
        "dialogues_read": dialogues,
        "rejected": rejects.count,
        "rejected_by_reason": dict(rejects.by_reason.most_common()),
        "examples": sum(s["examples"] for s in split_stats.values()),
        "tokens": tokens,
        "trained_tokens": sum(s["trained_tokens"] for s in split_stats.values()),
        "truncated": {
            "examples_split": tok_stats.examples_split,
            "context_truncated": tok_stats.context_truncated,
            "turns_too_long": tok_stats.turns_too_long,
        },
        "splits": split_stats,
        "speakers": dict(speakers.most_common(50)),
        "seconds": round(elapsed, 3),
        "dialogues_per_s": round(dialogues / elapsed, 1),
        "tokens_per_s": round(tokens / elapsed, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def manifest(config: PrepareConfig, tokenizer, tokenizer_id: str, template: ChatTemplate, key: str,
             speakers: Counter) -> PreparedInfo:
    """What training and inference need to reproduce this preparation exactly."""
    pad = tokenizer.pad_token_id
    pad_note = None
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        pad_note = ("the tokenizer has no pad token; padding uses id "
                    f"{pad}, which is never learned from (labels come from message spans, not token ids)")
    targets = config.task.speakers_as or (["assistant"] if config.task.name in ("summarize", "understand") else [])
    stops = [template.end_of_turn]
    if template.name == "transcript":
        stops += [f"\n{name}:" for name in speakers if name not in targets]
    return PreparedInfo(
        fingerprint=key, dialogtune_version=dialogtune.__version__,
        config=config.model_dump(mode="json", by_alias=True), model=config.model.name,
        tokenizer=TokenizerInfo(name_or_path=tokenizer.name_or_path, hash=tokenizer_id, vocab_size=len(tokenizer),
                                pad_token_id=pad, pad_note=pad_note, eos_token=tokenizer.eos_token),
        template=TemplateInfo(name=template.name, source=template.source, end_of_turn=template.end_of_turn),
        task=config.task.name, speakers_as=targets, stop_strings=stops, max_length=config.max_length,
        pack=config.pack)


def reason_kind(reason: str) -> str:
    """A reason with its particulars (names, numbers, quoted text) blanked, for counting."""
    return _PARTICULARS.sub("…", reason.split(": ")[0] if reason.startswith("message ") else reason)


def read_rejects(directory: Path) -> list[dict]:
    path = directory / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def no_examples_message(config: PrepareConfig, dialogues: int, speakers: Counter, reasons: list[str]) -> str:
    """Why nothing can be trained; `reasons`: every reject's reason."""
    if dialogues == 0:
        common = Counter(reasons).most_common(3)
        return (f"no dialogues could be read ({len(reasons)} rejected; most common: "
                + "; ".join(f"{reason} ({n})" for reason, n in common) + ")")
    if config.task.name == "respond" and ALL_SPEAKERS not in (config.task.speakers_as or []):
        missing = [s for s in config.task.speakers_as or [] if s not in speakers]
        if missing:
            listed = ", ".join(f"{name} ({count})" for name, count in speakers.most_common(12))
            return (f"speaker {', '.join(map(repr, missing))} never occurs in {dialogues} dialogues;"
                    f" speakers that do: {listed or 'none'}")
    common = Counter(reasons).most_common(3)
    return (f"no training examples from {dialogues} dialogues ({len(reasons)} rejected; most common: "
            + "; ".join(f"{reason} ({n})" for reason, n in common) + ")")


# How each format divides a file into dialogues, for when there are too few to split.
SPLIT_HINTS = {
    "script_csv": "a script CSV is one dialogue per episode, and the whole file is one when it has no episode"
                  " or scene column: name it with data.columns.episode",
    "transcript": "a transcript is one dialogue per scene, and only blank lines and `---` lines end a scene",
}


def data_formats(config: PrepareConfig) -> list[str]:
    if config.data.format != "auto":
        return [config.data.format]
    return list(dict.fromkeys(detect_format(Path(path)) for path in config.data.path))


def no_split_warning(dialogues: int, formats: list[str]) -> str:
    hints = [SPLIT_HINTS[fmt] for fmt in formats if fmt in SPLIT_HINTS]
    return (f"no validation split: the examples come from {dialogues} dialogue(s), and a split needs at least two"
            + "".join(f" ({hint})" for hint in hints) + "; add dialogues, or set split.validation: 0")


def summary_line(out: Path, stats: dict[str, Any]) -> str:
    train, val = stats["splits"]["train"], stats["splits"]["validation"]
    truncated = stats["truncated"]
    return (
        f"prepared {stats['dialogues_read']} dialogues -> {train['examples']} train / {val['examples']} validation"
        f" examples ({train['rows']} / {val['rows']} rows), {stats['tokens']} tokens, {stats['trained_tokens']}"
        f" trained; {stats['rejected']} rejected, {truncated['turns_too_long']} turns too long,"
        f" {truncated['context_truncated']} with context cut; padding {train['padding_fraction']:.1%};"
        f" {stats['seconds']:.2f}s ({stats['dialogues_per_s']:.0f} dialogues/s, {stats['tokens_per_s']:.0f} tokens/s),"
        f" peak RSS {stats['peak_rss_mb']:.0f} MB -> {out}"
        + (f"\n  see {out / 'rejects.jsonl'}" if stats["rejected"] else "")
    )


def is_prepared_dataset(directory: Path) -> bool:
    """Whether `directory` may be replaced by a new preparation: empty, or one of ours."""
    return not any(directory.iterdir()) or (directory / PREPARED_FILE).exists()



# -- the output's staging directories: one per run, and what killed runs leave --------
@contextlib.contextmanager
def preparing(out: Path, *, quiet: bool = False) -> Iterator[list[Path]]:
    """Held while a preparation writes `out`; first removes the staging directories that killed
    preparations of `out` left (each can hold a whole tokenized copy of the corpus). Yields those
    removed.

    Which are stale is decided by a lock, not by guessing from pids or ages: every preparation of
    `out` holds a shared flock on `.<name>.lock` beside it for as long as it runs, and the lock
    goes with the process however it ends (SIGKILL included). A preparation that can take the lock
    exclusively knows that no other is running, so every staging directory of `out` is stale; one
    that cannot (another preparation of `out` is under way, this user's or another's) removes
    nothing and leaves the cleaning to a later run. The lock file stays (a few bytes: removing it
    would let two runs lock different files)."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".{out.name}.lock"
    try:  # read-write where we may; another user's lock file, read-only, locks as well (flock on Linux)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as lock, terminated_as_exit():
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            removed = []
        else:
            removed = remove_stale_staging(out, parent)
        fcntl.flock(lock, fcntl.LOCK_SH)  # from exclusive, or waiting out another run's cleaning
        if removed and not quiet:
            print(f"removed {len(removed)} staging director{'y' if len(removed) == 1 else 'ies'} that stopped"
                  f" preparations of {out} left: {', '.join(p.name for p in removed)}", file=sys.stderr)
        yield removed


def remove_stale_staging(out: Path, parent: Path) -> list[Path]:
    """Remove `out`'s staging directories (staged_dir's `.<name>-staging-XXXXXXXX`; the caller
    knows no preparation of `out` is running). Those that cannot be removed (another user's) stay."""
    pattern = re.compile(rf"\.{re.escape(out.name)}-staging-[a-z0-9_]{{8}}")  # mkdtemp's 8 characters
    removed = []
    for entry in sorted(parent.iterdir()):
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


@contextlib.contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, `kill`) raises SystemExit(143) in here, so the staging
    directory and its scratch copy of the corpus are removed on the way out, as on any error,
    rather than left for the next run. Only where SIGTERM would otherwise end the process
    outright: a handler someone set (training's stop at the end of a step) is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
