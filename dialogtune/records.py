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
        data = json.loads(path.read_text(encoding="utf-8"))
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

    def save(self, directory: Path) -> None:
        write_json(Path(directory) / RUN_INFO_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, directory: Path) -> RunInfo:
        path = Path(directory) / RUN_INFO_FILE
        if not path.exists():
            raise RunError(f"{directory}: no finished run here ({path} is missing); train it first")
        return _from_dict(cls, json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def of_training(cls, prepared: PreparedInfo, *, version: str, method: str, base_model: str,
                    base_model_path: str, system_prompt: str | None, instruction: str | None) -> RunInfo:
        return cls(dialogtune_version=version, method=method, base_model=base_model, base_model_path=base_model_path,
                   task=prepared.task, template=prepared.template.name, end_of_turn=prepared.template.end_of_turn,
                   speakers_as=list(prepared.speakers_as), stop_strings=list(prepared.stop_strings),
                   max_length=prepared.max_length, system_prompt=system_prompt,
                   instruction=instruction if prepared.task == "summarize" else None)


def find_run_info(path: Path) -> Path | None:
    """The directory holding dialogtune.json: a run's final/, or the path itself (final/, merged/)."""
    for candidate in (Path(path) / "final", Path(path)):
        if (candidate / RUN_INFO_FILE).exists():
            return candidate
    return None
