import numpy as np
import pytest

from dialogtune.errors import DataError
from dialogtune.inspect import GREEN, RESET, example_bounds, inspect, locate, render_marked


def test_example_bounds_follow_restarting_positions():
    assert example_bounds([0, 1, 2, 0, 1, 0]) == [(0, 3), (3, 5), (5, 6)]


def test_locate_counts_examples_across_packed_rows():
    dataset = {"position_ids": [[0, 1, 0, 1, 2], [0, 1, 2, 3], [0, 0]]}
    assert locate(dataset, 0) == (0, 0, 2, 5)
    assert locate(dataset, 2) == (1, 0, 4, 5)
    assert locate(dataset, 4) == (2, 1, 2, 5)
    with pytest.raises(DataError, match=r"--index 5 is out of range: this split has 5 examples \(0..4\)"):
        locate(dataset, 5)


def test_marking_in_colour_and_in_brackets(byte_tokenizer):
    ids = np.array(byte_tokenizer.encode("Hello there! How are you doing today?"))
    trained = np.zeros(len(ids), dtype=bool)
    trained[2:4] = True
    plain = render_marked(byte_tokenizer, ids, trained, colour=False)
    coloured = render_marked(byte_tokenizer, ids, trained, colour=True)
    inner = byte_tokenizer.decode(ids[2:4].tolist())
    assert f"[[{inner}]]" in plain and plain.replace("[[", "").replace("]]", "") == byte_tokenizer.decode(ids.tolist())
    assert f"{GREEN}{inner}{RESET}" in coloured


def test_a_memory_preparation_shows_a_whole_dialogue_with_its_sessions(tmp_path, tiny_model_dir):
    from helpers import FIXTURES

    from dialogtune.config import build_config
    from dialogtune.prepare import prepare

    prepare(build_config({"data": {"path": str(FIXTURES / "msc_parlai.jsonl")}, "task": {"name": "memory"},
                          "split": {"validation": 0.0}, "model": {"name": str(tiny_model_dir)},
                          "output": str(tmp_path / "p")}), quiet=True)
    shown = inspect(tmp_path / "p", index=0, colour=False)
    assert shown.startswith("train dialogue 0 of 3 (demo_1): 9 turns in 3 session(s)")
    assert "A:[[ Hi there! I just got stung" in shown
    assert "both girls!\n]][session 3, 5 hours later]\nA:[[ How are the twins sleeping" in shown
    with pytest.raises(DataError, match="out of range: this split has 3 dialogues"):
        inspect(tmp_path / "p", index=3, colour=False)
