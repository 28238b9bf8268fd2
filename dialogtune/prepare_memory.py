"""`prepare` for `task: memory`: one row per dialogue holding its turns as token pieces.

Memory training streams whole dialogues turn by turn, so the unit written is the dialogue, not
an example: per turn the tokens of its prefix (read) and of its text (learned when trained),
its session, and whether it is trained. Windows of history are cut at training time, so one
preparation serves every window and memory size. A turn longer than `max_length` keeps its
first `max_length` tokens (prefix first); each cut is counted and listed in rejects.jsonl.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dialogtune.config import PrepareConfig
from dialogtune.dialogue import Dialogue, Reject
from dialogtune.errors import DataError, StrictError
from dialogtune.files import staged_dir, write_json
from dialogtune.readers import read_dialogues
from dialogtune.records import PreparedInfo, TemplateInfo
from dialogtune.split import validation_groups
from dialogtune.tasks.memory import TURN_END, memory_steps

TEMPLATE = TemplateInfo(name="memory_transcript", source="", end_of_turn=TURN_END)
COLUMNS = ("dialogue_id", "prefix_ids", "text_ids", "sessions", "trained")


def tokenized_dialogue(dialogue: Dialogue, steps, tokenizer, max_length: int, rejects: list[Reject]) -> dict:
    prefixes = tokenizer([s.prefix for s in steps], add_special_tokens=False).input_ids
    texts = tokenizer([s.text for s in steps], add_special_tokens=False).input_ids
    for index, (prefix, text) in enumerate(zip(prefixes, texts)):
        if len(prefix) + len(text) > max_length:
            rejects.append(Reject(dialogue.source, dialogue.line, f"turn {index} has {len(prefix) + len(text)} tokens;"
                                  f" kept the first {max_length} (max_length)", stage="truncated",
                                  item=f"[{dialogue.id!r}] turn {index}"))
            prefix[:] = prefix[:max_length - 1]
            text[:] = text[:max(1, max_length - len(prefix))]
    return {"dialogue_id": dialogue.id, "prefix_ids": prefixes, "text_ids": texts,
            "sessions": [s.session for s in steps], "trained": [s.trained for s in steps]}


def prepare_memory(config: PrepareConfig, tokenizer, out: Path, *, quiet: bool, read_options: dict,
                   sampled, manifest_of) -> tuple[dict[str, Any], list[Reject]]:
    """Read, tokenize, split and write; returns (stats, rejects). `sampled(dialogue)` applies
    data.sample; `manifest_of(speakers)` gives the PreparedInfo to save."""
    import datasets

    from dialogtune.prepare import UNUSED, RejectLog, datasets_bars

    started = time.perf_counter()
    rows: list[dict] = []
    groups: dict[str, str] = {}
    rejects: list[Reject] = []
    speakers: Counter[str] = Counter()
    sampled_out = 0
    speakers_as = set(config.task.speakers_as) if config.task.speakers_as else None
    bar = tqdm(desc="prepare", unit=" dialogues", disable=quiet or None, dynamic_ncols=True)
    for path in config.data.path:
        for item in read_dialogues(Path(path), config.data.format, **read_options):
            if isinstance(item, Dialogue) and not sampled(item):
                sampled_out += 1
                continue
            made = memory_steps(item, speakers_as) if isinstance(item, Dialogue) else item
            if isinstance(made, Reject):
                if config.strict and made.stage != UNUSED:
                    raise StrictError(f"{made} (stopped: --strict)")
                rejects.append(made)
                continue
            speakers.update(t.speaker for t in item.turns if t.speaker)
            rows.append(tokenized_dialogue(item, made, tokenizer, config.max_length, rejects))
            groups[item.id] = item.group
            bar.update()
    bar.close()
    if not rows:
        raise DataError(f"no dialogues to train from ({len(rejects)} rejected; see the readers' reasons above)"
                        if rejects else "no dialogues in " + ", ".join(config.data.path))
    held_out = validation_groups(set(groups.values()), config.split.validation, config.split.seed)
    split_stats = {}
    with staged_dir(out, may_replace=lambda _: True) as staging:  # prepare() checked `out`
        for split in ("train", "validation"):
            part = [r for r in rows if (groups[r["dialogue_id"]] in held_out) == (split == "validation")]
            if part:
                table = {column: [r[column] for r in part] for column in COLUMNS}
                with datasets_bars(shown=not quiet):
                    datasets.Dataset.from_dict(table).save_to_disk(str(staging / split))
            turns = sum(len(r["trained"]) for r in part)
            split_stats[split] = {
                "dialogues": len(part), "turns": turns, "trained_turns": sum(sum(r["trained"]) for r in part),
                "tokens": sum(len(p) + len(t) for r in part for p, t in zip(r["prefix_ids"], r["text_ids"])),
                "trained_tokens": sum(len(t) for r in part for t, on in zip(r["text_ids"], r["trained"]) if on),
                "sessions": max((max(r["sessions"]) for r in part), default=0),
            }
        with RejectLog(staging / "rejects.jsonl", strict=False) as log:  # --strict stopped at a bad one already
            for reject in rejects:
                log.add(reject)
        elapsed = time.perf_counter() - started
        stats = {"task": "memory", "dialogues_read": len(rows), "rejected": log.count,
                 "rejected_by_reason": dict(log.by_reason.most_common()), "splits": split_stats,
                 "turns_too_long": sum(r.stage == "truncated" for r in rejects),
                 "speakers": dict(speakers.most_common(50)), "seconds": round(elapsed, 3), "warnings": []}
        if config.data.sample is not None:
            stats["sampled_out"] = sampled_out
        if config.split.validation > 0 and not held_out:
            stats["warnings"].append("no validation split: fewer than two dialogues")
        write_json(staging / "stats.json", stats)
        manifest: PreparedInfo = manifest_of(speakers)
        manifest.save(staging)
    if not quiet:
        train, valid = split_stats["train"], split_stats["validation"]
        print(f"prepared {len(rows)} dialogues for memory training -> {train['dialogues']} train /"
              f" {valid['dialogues']} validation ({train['turns']} / {valid['turns']} turns,"
              f" {train['trained_tokens']} / {valid['trained_tokens']} trained tokens); {len(rejects)} rejected or"
              f" cut; {elapsed:.1f}s -> {out}")
    return stats, rejects
