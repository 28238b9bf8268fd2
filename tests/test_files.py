"""Outputs are written whole or not at all: staged, then renamed into place."""

from __future__ import annotations

import json

import pytest

from dialogtune import files
from dialogtune.errors import RunError
from dialogtune.files import staged_dir, staged_file, write_json, write_jsonl


def test_new_directory_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as staging:
        (staging / "a.txt").write_text("new")
        assert not target.exists()  # nothing half-written is visible under the target's name
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind


def test_existing_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_leaves_the_old_directory_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), staged_dir(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_directory_that_is_not_ours_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(RunError) as refused, staged_dir(target, may_replace=lambda p: False) as s:
        (s / "new.txt").write_text("new")
    assert str(refused.value) == (f"{target}: exists and is not ours to replace (it holds something dialogtune"
                                  " did not write); choose another output directory")
    assert (target / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real, calls = files.os.replace, []

    def replace(source, destination):
        calls.append((source, destination))
        if len(calls) == 2:  # staging -> target, after the old target was moved aside
            raise OSError("disk gone")
        real(source, destination)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"), staged_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert len(calls) == 3 and calls[2][1] == target  # the third rename moved the old target back
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no `.out-old-*` left


def test_keep_existing_keeps_the_copy_that_finished_first(tmp_path):
    target = tmp_path / "model"
    with staged_dir(target, keep_existing=True) as staging:
        (staging / "weights").write_text("mine")
        target.mkdir()  # another process finished first
        (target / "weights").write_text("theirs")
    assert (target / "weights").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "stats.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": "é"}
    assert "é" in path.read_text(encoding="utf-8")  # kept readable, not \u-escaped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_staged_file_keeps_the_suffix_and_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    with staged_file(path) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers that pick a format by suffix work
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(OSError, match="disk full"), staged_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_write_jsonl_writes_one_record_a_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    write_jsonl(path, [{"a": 1}, {"b": "é"}])
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
