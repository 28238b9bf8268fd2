"""ParlAI text data, as PersonaChat/ConvAI2 ships it.

Two layouts:
- numbered lines (`1 your persona: ...`, `5 hello\tresponse`): a line numbered 1 starts an
  episode; `your persona:` / `partner's persona:` lines are persona facts; other lines are
  `partner utterance<TAB>self response[<TAB>reward<TAB>candidates]`;
- ParlAI's field format (`text:...<TAB>labels:...<TAB>episode_done:True`), with persona
  lines inside the first `text` (ParlAI writes newlines there as `\\n`).
Speakers are `partner` and `self`; personas are kept in `dialogue.meta["personas"]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.readers._io import open_text
from dialogtune.textfix import clean_text

_NUMBERED = re.compile(r"^(\d+) (.*)$")
PERSONA_PREFIXES = {"your persona:": "self", "partner's persona:": "partner"}


class _Episode:
    def __init__(self, line: int):
        self.line = line
        self.turns: list[Turn] = []
        self.personas: dict[str, list[str]] = {"self": [], "partner": []}

    def add_text(self, text: str, lineno: int) -> bool:
        """Persona line or partner utterance; False if it was a persona line."""
        for prefix, owner in PERSONA_PREFIXES.items():
            if text.startswith(prefix):
                self.personas[owner].append(clean_text(text[len(prefix):]))
                return False
        return True


def _fields(line: str) -> dict[str, str]:
    fields = {}
    for part in line.split("\t"):
        key, _, value = part.partition(":")
        fields[key] = value.replace("\\n", "\n")
    return fields


def read(path: Path, **_: object) -> Iterator[Dialogue | Reject]:
    source = str(path)
    episode: _Episode | None = None
    count = 0

    def finish() -> Iterator[Dialogue]:
        nonlocal episode, count
        if episode is not None and episode.turns:
            meta = {"personas": {k: v for k, v in episode.personas.items() if v}}
            yield Dialogue(f"{path.name}#{count}", episode.turns, source=source, line=episode.line, meta=meta)
            count += 1
        episode = None

    with open_text(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith("text:"):
                fields = _fields(line)
                if episode is None:
                    episode = _Episode(lineno)
                texts = [t for t in fields.get("text", "").split("\n") if episode.add_text(t, lineno)]
                utterance = clean_text(" ".join(texts))
                # As in the numbered layout: `__SILENCE__` marks that self speaks first, not a turn.
                if utterance and utterance != "__SILENCE__":
                    episode.turns.append(Turn("partner", utterance, meta={"line": lineno}))
                label = clean_text(fields.get("labels", fields.get("eval_labels", "")).split("|")[0])
                if label:
                    episode.turns.append(Turn("self", label, meta={"line": lineno}))
                if fields.get("episode_done", "").lower() == "true":
                    yield from finish()
                continue
            match = _NUMBERED.match(line)
            if not match:
                yield Reject(source, lineno, "expected a numbered line ('N text') or ParlAI fields ('text:...')")
                continue
            number, body = int(match.group(1)), match.group(2)
            if number == 1 or episode is None:
                yield from finish()
                episode = _Episode(lineno)
            parts = body.split("\t")
            if len(parts) == 1 and not episode.add_text(parts[0], lineno):
                continue
            if len(parts) < 2:
                yield Reject(source, lineno, "expected 'utterance<TAB>response'")
                continue
            partner, own = clean_text(parts[0]), clean_text(parts[1])
            if partner and partner != "__SILENCE__":
                episode.turns.append(Turn("partner", partner, meta={"line": lineno}))
            if own:
                episode.turns.append(Turn("self", own, meta={"line": lineno}))
    yield from finish()
