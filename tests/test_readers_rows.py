"""Record-per-example rows: `{input, response, contexts?}` pairs and `{dialogue, summary}` records,
from JSON, JSONL, CSV, Parquet and `datasets` directories."""

from __future__ import annotations

import json

import pytest
from helpers import FIXTURES, SHARED_DATA, split_items, turn_pairs

from dialogtune.errors import DataError
from dialogtune.readers import detect_format, read_dialogues, rows

SAMSUM_REAL = SHARED_DATA / "samsum" / "validation.json"




def test_jsonl_pairs():
    path = FIXTURES / "pairs.jsonl"
    dialogues, _ = split_items(rows.read(path))
    # Ids come from the `id` field, else file name and record number (blank lines do not count).
    assert [(d.id, d.line) for d in dialogues] == [("pair-1", 1), ("pair-2", 2), ("pairs.jsonl#4", 6)]
    assert turn_pairs(dialogues[0]) == [
        ("user", "What is the capital of Australia?"),
        ("assistant", "Canberra, not Sydney as many people think."),
    ]
    assert dialogues[0].meta == {}
    assert turn_pairs(dialogues[1])[1] == ("assistant", "Try 'The Left Hand of Darkness' by Ursula K. Le Guin.")
    assert dialogues[1].meta == {"system": "You are a helpful librarian.\nKeep answers short."}
    assert dialogues[2].meta == {}  # empty contexts list: no system text


def test_jsonl_bad_lines_are_rejected_with_line_numbers():
    path = FIXTURES / "pairs.jsonl"
    _, rejects = split_items(rows.read(path))
    assert [(r.source, r.line, r.item) for r in rejects] == [(str(path), 3, None), (str(path), 4, None)]
    assert rejects[0].reason.startswith("malformed JSON: ")
    assert rejects[1].reason == "needs string fields 'input' and 'response'"


def test_csv_pairs():
    path = FIXTURES / "pairs.csv"
    dialogues, rejects = split_items(rows.read(path))
    assert [(d.id, d.line, turn_pairs(d)) for d in dialogues] == [
        ("pairs.csv#0", 2, [
            ("user", "How do I boil an egg?"),
            ("assistant", "Put it in boiling water for about nine minutes, then cool it in cold water."),
        ]),
        ("pairs.csv#1", 3, [("user", "What's 12 times 12?"), ("assistant", "144")]),
    ]
    assert [(r.line, r.reason) for r in rejects] == [
        # An unquoted comma would otherwise cut the response to "Hola".
        (4, "row has 3 fields, the header has 2"),
        (5, "empty 'response'"),
    ]


def test_csv_with_extra_fields_and_no_known_columns_is_a_reject_not_a_crash(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("question,answer\nWhy?,Because.\nHow?,Like, this\n")
    _, rejects = split_items(rows.read(path))
    assert [(r.line, r.reason) for r in rejects] == [
        (2, "expected fields input/response or dialogue/summary, got ['answer', 'question']"),
        (3, "row has 3 fields, the header has 2"),
    ]


def test_samsum_style_dialogues_with_summaries():
    path = FIXTURES / "samsum_like.json"
    dialogues, rejects = split_items(rows.read(path))
    assert [d.id for d in dialogues] == ["s001", "s002", "s003"]
    assert all(d.line is None for d in dialogues)
    assert turn_pairs(dialogues[0]) == [
        ("Nora", "Hi, do you still have the key to the garden shed?"),
        ("Owen", "Let me look"),
        ("Owen", "No, I gave it back."),
        ("Owen", "Ask Petra"),
        ("Nora", "I barely know her"),
        ("Owen", "Just text her, she's friendly"),
    ]
    assert dialogues[0].meta == {"summary": "Nora needs the garden shed key. Owen returned it, so she should ask"
                                            " Petra."}
    # A line without a speaker (an attachment placeholder) is kept as narration.
    assert turn_pairs(dialogues[1]) == [
        ("Ivo", "TRAIN IS LATE!"),
        ("Mila", "Again?? 2nd time this week"),
        (None, "<file_photo>"),
        ("Ivo", "Look at this crowd ;)"),
    ]
    # An empty `Luke:` line is dropped; an empty summary is not kept.
    assert turn_pairs(dialogues[2]) == [("Sam", "Are you coming tonight?"), ("Sam", "?")]
    assert dialogues[2].meta == {}
    assert [(r.line, r.item, r.reason) for r in rejects] == [(None, "[3]", "empty 'dialogue'")]


def test_json_data_wrapper_and_bad_records(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [
        {"input": "Hi", "response": "Hello!", "contexts": "be nice"},
        {"input": "Hi", "response": "Hello!", "contexts": ["be nice", 3]},
        ["not", "an", "object"],
        {"question": "Why?", "answer": "Because."},
        {"input": "   ", "response": "Hello!"},
        {"dialogue": 5, "summary": "x"},
    ]}))
    dialogues, rejects = split_items(rows.read(path))
    assert dialogues == []
    assert [(r.item, r.reason) for r in rejects] == [
        ("[0]", "'contexts' must be a list of strings"),
        ("[1]", "'contexts' must be a list of strings"),
        ("[2]", "expected an object, got list"),
        ("[3]", "expected fields input/response or dialogue/summary, got ['answer', 'question']"),
        ("[4]", "empty 'input'"),
        ("[5]", "needs a string field 'dialogue'"),
    ]


def test_unsupported_suffix_and_non_list_json(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("input\tresponse\nhi\thello\n")
    with pytest.raises(DataError, match="rows must be .json, .jsonl, .csv, .parquet or a datasets directory"):
        list(rows.read(tsv))
    obj = tmp_path / "obj.json"
    obj.write_text('{"input": "hi", "response": "hello"}')
    with pytest.raises(DataError, match="expected a JSON list of records"):
        list(rows.read(obj))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    table = pa.table({
        "input": ["What's the tallest mountain?", "Name a prime number.", None],
        "response": ["Mount Everest.", "Seven.", "Orphan response."],
        "contexts": [["You are a geography tutor."], None, None],
    })
    pq.write_table(table, path, row_group_size=2)  # two row groups: numbering runs across batches
    assert detect_format(path) == "rows"
    dialogues, rejects = split_items(read_dialogues(path))
    assert [(d.id, d.line, turn_pairs(d), d.meta) for d in dialogues] == [
        ("pairs.parquet#0", None, [("user", "What's the tallest mountain?"), ("assistant", "Mount Everest.")],
         {"system": "You are a geography tutor."}),
        ("pairs.parquet#1", None, [("user", "Name a prime number."), ("assistant", "Seven.")], {}),
    ]
    assert [(r.item, r.reason) for r in rejects] == [("[2]", "needs string fields 'input' and 'response'")]


def test_datasets_directory(tmp_path):
    import datasets

    records = [
        {"id": "s1", "dialogue": "Kate: Lunch at 1?\r\nTom: Sure, see you there.",
         "summary": "Kate and Tom meet at 1."},
        {"id": "s2", "dialogue": "Ola: Did you feed the cat?\r\nPiotr: Yes, twice.", "summary": "Piotr fed the cat."},
    ]
    folder = tmp_path / "samsum_saved"
    datasets.Dataset.from_list(records).save_to_disk(str(folder))
    assert detect_format(folder) == "rows"
    dialogues, rejects = split_items(read_dialogues(folder))
    assert rejects == []
    assert [(d.id, d.line, turn_pairs(d), d.meta["summary"]) for d in dialogues] == [
        ("s1", None, [("Kate", "Lunch at 1?"), ("Tom", "Sure, see you there.")], "Kate and Tom meet at 1."),
        ("s2", None, [("Ola", "Did you feed the cat?"), ("Piotr", "Yes, twice.")], "Piotr fed the cat."),
    ]

    several = tmp_path / "with_splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:1]),
                          "validation": datasets.Dataset.from_list(records[1:])}).save_to_disk(str(several))
    with pytest.raises(DataError, match=r"holds several splits \(train, validation\); point at one of them"):
        list(rows.read(several))


@pytest.mark.skipif(not SAMSUM_REAL.exists(), reason="shared SAMSum data not available")
def test_real_samsum_validation():
    assert detect_format(SAMSUM_REAL) == "rows"
    raw = json.loads(SAMSUM_REAL.read_text(encoding="utf-8"))
    dialogues, rejects = split_items(rows.read(SAMSUM_REAL))
    assert rejects == []
    assert len(dialogues) == 818
    assert [d.id for d in dialogues] == [r["id"] for r in raw]
    for dialogue in dialogues:
        assert dialogue.meta["summary"]
        assert len(dialogue.speakers()) >= 2
        assert all(t.text for t in dialogue.turns)
    first = dialogues[0]
    assert first.id == "13817023"
    # Curly apostrophes are straightened by clean_text.
    assert turn_pairs(first)[:2] == [("A", "Hi Tom, are you busy tomorrow's afternoon?"),
                                 ("B", "I'm pretty sure I am. What's up?")]
