"""Exemplars: labelled utterances that say which function a user means, with a template in
which each slot value is replaced by `<slot>`.

    exemplars, stats = extract_sgd_exemplars(Path("sgd/train"))
    handwritten = load_exemplars(Path("exemplars.yaml"), functions)

From SGD, an exemplar is a user turn where a service's active intent becomes something new
(from "NONE" or from another intent) compared with that service's previous user turn in the
dialogue. Its arguments are what the utterance itself says: the values of the frame's annotated
spans, plus the categorical slots this turn adds or changes in the state (SGD annotates no spans
for categorical values, so the state change is the only evidence of them). Non-categorical values
that enter the state without a span came from the system's offer ("book it there") and are not in
the utterance, so they are left out. An exemplar whose template cannot be built exactly is kept
(its utterance and arguments remain good queries) with `template=None`; the reason is counted.
User turns with no active intent in any frame become negatives (`function=None`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.errors import DataError
from dialogtune.readers import sgd
from dialogtune.readers._io import base_suffix, load_json
from dialogtune.retrieval.schemas import Function, sgd_function_name

NO_INTENT = "NONE"
PLACEHOLDER = re.compile(r"<([^<>\s]+)>")


@dataclass(frozen=True)
class Exemplar:
    function: str | None  # the owner function's name; None for an out-of-domain negative
    utterance: str | None  # None for a hand-written template with no utterance behind it
    template: str | None  # None where the slot values could not be replaced exactly
    arguments: dict[str, str] = field(default_factory=dict)
    source: tuple[str, int] = ("", 0)  # (dialogue id, turn index) or (file, position in the function's list)


@dataclass
class ExtractionStats:
    user_turns: int = 0
    activations: int = 0  # frames where an intent became active: one exemplar each
    templates: int = 0
    templates_skipped: Counter = field(default_factory=Counter)  # reason -> count
    negatives: int = 0
    rejects: int = 0  # records the SGD reader refused (they are not counted as turns)


def build_template(utterance: str, spans: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(template, None), or (None, why not). Each (slot, value) must occur exactly once in the
    utterance: with a repeated value, which occurrence is the slot cannot be told from the text."""
    located = []
    for slot, value in spans:
        count = utterance.count(value) if value else 0
        if count == 0:
            return None, "value not found"
        if count > 1:
            return None, "value occurs more than once"
        start = utterance.index(value)
        located.append((start, start + len(value), slot))
    located.sort()
    for (_, end, _), (start, _, _) in pairwise(located):
        if start < end:
            return None, "values overlap"
    template, cursor = [], 0
    for start, end, slot in located:
        template += [utterance[cursor:start], f"<{slot}>"]
        cursor = end
    return "".join([*template, utterance[cursor:]]), None


def _span_values(turn: Turn, frame: dict) -> list[tuple[str, str]] | None:
    """The (slot, value) pairs of a frame's spans, read from the text the spans index; None when
    a span does not fit in it."""
    raw = turn.meta.get("utterance", turn.text)
    values = []
    for span in frame.get("slots") or []:
        start, end = span.get("start"), span.get("exclusive_end")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(raw)):
            return None
        values.append((span["slot"], raw[start:end]))
    return values


def categorical_slots(dialogue: Dialogue, service: str) -> set[str]:
    schema = dialogue.meta.get("schemas", {}).get(service)
    if schema is None:
        raise DataError(f"{dialogue.source}: dialogue {dialogue.id}: service {service!r} has no schema "
                        "(expected it in the schema.json beside the dialogue files)")
    return {slot["name"] for slot in schema.get("slots", []) if slot.get("is_categorical")}


def dialogue_exemplars(dialogue: Dialogue, stats: ExtractionStats) -> list[Exemplar]:
    exemplars = []
    previous: dict[str, tuple[str, dict]] = {}  # service -> (active intent, slot values) at its last user turn
    for index, turn in enumerate(dialogue.turns):  # index: the turn's position in the read dialogue
        if turn.speaker != "USER":
            continue
        stats.user_turns += 1
        frames = [f for f in turn.meta.get("frames", []) if isinstance(f.get("state"), dict)]
        if all(f["state"].get("active_intent", NO_INTENT) == NO_INTENT for f in frames):
            stats.negatives += 1
            exemplars.append(Exemplar(None, turn.text, None, {}, (dialogue.id, index)))
        for frame in frames:
            service, state = frame["service"], frame["state"]
            intent, values = state.get("active_intent", NO_INTENT), state.get("slot_values", {})
            last_intent, last_values = previous.get(service, (NO_INTENT, {}))
            previous[service] = (intent, values)
            if intent in (NO_INTENT, last_intent):
                continue
            stats.activations += 1
            spans = _span_values(turn, frame)
            if spans is None:
                template, reason, arguments = None, "span out of range", {}
            else:
                template, reason = build_template(turn.text, spans)
                arguments = dict(spans)
            for slot in sorted(categorical_slots(dialogue, service)):
                if values.get(slot) and values[slot] != last_values.get(slot):
                    arguments[slot] = values[slot][0]
            if template is None:
                stats.templates_skipped[reason] += 1
            else:
                stats.templates += 1
            exemplars.append(Exemplar(sgd_function_name(service, intent), turn.text, template, arguments,
                                      (dialogue.id, index)))
    return exemplars


def extract_sgd_exemplars(path: Path) -> tuple[list[Exemplar], ExtractionStats]:
    """The exemplars and negatives of an SGD split directory (or one dialogues_*.json file)."""
    stats = ExtractionStats()
    exemplars = []
    for item in sgd.read(path):
        if isinstance(item, Reject):
            stats.rejects += 1
        else:
            exemplars += dialogue_exemplars(item, stats)
    return exemplars, stats


def _load_mapping(path: Path) -> Any:
    if base_suffix(path) not in (".yaml", ".yml"):
        return load_json(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise DataError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {err.problem}") from err


def load_exemplars(path: Path, functions: list[Function]) -> list[Exemplar]:
    """Hand-written exemplars in the shape `{"Function": [{"template": "..."}]}` (JSON or YAML);
    an entry may also give "utterance" and "arguments". Every function must be one of
    `functions`, and every `<placeholder>` one of its parameters."""
    data = _load_mapping(path)
    if not isinstance(data, dict):
        raise DataError(f'{path}: expected a mapping {{"FunctionName": [{{"template": "..."}}]}}')
    known = {function.name: function for function in functions}
    exemplars = []
    for name, entries in data.items():
        function = known.get(name)
        if function is None:
            raise DataError(f"{path}: function {name!r} is not in the schemas given ({len(known)} functions)")
        if not isinstance(entries, list):
            raise DataError(f"{path}: {name}: expected a list of exemplars")
        for position, entry in enumerate(entries):
            where = f"{path}: {name}[{position}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("template"), str):
                raise DataError(f"{where}: expected a mapping with a string field 'template'")
            for placeholder in PLACEHOLDER.findall(entry["template"]):
                if function.parameter(placeholder) is None:
                    raise DataError(f"{where}: template placeholder <{placeholder}> is not a parameter of {name} "
                                    f"(expected one of {', '.join(p.name for p in function.parameters) or 'none'})")
            arguments = entry.get("arguments", {})
            utterance = entry.get("utterance")
            if not isinstance(arguments, dict) or not (utterance is None or isinstance(utterance, str)):
                raise DataError(f"{where}: 'arguments' must be a mapping and 'utterance' a string")
            exemplars.append(Exemplar(name, utterance, entry["template"], arguments, (str(path), position)))
    return exemplars


def read_exemplars(sources: Iterable[Path], functions: Sequence[Function]) -> tuple[list[Exemplar], list[str]]:
    """Exemplars from SGD dialogue directories/files and hand-written JSON/YAML files, and a line
    for each SGD source saying what it held back (records the reader refused, templates skipped),
    so that nothing is left out silently."""
    exemplars: list[Exemplar] = []
    notes = []
    for source in sources:
        if source.is_dir() or source.name.startswith("dialogues_"):  # SGD dialogues
            found, stats = extract_sgd_exemplars(source)
            exemplars += found
            if stats.rejects or stats.templates_skipped:
                skipped = ", ".join(f"{n} {why}" for why, n in stats.templates_skipped.most_common())
                notes.append(f"{source}: {stats.rejects} record(s) refused by the SGD reader;"
                             f" {sum(stats.templates_skipped.values())} template(s) not built ({skipped or 'none'})")
        else:  # hand-written {"Function": [{"template": ..., "utterance": ...}]}
            exemplars += load_exemplars(source, functions)
    return exemplars, notes
