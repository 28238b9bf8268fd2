"""prepare.json and dialogtune.json: written and read back in one place, typed."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_prepare import make_config

from dialogtune.errors import DataError, RunError
from dialogtune.prepare import prepare, tokenizer_hash
from dialogtune.records import PreparedInfo, RunInfo, TemplateInfo, find_run_info


def test_prepared_info_round_trips_what_prepare_wrote(tmp_path, tiny_model_dir):
    from dialogtune.models import load_tokenizer

    prepare(make_config(tmp_path, tiny_model_dir), quiet=True)
    from dialogtune.templates import shipped_source

    info = PreparedInfo.load(tmp_path / "out")
    assert info.template == TemplateInfo(name="transcript", source=shipped_source("transcript"), end_of_turn="\n")
    assert info.stop_strings == ["\n", "\nAlice:", "\nCarol:"] and info.speakers_as == ["Bob"]
    assert info.tokenizer.hash == tokenizer_hash(load_tokenizer(str(tiny_model_dir)))
    assert (info.max_length, info.pack, info.task) == (128, False, "respond")
    on_disk = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert dataclasses.asdict(info) == on_disk  # nothing lost or renamed on the way


def test_unknown_keys_from_a_newer_version_are_ignored(tmp_path):
    info = RunInfo(dialogtune_version="0.1.0", method="lora", base_model="m", base_model_path="/m", task="respond",
                   template="chatml", end_of_turn="<|im_end|>", speakers_as=["SYSTEM"], stop_strings=["<|im_end|>"],
                   max_length=512)
    info.save(tmp_path)
    raw = json.loads((tmp_path / "dialogtune.json").read_text())
    (tmp_path / "dialogtune.json").write_text(json.dumps({**raw, "added_later": 1}))
    assert RunInfo.load(tmp_path) == info


def test_run_info_of_training_keeps_the_instruction_only_for_summaries(tmp_path, tiny_model_dir):
    prepare(make_config(tmp_path, tiny_model_dir), quiet=True)
    prepared = PreparedInfo.load(tmp_path / "out")
    info = RunInfo.of_training(prepared, version="9", method="full", base_model="tiny", base_model_path="/tiny",
                               system_prompt="Be brief.", instruction="Summarize:")
    assert (info.task, info.template, info.end_of_turn) == ("respond", "transcript", "\n")
    assert info.stop_strings == prepared.stop_strings and info.max_length == 128
    assert info.system_prompt == "Be brief." and info.instruction is None
    summary = RunInfo.of_training(dataclasses.replace(prepared, task="summarize"), version="9", method="full",
                                  base_model="tiny", base_model_path="/tiny", system_prompt=None,
                                  instruction="Summarize:")
    assert summary.instruction == "Summarize:"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"not a prepared dataset \(no prepare.json\)"):
        PreparedInfo.load(tmp_path)
    with pytest.raises(RunError, match=r"no finished run here .*dialogtune.json is missing"):
        RunInfo.load(tmp_path)


def test_find_run_info_prefers_the_runs_final_directory(tmp_path):
    assert find_run_info(tmp_path) is None
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "dialogtune.json").write_text("{}")
    assert find_run_info(tmp_path) == tmp_path / "final"
    assert find_run_info(tmp_path / "final") == tmp_path / "final"


def run_info_dict() -> dict:
    return dataclasses.asdict(RunInfo(dialogtune_version="0.1.0", method="lora", base_model="m", base_model_path="/m",
                                      task="respond", template="chatml", end_of_turn="<|im_end|>",
                                      speakers_as=["assistant"], stop_strings=["<|im_end|>"], max_length=512))


def test_a_run_info_missing_fields_names_the_file_and_the_fields(tmp_path):
    path = tmp_path / "dialogtune.json"
    data = run_info_dict()
    del data["end_of_turn"], data["task"], data["system_prompt"]  # system_prompt has a default: not needed
    path.write_text(json.dumps(data))
    with pytest.raises(RunError) as refused:
        RunInfo.load(tmp_path)
    assert str(refused.value) == (f"{path}: missing field(s) task, end_of_turn; written by an older or newer"
                                  " dialogtune? train the run again")


def test_a_run_info_that_is_not_a_json_object_is_named(tmp_path):
    path = tmp_path / "dialogtune.json"
    path.write_text("[1, 2]")
    with pytest.raises(RunError) as refused:
        RunInfo.load(tmp_path)
    assert str(refused.value) == f"{path}: expected a JSON object, got list; train the run again"
    path.write_text('{"task": ')
    with pytest.raises(RunError) as refused:
        RunInfo.load(tmp_path)
    assert str(refused.value) == (f"{path}: malformed JSON (Expecting value: line 1 column 10 (char 9));"
                                  " train the run again")


def test_a_prepared_info_missing_fields_names_them_with_their_section(tmp_path, tiny_model_dir):
    prepare(make_config(tmp_path, tiny_model_dir), quiet=True)
    path = tmp_path / "out" / "prepare.json"
    data = json.loads(path.read_text())
    del data["stop_strings"], data["tokenizer"]["hash"], data["template"]["end_of_turn"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as refused:
        PreparedInfo.load(tmp_path / "out")
    assert str(refused.value) == (f"{path}: missing field(s) stop_strings, tokenizer.hash, template.end_of_turn;"
                                  " written by an older or newer dialogtune? prepare the data again"
                                  " (`dialogtune prepare --force`)")
    path.write_text(json.dumps({**data, "template": "chatml"}))
    with pytest.raises(DataError) as refused:
        PreparedInfo.load(tmp_path / "out")
    assert str(refused.value) == (f"{path}: template: expected a JSON object, got str; prepare the data again"
                                  " (`dialogtune prepare --force`)")
    path.write_text("{")
    with pytest.raises(DataError, match=r"prepare.json: malformed JSON \(Expecting property name"):
        PreparedInfo.load(tmp_path / "out")
