"""The files dialogtune writes and reads back, typed and loaded/saved in one place.

- `prepare.json` (`PreparedInfo`): what a prepared dataset was made from and with, so training,
  evaluation and inspection reproduce it exactly (template source, stop strings, speakers).
- `dialogtune.json` (`RunInfo`): beside a run's final model, what chat, generate, serve and
  eval need to render prompts exactly as training did.

Both stay plain JSON a user can read; unknown keys from newer versions are ignored on load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dialogtune.errors import DataError, RunError
from dialogtune.files import write_json

PREPARED_FILE = "prepare.json"
RUN_INFO_FILE = "dialogtune.json"


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _missing(cls, data: dict[str, Any], prefix: str = "") -> list[str]:
    """The fields `cls` needs (those without a default) that `data` lacks, in declaration order."""
    return [prefix + f.name for f in dataclasses.fields(cls) if f.name not in data
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _read_object(path: Path, error: type[Exception], again: str) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file (and what to do: `again`) if there is none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise error(f"{path}: malformed JSON ({err}); {again}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}; {again}")
    return data


def _check_fields(path: Path, missing: list[str], error: type[Exception], again: str) -> None:
    if missing:
        raise error(f"{path}: missing field(s) {', '.join(missing)}; written by an older or newer dialogtune?"
                    f" {again}")


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    source: str  # the Jinja source used, so the run renders exactly what training saw
    end_of_turn: str


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str
    hash: str
    vocab_size: int
    pad_token_id: int
    pad_note: str | None
    eos_token: str | None


@dataclass(frozen=True)
class PreparedInfo:
    fingerprint: str
    dialogtune_version: str
    config: dict[str, Any]  # the resolved prepare config
    model: str
    tokenizer: TokenizerInfo
    template: TemplateInfo
    task: str
    speakers_as: list[str]
    stop_strings: list[str]
    max_length: int
    pack: bool

    def save(self, directory: Path) -> None:
        write_json(Path(directory) / PREPARED_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, directory: Path) -> PreparedInfo:
        path = Path(directory) / PREPARED_FILE
        if not path.exists():
            raise DataError(f"{directory}: not a prepared dataset (no {PREPARED_FILE}); make one with"
                            " `dialogtune prepare`")
        again = "prepare the data again (`dialogtune prepare --force`)"
        data = _read_object(path, DataError, again)
        missing = _missing(cls, data)
        for key, part in (("tokenizer", TokenizerInfo), ("template", TemplateInfo)):
            if key in data:
                if not isinstance(data[key], dict):
                    raise DataError(f"{path}: {key}: expected a JSON object, got {type(data[key]).__name__};"
                                    f" {again}")
                missing += _missing(part, data[key], f"{key}.")
        _check_fields(path, missing, DataError, again)
        return _from_dict(cls, {**data, "tokenizer": _from_dict(TokenizerInfo, data["tokenizer"]),
                                "template": _from_dict(TemplateInfo, data["template"])})


@dataclass(frozen=True)
class RunInfo:
    dialogtune_version: str
    method: str  # full, lora or qlora
    base_model: str  # as named in the config
    base_model_path: str  # what from_pretrained loads (the embedded model's cached copy)
    task: str
    template: str
    end_of_turn: str
    speakers_as: list[str]
    stop_strings: list[str]
    max_length: int
    system_prompt: str | None = None
    instruction: str | None = None  # summarize: the instruction prompts were built with
    # understand: how prompts were built (index, candidates, exemplars, rounds), so use builds the same
    understand: dict[str, Any] | None = None
    # memory: the memory model and the window each turn reads ({kind, slots, window, time_horizon, reset})
    memory: dict[str, Any] | None = None

    def save(self, directory: Path) -> None:
        write_json(Path(directory) / RUN_INFO_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, directory: Path) -> RunInfo:
        path = Path(directory) / RUN_INFO_FILE
        if not path.exists():
            raise RunError(f"{directory}: no finished run here ({path} is missing); train it first")
        again = "train the run again"
        data = _read_object(path, RunError, again)
        _check_fields(path, _missing(cls, data), RunError, again)
        return _from_dict(cls, data)

    @classmethod
    def of_training(cls, prepared: PreparedInfo, *, version: str, method: str, base_model: str,
                    base_model_path: str, system_prompt: str | None, instruction: str | None) -> RunInfo:
        return cls(dialogtune_version=version, method=method, base_model=base_model, base_model_path=base_model_path,
                   task=prepared.task, template=prepared.template.name, end_of_turn=prepared.template.end_of_turn,
                   speakers_as=list(prepared.speakers_as), stop_strings=list(prepared.stop_strings),
                   max_length=prepared.max_length, system_prompt=system_prompt,
                   instruction=instruction if prepared.task == "summarize" else None,
                   understand=understand_settings(prepared.config) if prepared.task == "understand" else None)


def understand_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What the understand task's prompts were built with, from a prepare config (as JSON)."""
    task = config["task"]
    context = task.get("context", "full")
    return {"index": str(Path(task["index"]).resolve()), "candidates": task["candidates"],
            "exemplars": task["exemplars"], "rounds": None if context == "full" else context["rounds"],
            "dialogue_services": task.get("dialogue_services", False)}


def find_run_info(path: Path) -> Path | None:
    """The directory holding dialogtune.json: a run's final/, or the path itself (final/, merged/)."""
    for candidate in (Path(path) / "final", Path(path)):
        if (candidate / RUN_INFO_FILE).exists():
            return candidate
    return None
