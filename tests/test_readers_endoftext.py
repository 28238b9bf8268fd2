"""DialoGPT-style `<|endoftext|>` samples: a JSON list of strings or one sample per line."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from helpers import FIXTURES, turn_pairs

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.errors import DataError
from dialogtune.readers import endoftext


def test_json_list_of_samples():
    path = FIXTURES / "dialogpt_samples.json"
    out = list(endoftext.read(path))
    assert all(isinstance(o, Dialogue) for o in out)
    assert [d.id for d in out] == ["dialogpt_samples.json#0", "dialogpt_samples.json#1", "dialogpt_samples.json#2"]
    assert all(d.source == str(path) and d.line is None for d in out)
    assert turn_pairs(out[0]) == [
        ("A", "Does money buy happiness?"),
        ("B", "Depends how much money you spend on it."),
        ("A", "What is the best way to buy happiness?"),
    ]
    # Runs of spaces are collapsed; the empty part between two separators is dropped but keeps
    # its place in the alternation (a speaker who said nothing), so the others keep their names.
    assert turn_pairs(out[1]) == [
        ("A", "Hi, how was the concert?"),
        ("B", "Loud. Really loud."),
        ("B", "Worth it though?"),
        ("A", "Absolutely."),
    ]
    assert turn_pairs(out[2]) == [("A", "Anyone up for pizza tonight?")]


def test_text_file_one_sample_per_line():
    path = FIXTURES / "dialogpt_samples.txt"
    out = list(endoftext.read(path))
    dialogues = [o for o in out if isinstance(o, Dialogue)]
    rejects = [o for o in out if isinstance(o, Reject)]
    # The blank line 2 is skipped; numbering counts samples, so the reject takes #2.
    assert [(d.id, d.line) for d in dialogues] == [
        ("dialogpt_samples.txt#0", 1),
        ("dialogpt_samples.txt#1", 3),
        ("dialogpt_samples.txt#3", 5),
    ]
    assert turn_pairs(dialogues[1]) == [("A", "What time is the game?"), ("B", "Kickoff at seven."),
                                    ("A", "I will bring snacks.")]
    assert turn_pairs(dialogues[2]) == [("A", "The café on Main St. closed."), ("B", "No way, I loved their croissants!")]
    assert [(r.line, r.item, r.reason) for r in rejects] == [(4, None, "sample has no text")]
    assert str(rejects[0]) == f"{path}:4: sample has no text"


def test_gzipped_text_reads_the_same(tmp_path):
    plain = FIXTURES / "dialogpt_samples.txt"
    packed = tmp_path / "dialogpt_samples.txt.gz"
    with open(plain, "rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    expected = [(type(o).__name__, getattr(o, "line", None), turn_pairs(o) if isinstance(o, Dialogue) else o.reason)
                for o in endoftext.read(plain)]
    got = [(type(o).__name__, getattr(o, "line", None), turn_pairs(o) if isinstance(o, Dialogue) else o.reason)
           for o in endoftext.read(packed)]
    assert got == expected


def test_non_string_items_in_json_list_are_rejected(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(["Hi<|endoftext|>Hello", {"text": "Hi"}, 42, "<|endoftext|>  "]))
    out = list(endoftext.read(path))
    assert isinstance(out[0], Dialogue) and turn_pairs(out[0]) == [("A", "Hi"), ("B", "Hello")]
    assert [(r.line, r.item, r.reason) for r in out[1:]] == [
        (None, "[1]", "expected a string, got dict"),
        (None, "[2]", "expected a string, got int"),
        (None, "[3]", "sample has no text"),
    ]


def test_json_that_is_not_a_list_is_a_data_error(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"samples": ["a<|endoftext|>b"]}')
    with pytest.raises(DataError, match="expected a JSON list of strings"):
        list(endoftext.read(path))


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  "a<|endoftext|>b",\n  "c<|endoftext|>d"\n')
    with pytest.raises(DataError, match=r"broken\.json:\d+:\d+: malformed JSON"):
        list(endoftext.read(path))
