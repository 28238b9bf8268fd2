"""Format detection and dispatch: every fixture, `.gz` transparency, and the errors."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from helpers import FIXTURES, SHARED_DATA

from dialogtune.dialogue import Dialogue
from dialogtune.errors import DataError
from dialogtune.readers import FORMATS, detect_format, read_dialogues

EXPECTED = {
    "msc_sample.json": "msc",
    "msc_parlai.jsonl": "msc",
    "dialogpt_samples.json": "endoftext",
    "dialogpt_samples.txt": "endoftext",
    "transcript.txt": "transcript",
    "script.csv": "script_csv",
    "script_custom.csv": "script_csv",
    "rick_and_morty.csv": "script_csv",
    "dialogues_test.txt": "dailydialog",
    "pairs.jsonl": "rows",
    "pairs.csv": "rows",
    "samsum_like.json": "rows",
    "samsum_shaped.json": "rows",
    "sgd": "sgd",
    "sgd/dialogues_001.json": "sgd",
    "retrieval/sgd": "sgd",
    "retrieval/sgd/dialogues_001.json": "sgd",
    "sgd_calls/dialogues_001.json": "sgd",
    "messages.jsonl": "messages",
    "personachat.txt": "parlai",
}

OPTIONS = {"script_custom.csv": {"columns": {"episode": "ep", "speaker": "who", "text": "said"}}}


@pytest.mark.parametrize(("name", "fmt"), sorted(EXPECTED.items()))
def test_detects_every_fixture(name, fmt):
    assert detect_format(FIXTURES / name) == fmt


def test_every_fixture_file_is_covered():
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()}
    schemas = {"sgd/schema.json", "retrieval/sgd/schema.json"}  # read with their dialogues, never alone
    assert on_disk - schemas == set(EXPECTED) - {"sgd", "retrieval/sgd"}


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if not n.endswith("sgd")))
def test_gzip_is_transparent(tmp_path, name):
    source = FIXTURES / name
    packed = tmp_path / (source.name + ".gz")
    with open(source, "rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert detect_format(packed) == EXPECTED[name]

    def summary(path):
        return [(type(o).__name__, o.id if isinstance(o, Dialogue) else o.reason,
                 [(t.speaker, t.text) for t in o.turns] if isinstance(o, Dialogue) else (o.line, o.item))
                for o in read_dialogues(path, **OPTIONS.get(name, {}))]

    plain = summary(source)
    # Ids built from the file name carry the `.gz`; everything else must be identical.
    assert summary(packed) == [(kind, ident.replace(source.name, packed.name) if isinstance(ident, str) else ident,
                                rest) for kind, ident, rest in plain]


def test_read_dialogues_dispatches_to_the_named_format():
    out = list(read_dialogues(FIXTURES / "script_custom.csv", fmt="script_csv",
                              columns={"episode": "ep", "speaker": "who", "text": "said"}))
    assert [d.id for d in out] == ["script_custom.csv#1", "script_custom.csv#2"]


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(DataError) as err:
        read_dialogues(FIXTURES / "transcript.txt", fmt="xml")
    assert str(err.value) == ("unknown format 'xml'; known formats: "
                              "msc, endoftext, transcript, script_csv, rows, sgd, messages, parlai, dailydialog")
    assert list(FORMATS) == ["msc", "endoftext", "transcript", "script_csv", "rows", "sgd", "messages", "parlai",
                             "dailydialog"]


def test_undetectable_json_names_the_formats(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"learning_rate": 0.0001, "epochs": 3}')
    with pytest.raises(DataError, match=r"cannot tell the format; name it with --format \(msc, endoftext, "
                                        r"transcript, script_csv, rows, sgd, messages, parlai, dailydialog\)"):
        detect_format(path)


def test_missing_file():
    missing = FIXTURES / "no_such_file.jsonl"
    with pytest.raises(DataError, match=r"no_such_file\.jsonl: no such file or directory"):
        read_dialogues(missing)


def test_directory_that_is_neither_sgd_nor_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="neither SGD"):
        detect_format(tmp_path)


def test_parlai_field_layout_and_gzipped_name_suffix(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("text:hi\tlabels:hello\tepisode_done:True\n")
    assert detect_format(path) == "parlai"
    packed = tmp_path / "train.JSONL.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as fh:
        fh.write('{"input": "hi", "response": "hello"}\n')
    assert detect_format(packed) == "rows"


def test_dailydialog_needs_most_lines_to_hold_markers(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Ann: Did you see `__eou__` in that file?\nBen: Yes.\nAnn: Odd.\n")
    assert detect_format(path) == "transcript"
    path.write_text("2 tickets , please . __eou__ Here you are . __eou__\nBen: an odd line\n"
                    "Hello . __eou__ Hi . __eou__\n")
    assert detect_format(path) == "dailydialog"  # before parlai, which a leading number would suggest


def test_parlai_msc_episodes_are_told_from_messages_by_their_keys(tmp_path):
    # The first line is longer than the 4 KB head, and its text mentions the other formats' keys.
    text = 'He said "messages" and "conversations" twice. ' * 120
    episode = {"personas": [["I fish."], ["I sing."]], "dialog": [{"id": "Speaker 1", "text": text}],
               "previous_dialogs": [{"dialog": [{"text": "Hi."}], "time_num": 2, "time_unit": "days"}]}
    for name in ("session_2.jsonl", "valid.txt", "episodes.json"):
        path = tmp_path / name
        path.write_text(json.dumps(episode) + "\n")
        assert len(path.read_text().splitlines()[0]) > 4096
        assert detect_format(path) == "msc", name
    # A bare `dialog` list is not enough, and a `messages` line stays `messages`.
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"dialog": [{"text": "Hi."}], "messages": [{"role": "user", "content": "Hi."}]}) + "\n")
    assert detect_format(path) == "messages"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "my personas and previous_dialogs"}]}) + "\n")
    assert detect_format(path) == "messages"


@pytest.mark.skipif(not (SHARED_DATA / "msc").exists(), reason="shared MSC data not available")
def test_detects_both_real_msc_shapes():
    assert detect_format(SHARED_DATA / "msc" / "msc_session3_valid.jsonl") == "msc"
    assert detect_format(SHARED_DATA / "msc" / "msc_dialog_samples.json") == "msc"
