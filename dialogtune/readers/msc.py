"""Multi-Session Chat (MSC), in the two shapes it is found in. Speakers are `A` and `B` in both.

- ParlAI's release (`msc_dialogue/session_N/{train,valid,test}.txt`, often renamed `.jsonl`): one
  episode a line, `{personas, dialog: [{id, text}], previous_dialogs: [{personas, dialog: [{text}],
  time_num, time_unit, time_back}], metadata: {initial_data_id}, init_personas}`, session N with
  sessions 1..N-1 as history. See `read_episodes`.
- A JSON object of dialogue id -> turns `{dial_id, turn_id, text, role, session, token_ids?}`
  (qywu/memformers' samples). See `read_samples`.

`read` takes a `.json` file for the samples shape unless its first line is a whole ParlAI episode
(an object with a list `dialog` and MSC's keys); any other file is read one episode a line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.errors import DataError
from dialogtune.readers._io import base_suffix, iter_jsonl, load_json, open_text
from dialogtune.textfix import clean_text

BART_SPEAKER_IDS = {250: "A", 387: "B"}
ROLE_LABELS = {"bot_0": "A", "bot_1": "B", "Speaker 1": "A", "Speaker 2": "B"}
# ParlAI lists persona facts as [Speaker 1's, Speaker 2's].
PERSONA_OWNERS = ("A", "B")


def read(path: Path, **_: object) -> Iterator[Dialogue | Reject]:
    if base_suffix(path) == ".json" and not is_episode(first_record(path)):
        return read_samples(path)
    return read_episodes(path)


def first_record(path: Path) -> Any:
    """The first non-blank line parsed as JSON, or None when it is not JSON on its own
    (a pretty-printed document, a text file)."""
    with open_text(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    return orjson.loads(line)
                except orjson.JSONDecodeError:
                    return None
    return None


def is_episode(record: Any) -> bool:
    """A ParlAI MSC episode: a list `dialog` next to MSC's own keys (a bare `dialog` is too common)."""
    return (isinstance(record, dict) and isinstance(record.get("dialog"), list)
            and any(key in record for key in ("previous_dialogs", "personas", "init_personas")))


# ParlAI release: one episode a line.
#
# Turns alternate, Speaker 1 first, in every session. Earlier sessions carry no speaker labels;
# the last one labels turns `Speaker 1`/`Speaker 2`, except that some (50 of the 500 session-3
# validation episodes) carry a crowdworker number instead, always where alternation puts
# Speaker 1. A known label decides, otherwise the position. That `personas[0]` belongs to the
# turns at even positions was checked on the same data: of the 2,000 per-speaker persona summaries
# of its earlier sessions, 1,812 share more words with their own speaker's turns, 102 fewer.


def read_episodes(path: Path) -> Iterator[Dialogue | Reject]:
    """One Dialogue per line holding every session in order (`previous_dialogs`, then `dialog`),
    each turn with its 1-based session. Meta: `personas` {A, B} are the persona lines each speaker
    was given before session 1 (`init_personas`; what `task.persona` puts in the system prompt),
    `persona_summaries` {A, B} what each had said about themselves before the last session
    (`personas`, MSC's memory), and `sessions`: per session its number, `time_gap` since the
    session before (`"6 days"`, None for the first), `time_back` before the last session as
    written, and for earlier sessions the `personas` summarised from that session alone."""
    source = str(path)
    for index, (line, record, error) in enumerate(iter_jsonl(path)):
        if error is None and not isinstance(record, dict):
            error = f"expected an object, got {type(record).__name__}"
        sessions = error or _sessions(record)
        if isinstance(sessions, str):
            yield Reject(source, line, sessions)
            continue
        turns: list[Turn] = []
        meta: dict[str, Any] = {"sessions": []}
        problems: list[tuple[str, str]] = []  # (item, reason): the dialogue is kept without them
        for number, (where, session) in enumerate(sessions, 1):
            for position, raw in enumerate(session["dialog"]):
                turn = _turn(raw, position, number)
                if isinstance(turn, Turn):
                    turns.append(turn)
                else:
                    problems.append((f"{where}dialog[{position}]{turn[0]}", turn[1]))
            before = sessions[number - 2][1] if number > 1 else None
            meta["sessions"].append(_session_meta(session, number, before, where, problems))
        for key, name in (("init_personas", "personas"), ("personas", "persona_summaries")):
            personas = _personas(record.get(key), key, problems)
            if personas:
                meta[name] = personas
        for item, reason in problems:
            yield Reject(source, line, reason, item=item)
        if not turns:
            yield Reject(source, line, "no non-empty turn in any session")
            continue
        metadata = record.get("metadata")
        dialogue_id = metadata.get("initial_data_id") if isinstance(metadata, dict) else None
        dialogue_id = str(dialogue_id) if dialogue_id is not None else f"{path.name}#{index}"
        yield Dialogue(dialogue_id, turns, source=source, line=line, meta=meta)


def _sessions(record: dict) -> list[tuple[str, dict]] | str:
    """[(item prefix, session)] in time order, or why the episode cannot be read."""
    if not isinstance(record.get("dialog"), list):
        return "expected a list field 'dialog' (the turns of the last session)"
    previous = record.get("previous_dialogs", [])
    if not isinstance(previous, list):
        return "'previous_dialogs' must be a list of earlier sessions"
    for i, session in enumerate(previous):
        # Without it the later sessions' numbers would be wrong: the whole episode goes.
        if not isinstance(session, dict) or not isinstance(session.get("dialog"), list):
            return f"previous_dialogs[{i}] needs a list field 'dialog'"
    return [(f"previous_dialogs[{i}].", s) for i, s in enumerate(previous)] + [("", record)]


def _turn(raw: object, position: int, session: int) -> Turn | tuple[str, str]:
    """The turn, or (item suffix, reason) when it cannot be used."""
    if not isinstance(raw, dict) or not isinstance(raw.get("text"), str):
        return "", "turn needs a string field 'text'"
    text = clean_text(raw["text"])
    if not text:
        return ".text", "empty text"
    speaker = ROLE_LABELS.get(str(raw["id"])) if "id" in raw else None
    meta = {"role": raw["id"]} if "id" in raw else {}
    if "rating" in raw:
        meta["rating"] = raw["rating"]
    return Turn(speaker or PERSONA_OWNERS[position % 2], text, session=session, meta=meta)


def _personas(value: object, item: str, problems: list[tuple[str, str]]) -> dict[str, list[str]] | None:
    """[[Speaker 1's facts], [Speaker 2's facts]] as {A: [...], B: [...]}; None when absent or bad."""
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(facts, list) and all(isinstance(f, str) for f in facts) for facts in value)):
        problems.append((item, "personas must be two lists of strings ([Speaker 1's, Speaker 2's]); left out"))
        return None
    cleaned = {owner: [clean_text(f) for f in facts if f.strip()] for owner, facts in zip(PERSONA_OWNERS, value)}
    return {owner: facts for owner, facts in cleaned.items() if facts}  # as the parlai reader: no empty lists


def _session_meta(session: dict, number: int, before: dict | None, where: str,
                  problems: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {"session": number, "time_gap": None}
    # ParlAI keeps on each earlier session the time that passed *after* it: in all 500 session-3
    # validation episodes session 1's `time_back` is its own time_num/unit plus session 2's.
    if before is not None and before.get("time_num") is not None and before.get("time_unit") is not None:
        out["time_gap"] = f"{before['time_num']} {str(before['time_unit']).strip()}"
    if isinstance(session.get("time_back"), str):
        out["time_back"] = session["time_back"].strip()
    if where:  # the last session's `personas` sum up all before it: they are kept as persona_summaries
        personas = _personas(session.get("personas"), where + "personas", problems)
        if personas:
            out["personas"] = personas
    return out


# qywu/memformers' samples: one JSON object of dialogue id -> turns.
#
# Role labels change between sessions (`bot_0`/`bot_1`, `Speaker 1`/`Speaker 2`, bare numbers):
# the first of `token_ids` is BART's id of the speaker's letter (250 = `A`, 387 = `B`) and is
# consistent across sessions; without it, the known labels map by name.


def speaker_of(turn: dict) -> str | None:
    token_ids = turn.get("token_ids")
    if token_ids and token_ids[0] in BART_SPEAKER_IDS:
        return BART_SPEAKER_IDS[token_ids[0]]
    return ROLE_LABELS.get(str(turn.get("role")))


def read_samples(path: Path) -> Iterator[Dialogue | Reject]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: MSC data must be a JSON object of dialogue id -> list of turns")
    source = str(path)
    for dial_id, raw_turns in data.items():
        if not isinstance(raw_turns, list):
            yield Reject(source, None, "expected a list of turns", item=f"[{dial_id!r}]")
            continue
        turns: list[Turn] = []
        for index, raw in enumerate(raw_turns):
            item = f"[{dial_id!r}][{index}]"
            if not isinstance(raw, dict) or not isinstance(raw.get("text"), str):
                yield Reject(source, None, "turn needs a string field 'text'", item=item)
                continue
            speaker = speaker_of(raw)
            if speaker is None:
                yield Reject(
                    source,
                    None,
                    f"cannot tell the speaker of role {raw.get('role')!r}: token_ids do not start with"
                    f" 250 (A) or 387 (B), and the role is not one of {sorted(ROLE_LABELS)}",
                    item=item,
                )
                continue
            text = clean_text(raw["text"])
            if not text:
                yield Reject(source, None, "empty text", item=item + ".text")
                continue
            session = raw.get("session")
            if session is not None and not (isinstance(session, int) or str(session).isdigit()):
                yield Reject(source, None, f"session must be a number, got {session!r}", item=item + ".session")
                continue
            turns.append(
                Turn(speaker, text, session=int(session) if session is not None else None,
                     meta={"turn_id": raw.get("turn_id"), "role": raw.get("role")})
            )
        if turns:
            yield Dialogue(str(dial_id), turns, source=source)
