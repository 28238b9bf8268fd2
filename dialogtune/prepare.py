"""`dialogtune prepare`: files -> dialogues -> examples -> tokens -> packed Arrow dataset.

    dialogtune prepare examples/sgd_respond.yaml
    dialogtune prepare dataset.txt --format transcript --as Bob --rounds 5 -o out/

The output directory holds `train/` and `validation/` (datasets.save_to_disk), `stats.json`,
`rejects.jsonl` and `prepare.json` (config, tokenizer, template and fingerprint). A second run
with the same config, data and tokenizer is a cache hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import dialogtune
from dialogtune.config import PrepareConfig
from dialogtune.dialogue import Dialogue, Reject
from dialogtune.errors import ConfigError, DataError, StrictError
from dialogtune.files import staged_dir, write_json
from dialogtune.models import load_tokenizer
from dialogtune.packing import one_per_row, pack_best_fit, rows_to_table
from dialogtune.readers import TOOL_CALL_FORMATS, detect_format, read_dialogues
from dialogtune.readers._io import no_gc
from dialogtune.records import PREPARED_FILE, PreparedInfo, TemplateInfo, TokenizerInfo
from dialogtune.split import validation_groups
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
    prepare_keys = set(PrepareConfig.model_fields) - {"output", "strict"}
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
        if not quiet:
            print(f"cache hit: {out} already holds this preparation (fingerprint {key}); nothing to do")
        print_warnings(stats)  # still true of the data: said again, not only the first time
        return Prepared(out, stats, True)
    if config.task.name == "memory":
        from dialogtune.prepare_memory import prepare_memory

        stats, _ = prepare_memory(config, tokenizer, out, quiet=quiet, read_options=reader_options(config),
                                  sampled=lambda dialogue: sampled(dialogue, config.data.sample),
                                  manifest_of=lambda speakers: manifest(config, tokenizer, tokenizer_id, template,
                                                                        key, speakers))
        print_warnings(stats)
        return Prepared(out, stats, False)
    require_targets(config)
    prompts = understand_prompts(config, tokenizer)
    tool_stats = ToolCallStats()
    encoder = ExampleEncoder(tokenizer, template, config.max_length)
    tok_stats = TokenizeStats()
    rejects: list[Reject] = []
    speakers: Counter[str] = Counter()
    tokenized: list[Tokenized] = []
    dialogues = 0
    sampled_out = 0
    pending: list[Example] = []
    notes: list[str] = []  # what readers noticed about whole files (mostly narration, say)

    def note_reject(reject: Reject) -> None:
        if config.strict and reject.stage != UNUSED:
            raise StrictError(f"{reject} (stopped: --strict)")
        rejects.append(reject)

    # Tokenizing runs in a worker thread (Rust, no GIL) while this thread labels the previous
    # batch and reads and renders the next.
    worker = ThreadPoolExecutor(max_workers=1)
    in_flight: list[tuple[list[Example], list, Future]] = []

    def collect(keep: int = 0) -> None:
        while len(in_flight) > keep:
            batch, rendered, future = in_flight.pop(0)
            tokenized.extend(encoder.label(batch, rendered, future.result(), tok_stats))

    def flush() -> None:
        kept, rendered = encoder.render_batch(pending, tok_stats)
        in_flight.append((kept, rendered, worker.submit(encoder.tokenize, rendered)))
        pending.clear()
        collect(keep=1)  # label the previous batch while the worker tokenizes this one

    bar = tqdm(desc="prepare", unit=" dialogues", disable=quiet or None, dynamic_ncols=True)
    try:
        with no_gc():
            for path in config.data.path:
                for item in read_dialogues(Path(path), config.data.format, notes=notes, **reader_options(config)):
                    if isinstance(item, Reject):
                        note_reject(item)
                        continue
                    if not sampled(item, config.data.sample):
                        sampled_out += 1
                        continue
                    dialogues += 1
                    bar.update()
                    speakers.update(t.speaker for t in item.turns if t.speaker)
                    made = examples_of(item, config, prompts, tool_stats)
                    if isinstance(made, Reject):
                        note_reject(made)
                        continue
                    pending.extend(made)
                    if len(pending) >= BATCH:
                        flush()
                if config.strict and notes:
                    raise StrictError(f"{notes[0]} (stopped: --strict)")
            flush()
            collect()
    finally:
        worker.shutdown(cancel_futures=True)
        bar.close()
    for reject in tok_stats.rejects:
        note_reject(reject)
    if not tokenized:
        raise DataError(no_examples_message(config, dialogues, speakers, rejects))

    groups = {t.example.group for t in tokenized}
    held_out = validation_groups(groups, config.split.validation, config.split.seed)
    warnings = list(notes)
    if config.split.validation > 0 and not held_out:
        warnings.append(no_split_warning(len(groups), data_formats(config)))
    if config.task.name == "respond" and ALL_SPEAKERS not in (config.task.speakers_as or []):
        absent = [name for name in config.task.speakers_as or [] if name not in speakers]
        if absent:
            warnings.append(f"speaker {', '.join(map(repr, absent))} never occurs (speakers: "
                            + ", ".join(name for name, _ in speakers.most_common(12)) + ")")
    parts = {split: [t for t in tokenized if (t.example.group in held_out) == (split == "validation")]
             for split in SPLITS}
    with staged_dir(out, may_replace=is_prepared_dataset) as staging:
        with datasets_bars(shown=not quiet):
            split_stats = {split: write_split(staging / split, items, config, f"{key}-{split}")
                           for split, items in parts.items()}
        elapsed = time.perf_counter() - started
        stats = summary(config, dialogues, speakers, rejects, tok_stats, split_stats, elapsed)
        if config.data.sample is not None:
            stats["sampled_out"] = sampled_out  # dialogues data.sample left out (not rejects: by choice)
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
        stats["reader_notes"] = notes  # kept apart: --strict refuses them on a cache hit too
        write_json(staging / "stats.json", stats)
        write_rejects(staging, rejects)
        manifest(config, tokenizer, tokenizer_id, template, key, speakers).save(staging)
    if not quiet:
        print(summary_line(out, stats))
    print_warnings(stats)
    return Prepared(out, stats, False)


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


def write_split(directory: Path, items: list[Tokenized], config: PrepareConfig, fingerprint: str) -> dict[str, Any]:
    import datasets
    import pyarrow as pa

    ids = [t.input_ids for t in items]
    labels = [t.labels for t in items]
    lengths = [len(x) for x in ids]
    rows = pack_best_fit(lengths, config.max_length) if config.pack else one_per_row(lengths)
    table = rows_to_table(ids, labels, rows)
    names = [[items[i].example.dialogue_id for i in row] for row in rows]
    # The session of each trained turn, in order (-1 where the data has none): per-session perplexity.
    sessions = [[m.get("session", -1) for i in row for m in items[i].example.messages if m["train"]] for row in rows]
    table = table.append_column("dialogue_ids", pa.array(names, type=pa.list_(pa.string())))
    table = table.append_column("turn_sessions", pa.array(sessions, type=pa.list_(pa.int32())))
    # The message each trained turn answers, in order: what `dialogtune train` shows its sample replies to.
    answered = [[text for i in row for text in answered_messages(items[i].example.messages)] for row in rows]
    table = table.append_column("answered_messages", pa.array(answered, type=pa.list_(pa.string())))
    # Each trained message's text as the data had it, in order: evaluation's references, the same
    # whatever a model's tokenizer makes of them (T5 and lowercasing tokenizers do not decode it back).
    references = [[m["content"] or "" for i in row for m in items[i].example.messages if m["train"]] for row in rows]
    table = table.append_column("trained_messages", pa.array(references, type=pa.list_(pa.string())))
    # Each example's system message ("" for none): the head evaluation keeps when it cuts a long context.
    systems = [[system_message(items[i].example.messages) for i in row] for row in rows]
    table = table.append_column("system_messages", pa.array(systems, type=pa.list_(pa.string())))
    # An empty split (validation: 0) is not written: datasets cannot load a table with no rows back.
    if table.num_rows:
        # Named by the preparation's own fingerprint: datasets would otherwise hash the table (7 ms).
        datasets.Dataset(table, fingerprint=fingerprint).save_to_disk(str(directory))
    tokens = int(sum(lengths))
    trained = int(sum(int(np.count_nonzero(x != IGNORE_INDEX)) for x in labels))
    capacity = len(rows) * config.max_length
    return {
        "examples": len(items),
        "rows": len(rows),
        "tokens": tokens,
        "trained_tokens": trained,
        "padding_fraction": round(1 - tokens / capacity, 4) if capacity else 0.0,
        "packing_efficiency": round(tokens / capacity, 4) if capacity and config.pack else None,
        "dialogues": len({t.example.group for t in items}),
    }


def answered_messages(messages: list[dict[str, Any]]) -> list[str]:
    """For each trained message, the content of the message before it ("" after a system prompt or none)."""
    return [(messages[k - 1]["content"] or "") if k and messages[k - 1]["role"] != "system" else ""
            for k, m in enumerate(messages) if m["train"]]


def system_message(messages: list[dict[str, Any]]) -> str:
    """The text of the system message an example opens with ("" for none; tasks write at most one)."""
    return (messages[0]["content"] or "") if messages and messages[0]["role"] == "system" else ""


def summary(config, dialogues, speakers, rejects, tok_stats: TokenizeStats, split_stats, elapsed) -> dict[str, Any]:
    tokens = sum(s["tokens"] for s in split_stats.values())
    by_reason = Counter(f"{r.stage}: {reason_kind(r.reason)}" for r in rejects)
    return {
        "dialogues_read": dialogues,
        "rejected": len(rejects),
        "rejected_by_reason": dict(by_reason.most_common()),
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


def write_rejects(directory: Path, rejects: list[Reject]) -> None:
    """rejects.jsonl: every record not used or cut, one JSON object a line (read_rejects)."""
    with open(directory / "rejects.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(reject.as_dict(), ensure_ascii=False) + "\n" for reject in rejects)


def read_rejects(directory: Path) -> list[dict]:
    path = directory / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def no_examples_message(config: PrepareConfig, dialogues: int, speakers: Counter, rejects: list[Reject]) -> str:
    if dialogues == 0:
        reasons = Counter(r.reason for r in rejects).most_common(3)
        return (f"no dialogues could be read ({len(rejects)} rejected; most common: "
                + "; ".join(f"{reason} ({n})" for reason, n in reasons) + ")")
    if config.task.name == "respond" and ALL_SPEAKERS not in (config.task.speakers_as or []):
        missing = [s for s in config.task.speakers_as or [] if s not in speakers]
        if missing:
            listed = ", ".join(f"{name} ({count})" for name, count in speakers.most_common(12))
            return (f"speaker {', '.join(map(repr, missing))} never occurs in {dialogues} dialogues;"
                    f" speakers that do: {listed or 'none'}")
    reasons = Counter(r.reason for r in rejects).most_common(3)
    return (f"no training examples from {dialogues} dialogues ({len(rejects)} rejected; most common: "
            + "; ".join(f"{reason} ({n})" for reason, n in reasons) + ")")


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

