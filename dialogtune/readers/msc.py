"""Multi-Session Chat JSON: {dialogue id: [{dial_id, turn_id, text, role, session, token_ids?}]}.

Role labels change between sessions (`bot_0`/`bot_1`, `Speaker 1`/`Speaker 2`, bare numbers),
so speakers are normalised to `A` and `B`: the first of `token_ids` is BART's id of that
letter (250 = `A`, 387 = `B`) and is consistent across sessions; without it, the known labels
map by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.errors import DataError
from dialogtune.readers._io import load_json
from dialogtune.textfix import clean_text

BART_SPEAKER_IDS = {250: "A", 387: "B"}
ROLE_LABELS = {"bot_0": "A", "bot_1": "B", "Speaker 1": "A", "Speaker 2": "B"}


def speaker_of(turn: dict) -> str | None:
    token_ids = turn.get("token_ids")
    if token_ids and token_ids[0] in BART_SPEAKER_IDS:
        return BART_SPEAKER_IDS[token_ids[0]]
    return ROLE_LABELS.get(str(turn.get("role")))


def read(path: Path, **_: object) -> Iterator[Dialogue | Reject]:
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
