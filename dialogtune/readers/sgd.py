"""Schema-Guided Dialogue: a directory of `dialogues_*.json` plus `schema.json`.

Speakers are `USER` and `SYSTEM`. Each turn keeps its `frames` (service, slot spans,
actions, and for user turns the dialogue state with the active intent) in `turn.meta`, and
the raw `utterance` there too when cleaning changed the text (slot spans index the raw one);
each dialogue keeps its services and their schemas in `dialogue.meta`, for the
understanding task.

A system turn that called a service also carries `turn.meta["tool_calls"]`: each call as
`{"name": "Service_1__Intent", "arguments": {...}, "results": [...]}` (the name as
`dialogtune schema` and `understand` write it), what `respond` with `task.tool_calls` turns
into a tool call, the tool's answer and the reply that used it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.errors import DataError
from dialogtune.readers._io import load_json
from dialogtune.retrieval.schemas import sgd_function_name
from dialogtune.textfix import clean_text


def dialogue_files(path: Path) -> tuple[list[Path], Path | None]:
    folder = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else sorted(
        p for p in folder.iterdir() if p.name.startswith("dialogues_") and p.name.endswith((".json", ".json.gz"))
    )
    if not files:
        raise DataError(f"{path}: no dialogues_*.json files")
    schema = next((folder / n for n in ("schema.json", "schema.json.gz") if (folder / n).exists()), None)
    return files, schema


def load_schemas(schema_path: Path | None) -> dict[str, dict]:
    if schema_path is None:
        return {}
    schema = load_json(schema_path)
    if not isinstance(schema, list):
        raise DataError(f"{schema_path}: expected a list of service schemas")
    for index, service in enumerate(schema):
        if not isinstance(service, dict) or not isinstance(service.get("service_name"), str):
            raise DataError(f"{schema_path}: schema entry [{index}] needs a string field 'service_name'")
    return {service["service_name"]: service for service in schema}


def service_calls(frames: list) -> list[dict] | str:
    """The service calls of a turn's frames as `{name, arguments, results}`, or why one is malformed."""
    calls = []
    for index, frame in enumerate(frames):
        if not isinstance(frame, dict) or "service_call" not in frame:
            continue
        call, results = frame["service_call"], frame.get("service_results", [])
        if not (isinstance(frame.get("service"), str) and isinstance(call, dict) and isinstance(call.get("method"), str)
                and isinstance(call.get("parameters"), dict)):
            return f"frames[{index}]: a service_call needs a 'service', a string 'method' and an object 'parameters'"
        if not (isinstance(results, list) and all(isinstance(r, dict) for r in results)):
            return f"frames[{index}]: service_results must be a list of objects"
        calls.append({"name": sgd_function_name(frame["service"], call["method"]),
                      "arguments": dict(call["parameters"]), "results": results})
    return calls


def read(path: Path, **_: object) -> Iterator[Dialogue | Reject]:
    files, schema_path = dialogue_files(path)
    schemas = load_schemas(schema_path)
    for file in files:
        source = str(file)
        data = load_json(file)
        if not isinstance(data, list):
            raise DataError(f"{file}: expected a list of dialogues")
        for index, raw in enumerate(data):
            item = f"[{index}]"
            if not isinstance(raw, dict) or not isinstance(raw.get("turns"), list):
                yield Reject(source, None, "dialogue needs a list field 'turns'", item=item)
                continue
            dialogue_id = str(raw.get("dialogue_id", f"{file.name}#{index}"))
            turns = []
            for t_index, turn in enumerate(raw["turns"]):
                where = f"{item}.turns[{t_index}]"
                if not isinstance(turn, dict) or not isinstance(turn.get("utterance"), str):
                    yield Reject(source, None, "turn needs a string field 'utterance'", item=where)
                    continue
                text = clean_text(turn["utterance"])
                if not text:
                    yield Reject(source, None, "empty utterance", item=where + ".utterance")
                    continue
                meta = {"frames": turn.get("frames", [])}
                if text != turn["utterance"]:
                    meta["utterance"] = turn["utterance"]  # the text slot spans point into
                calls = service_calls(meta["frames"]) if isinstance(meta["frames"], list) else []
                if isinstance(calls, str):
                    yield Reject(source, None, calls, item=where)
                    continue
                if calls:
                    meta["tool_calls"] = calls
                turns.append(Turn(str(turn.get("speaker", "")), text, meta=meta))
            services = raw.get("services", [])
            meta = {"services": services, "schemas": {s: schemas[s] for s in services if s in schemas}}
            if turns:
                yield Dialogue(dialogue_id, turns, source=source, meta=meta)
