"""`prepare` end to end on a tiny model: counts, rejects, splits, cache, strictness."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys

import datasets
import pytest
from helpers import FIXTURES

from dialogtune.config import build_config
from dialogtune.errors import ConfigError, DataError, StrictError
from dialogtune.prepare import prepare, tokenizer_hash
from dialogtune.tokenize import IGNORE_INDEX

TRANSCRIPT = """Narrator: no, this line is narration because of the speakers list.
Alice: Hello Bob, how are you?
Bob: Fine, thanks. (smiles) And you?
Alice: Not bad at all.
Bob: Good to hear.

Alice: Where were we?
Bob:
Bob: At the station.
---
Carol: Nobody named Bob speaks in this scene.
Alice: Indeed.
"""


def make_config(tmp_path, model_dir, **overrides):
    data = tmp_path / "play.txt"
    data.write_text(TRANSCRIPT, encoding="utf-8")
    raw = {
        "data": {"path": str(data), "format": "transcript", "speakers": ["Alice", "Bob", "Carol"]},
        "task": {"as": "Bob"},
        "split": {"validation": 0.0},
        "model": {"name": str(model_dir)},
        "template": {"name": "transcript"},
        "max_length": 128,
        "output": str(tmp_path / "out"),
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return build_config(raw)


def test_prepare_writes_dataset_stats_rejects_and_manifest(tmp_path, tiny_model_dir):
    result = prepare(make_config(tmp_path, tiny_model_dir), quiet=True)
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    assert result.stats == stats and not result.cache_hit
    assert stats["dialogues_read"] == 3  # three scenes
    assert stats["examples"] == 2  # Carol's scene has no Bob turn
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["stage"], r["reason"]) for r in rejects] == [
        (8, "read", "empty text after speaker 'Bob'"),
        (11, "unused", "no turn by Bob"),
    ]
    assert stats["rejected"] == 2
    train = datasets.load_from_disk(str(out / "train"))
    assert len(train) == 2 and not (out / "validation").exists()  # validation: 0 writes no split
    manifest = json.loads((out / "prepare.json").read_text())
    assert manifest["template"]["name"] == "transcript" and manifest["template"]["end_of_turn"] == "\n"
    assert manifest["stop_strings"] == ["\n", "\nAlice:", "\nCarol:"]
    assert manifest["speakers_as"] == ["Bob"]
    assert len(manifest["fingerprint"]) == 32
    # Exactly Bob's lines (and their newline) are trained.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(tokenizer)  # what train checks its tokenizer against
    row = train[0]
    ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    lines = [line.strip() for line in tokenizer.decode(ids).strip().split("\n")]
    assert lines == ["Fine, thanks. (smiles) And you?", "Good to hear."]
    assert stats["trained_tokens"] == sum(
        sum(1 for label in r["labels"] if label != IGNORE_INDEX) for r in train)


def test_second_identical_run_is_a_cache_hit_and_a_change_is_not(tmp_path, tiny_model_dir, capsys):
    config = make_config(tmp_path, tiny_model_dir)
    prepare(config, quiet=True)
    assert prepare(config).cache_hit
    assert "cache hit" in capsys.readouterr().out
    changed = make_config(tmp_path, tiny_model_dir, max_length=96)
    assert not prepare(changed, quiet=True).cache_hit
    (tmp_path / "play.txt").write_text(TRANSCRIPT + "Bob: One more line.\n", encoding="utf-8")
    assert not prepare(changed, quiet=True).cache_hit  # same config, new data


def test_strict_stops_at_the_first_bad_record(tmp_path, tiny_model_dir):
    with pytest.raises(StrictError, match=r"play.txt:8: empty text after speaker 'Bob' \(stopped: --strict\)"):
        prepare(make_config(tmp_path, tiny_model_dir, strict=True), quiet=True)


def test_unknown_speaker_lists_the_speakers_that_occur(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, task={"as": "Bobby"})
    with pytest.raises(DataError, match=r"speaker 'Bobby' never occurs in 3 dialogues; speakers that do: Alice \(4\), Bob"):
        prepare(config, quiet=True)


def test_respond_without_as_says_who_could_be(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, task={"as": None})
    with pytest.raises(ConfigError, match=r"task.as \(--as\) is required.*Alice \(4\)"):
        prepare(config, quiet=True)


def test_split_is_by_dialogue_and_seeded(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."},
                          {"role": "user", "content": "More?"},
                          {"role": "assistant", "content": f"Yes {i}."}], "id": f"conv{i}"} for i in range(20)]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def run(seed, out):
        config = build_config({"data": {"path": str(data)}, "task": {"as": "assistant", "context": {"rounds": 1}},
                               "split": {"validation": 0.25, "seed": seed}, "model": {"name": str(tiny_model_dir)},
                               "template": {"name": "chatml"}, "output": str(tmp_path / out)})
        prepare(config, quiet=True)
        splits = {s: datasets.load_from_disk(str(tmp_path / out / s)) for s in ("train", "validation")}
        return {s: [d for row in ds["dialogue_ids"] for d in row] for s, ds in splits.items()}

    first = run(0, "a")
    assert len(first["train"]) == 30 and len(first["validation"]) == 10  # 2 windows per conversation
    assert not set(first["train"]) & set(first["validation"])  # no conversation on both sides
    assert run(0, "b") == first
    assert run(1, "c")["validation"] != first["validation"]


def test_packing_fills_rows_and_reports_efficiency(tmp_path, tiny_model_dir):
    rows = [{"input": f"Summarize the following dialogue:\nA: hi {i}\nB: hello", "response": f"They greet {i}."}
            for i in range(30)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = build_config({"data": {"path": str(data)}, "task": {"as": "assistant"}, "split": {"validation": 0},
                           "model": {"name": str(tiny_model_dir)}, "template": {"name": "user_assistant"},
                           "max_length": 256, "pack": True, "output": str(tmp_path / "packed")})
    stats = prepare(config, quiet=True).stats["splits"]["train"]
    assert stats["examples"] == 30 and stats["rows"] < 30
    assert stats["packing_efficiency"] == pytest.approx(stats["tokens"] / (stats["rows"] * 256), abs=1e-4)
    assert stats["padding_fraction"] == pytest.approx(1 - stats["packing_efficiency"], abs=1e-4)
    train = datasets.load_from_disk(str(tmp_path / "packed" / "train"))
    assert sum(len(r) for r in train["dialogue_ids"]) == 30
    assert all(len(r) <= 256 for r in train["input_ids"])


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, tiny_model_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a prepared dataset"):
        prepare(make_config(tmp_path, tiny_model_dir), quiet=True)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_tokenizer_without_pad_token_is_noted_not_fatal(tmp_path, metaspace_tokenizer):
    assert metaspace_tokenizer.pad_token is None
    model_dir = tmp_path / "no-pad"
    metaspace_tokenizer.save_pretrained(model_dir)
    config = make_config(tmp_path, model_dir, output=str(tmp_path / "np"))
    prepare(config, quiet=True)
    tokenizer_info = json.loads((tmp_path / "np" / "prepare.json").read_text())["tokenizer"]
    assert tokenizer_info["pad_token_id"] == metaspace_tokenizer.eos_token_id
    assert "no pad token" in tokenizer_info["pad_note"] and "never learned from" in tokenizer_info["pad_note"]


def test_strict_also_holds_on_a_cache_hit(tmp_path, tiny_model_dir):
    prepare(make_config(tmp_path, tiny_model_dir), quiet=True)
    with pytest.raises(StrictError, match=r"empty text after speaker 'Bob' \(stopped: --strict; 1 bad records"):
        prepare(make_config(tmp_path, tiny_model_dir, strict=True), quiet=True)


def test_warnings_for_a_missing_speaker_and_a_missing_validation_split(tmp_path, tiny_model_dir, capsys):
    config = make_config(tmp_path, tiny_model_dir, task={"as": ["Bob", "Bobb"]}, split={"validation": 0.5})
    (tmp_path / "play.txt").write_text("Alice: Hi.\nBob: Hello.\n", encoding="utf-8")
    stats = prepare(config, quiet=True).stats
    assert stats["warnings"][0] == (
        "no validation split: the examples come from 1 dialogue(s), and a split needs at least two (a transcript is"
        " one dialogue per scene, and only blank lines and `---` lines end a scene); add dialogues, or set"
        " split.validation: 0")
    assert stats["warnings"][1] == "speaker 'Bobb' never occurs (speakers: Alice, Bob)"
    assert "warning: speaker 'Bobb' never occurs" in capsys.readouterr().err
    again = prepare(config, quiet=True)  # a cache hit: the data is no different, so neither are the warnings
    assert again.cache_hit
    assert capsys.readouterr().err.splitlines() == [f"warning: {w}" for w in stats["warnings"]]


def test_output_that_is_a_file_and_unreadable_gzip_are_clear_errors(tmp_path, tiny_model_dir):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(DataError, match="is a file; the output must be a directory"):
        prepare(make_config(tmp_path, tiny_model_dir), quiet=True)
    fake = tmp_path / "chats.jsonl.gz"
    fake.write_text('{"messages": []}\n')
    config = build_config({"data": {"path": str(fake), "format": "messages"}, "task": {"as": "assistant"},
                           "model": {"name": str(tiny_model_dir)}, "template": {"name": "chatml"},
                           "output": str(tmp_path / "o2")})
    with pytest.raises(DataError, match=r"chats.jsonl.gz: cannot read \(BadGzipFile"):
        prepare(config, quiet=True)


def file_config(tmp_path, model_dir, data_file, **overrides):
    """A job on one data file, as `dialogtune prepare FILE --as ...` builds it."""
    raw = {"data": {"path": str(data_file)}, "task": {"as": "*"}, "model": {"name": str(model_dir)},
           "template": {"name": "transcript"}, "max_length": 256, "output": str(tmp_path / "out")}
    return build_config({**raw, **overrides})


def test_script_csv_episodes_are_split_and_windows_stay_inside_them(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    data = FIXTURES / "rick_and_morty.csv"
    config = file_config(tmp_path, tiny_model_dir, data, task={"as": "Rick", "context": {"rounds": 2}},
                         split={"validation": 0.5})
    stats = prepare(config, quiet=True).stats
    assert stats["dialogues_read"] == 4 and stats["warnings"] == []
    assert stats["examples"] == 7  # Rick speaks 3 + 1 + 2 + 1 times in s1e1, s1e2, s2e1, s2e2
    assert (stats["splits"]["train"]["dialogues"], stats["splits"]["validation"]["dialogues"]) == (2, 2)
    episodes: dict[str, set[str]] = {}  # dialogue id -> its "Name: line" lines
    with open(data, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            episode = f"rick_and_morty.csv#s{row['season no.']}e{row['episode no.']}"
            episodes.setdefault(episode, set()).add(f"{row['name']}: {row['line']}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    seen = set()
    for split in ("train", "validation"):
        for row in datasets.load_from_disk(str(tmp_path / "out" / split)):
            (episode,) = row["dialogue_ids"]
            lines = tokenizer.decode(row["input_ids"], skip_special_tokens=True).splitlines()
            assert lines[-1].startswith("Rick: ") and 1 <= len(lines) <= 3
            assert set(lines) <= episodes[episode], (episode, lines)  # no line from another episode
            seen.add(episode)
    assert seen == set(episodes)


@pytest.mark.parametrize(("name", "text", "hint"), [
    ("lines.csv", "speaker,text\nAnn,Hi.\nBen,Hello.\n",
     (" (a script CSV is one dialogue per episode, and the whole file is one when it has no episode or scene column:"
      " name it with data.columns.episode)")),
    ("chats.jsonl", '{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}\n',
     ""),
    ("dialogues_validation.txt", "Hi . __eou__ Hello . __eou__\n", ""),
])
def test_no_validation_split_warning_says_what_applies_to_the_format(tmp_path, tiny_model_dir, name, text, hint):
    data = tmp_path / name
    data.write_text(text)
    stats = prepare(file_config(tmp_path, tiny_model_dir, data, split={"validation": 0.2}), quiet=True).stats
    assert stats["warnings"] == [
        "no validation split: the examples come from 1 dialogue(s), and a split needs at least two"
        + hint + "; add dialogues, or set split.validation: 0"
    ]


def test_dailydialog_is_read_as_one_dialogue_a_line(tmp_path, tiny_model_dir):
    stats = prepare(file_config(tmp_path, tiny_model_dir, FIXTURES / "dialogues_test.txt"), quiet=True).stats
    assert (stats["dialogues_read"], stats["examples"], stats["warnings"]) == (12, 12, [])
    assert stats["speakers"] == {"A": 27, "B": 19}
    assert stats["splits"]["validation"]["dialogues"] == 1


def test_mostly_narration_warns_and_strict_refuses(tmp_path, tiny_model_dir, capsys):
    data = FIXTURES / "dialogues_test.txt"
    note = (f"{data}: 10 of 12 lines (83%) have no `Name:` speaker tag and were read as narration;"
            " __eou__ turn separators in 10 of them: --format dailydialog")
    forced = {"path": str(data), "format": "transcript"}
    with pytest.raises(StrictError) as err:
        prepare(file_config(tmp_path, tiny_model_dir, data, data=forced, strict=True), quiet=True)
    assert str(err.value) == f"{note} (stopped: --strict)"
    stats = prepare(file_config(tmp_path, tiny_model_dir, data, data=forced), quiet=True).stats
    assert stats["dialogues_read"] == 1 and stats["reader_notes"] == [note]
    assert stats["warnings"][0] == note
    assert f"warning: {note}" in capsys.readouterr().err
    with pytest.raises(StrictError) as err:  # the same preparation, now a cache hit
        prepare(file_config(tmp_path, tiny_model_dir, data, data=forced, strict=True), quiet=True)
    assert str(err.value) == f"{note} (stopped: --strict)"


def test_a_quiet_preparation_draws_no_bars_and_leaves_the_setting(tmp_path, tiny_model_dir, capfd):
    import datasets

    prepare(make_config(tmp_path, tiny_model_dir), quiet=True)
    assert "Saving the dataset" not in capfd.readouterr().err  # eval and train prepare quietly
    assert not datasets.are_progress_bars_disabled()


def test_tool_calls_train_sgd_calls_with_the_shipped_tool_template(tmp_path, tiny_model_dir, capsys):
    """The tiny model's own template is plain ChatML (no calls, like SmolLM2's): chatml_tools is
    used, said, and recorded in prepare.json, which is what chat, generate and serve render with."""
    config = make_config(tmp_path, tiny_model_dir, data={"path": str(FIXTURES / "sgd_calls"), "format": "sgd"},
                         task={"as": "SYSTEM", "tool_calls": True}, template={"name": "model"}, max_length=4096)
    stats = prepare(config, quiet=True).stats
    assert "task.tool_calls renders with the shipped 'chatml_tools' template" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert manifest["template"]["name"] == "chatml_tools" and manifest["template"]["end_of_turn"] == "<|im_end|>"
    assert manifest["config"]["task"]["tool_calls"] is True
    # Both calls written; of the search's 4 results, the one past the first 3 left out, and counted.
    assert stats["tool_calls"] == {"calls": 2, "results": 5, "results_left_out": 1, "results_shown_per_call": 3}
    row = datasets.load_from_disk(str(tmp_path / "out" / "train"))[0]
    assert row["trained_messages"][0] == ""  # the call: its text is the template's, not a content
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trained = tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])
    assert trained.startswith('<tool_call>\n{"name": "Events_1__FindEvents", "arguments": {"category": "Music"')
    assert '"count": 4' in tokenizer.decode(row["input_ids"]) and '"count"' not in trained  # read, never trained


def test_tool_calls_need_data_that_records_them(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="only sgd data records the service calls behind replies, and transcript"):
        prepare(make_config(tmp_path, tiny_model_dir, task={"tool_calls": True}), quiet=True)
    with pytest.raises(ConfigError, match="task.tool_calls belongs to the respond task, not summarize"):
        prepare(make_config(tmp_path, tiny_model_dir, task={"name": "summarize", "tool_calls": True}), quiet=True)


# -- streaming: num_proc, the packing buffer, shards ---------------------------------------
def varied_chats(path, count=60):
    """Conversations that exercise every path: some too long to keep a turn (tokenize rejects),
    some with no assistant turn (unused), malformed lines (read rejects), several sessions."""
    lines = []
    for i in range(count):
        reply = " ".join(["a long answer"] * 40) if i % 11 == 3 else f"Answer {i}, the station is near."
        messages = [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": reply},
                    {"role": "user", "content": "And then?"}, {"role": "assistant", "content": f"Then {i}."}]
        if i % 13 == 5:
            messages = messages[:1]
        lines.append(json.dumps({"id": f"chat{i}", "messages": messages}))
        if i % 17 == 2:
            lines.append("{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def chats_config(tmp_path, model_dir, out, **overrides):
    raw = {"data": {"path": str(varied_chats(tmp_path / "chats.jsonl"))},
           "task": {"as": "assistant", "context": {"rounds": 1}}, "split": {"validation": 0.25, "seed": 1},
           "model": {"name": str(model_dir)}, "template": {"name": "chatml"}, "max_length": 64, "pack": True,
           "output": str(tmp_path / out)}
    return build_config({**raw, **overrides})


def read_preparation(out):
    """Every row of both splits, the stats without timings, and rejects.jsonl as written."""
    splits = {s: datasets.load_from_disk(str(out / s)).to_list() for s in ("train", "validation")}
    stats = json.loads((out / "stats.json").read_text())
    for volatile in ("seconds", "dialogues_per_s", "tokens_per_s", "peak_rss_mb"):
        stats.pop(volatile)
    return splits, stats, (out / "rejects.jsonl").read_text()


def test_two_tokenizing_processes_give_the_same_preparation_as_one(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("dialogtune.prepare.BATCH", 4)  # many batches, so the workers' order matters
    one = prepare(chats_config(tmp_path, tiny_model_dir, "one", num_proc=1), quiet=True)
    two = prepare(chats_config(tmp_path, tiny_model_dir, "two", num_proc=2), quiet=True)
    splits, stats, rejects = read_preparation(tmp_path / "one")
    assert read_preparation(tmp_path / "two") == (splits, stats, rejects)
    # The data has all it should: both splits, rejects of every stage, cut turns.
    assert stats["rejected_by_reason"] == {
        "tokenize: trained turn … (assistant) does not fit in max_length=… tokens with the turn it answers;"
        " raise max_length to keep it": 6, "unused: no turn by assistant": 5,
        "read: malformed JSON: unexpected character, expected a string key (column …)": 4}
    stages = [r["stage"] for r in map(json.loads, rejects.splitlines())]
    assert stages[9:] == ["tokenize"] * 6  # as before streaming: the readers' and tasks' rejects, in order, then these
    assert len(splits["train"]) and len(splits["validation"])
    # num_proc is not part of the fingerprint: the same preparation, so the second is a cache hit.
    again = chats_config(tmp_path, tiny_model_dir, "one", num_proc=2)
    assert prepare(again, quiet=True).cache_hit and one.stats == prepare(again, quiet=True).stats
    assert not two.cache_hit


def examples_of_rows(rows):
    """The examples packed rows hold, each as (input_ids, labels), cut where position_ids restart."""
    out = []
    for row in rows:
        starts = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        out += [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in itertools.pairwise(starts)]
    return out


def test_a_packing_buffer_larger_than_the_data_gives_the_whole_set_packing(tmp_path, tiny_model_dir):
    import numpy as np

    from dialogtune.packing import pack_best_fit, rows_to_table

    plain = prepare(chats_config(tmp_path, tiny_model_dir, "plain", pack=False), quiet=True)
    packed = prepare(chats_config(tmp_path, tiny_model_dir, "packed", pack_buffer=1000), quiet=True)
    for split in ("train", "validation"):
        examples = datasets.load_from_disk(str(tmp_path / "plain" / split)).to_list()  # one a row, in order
        ids = [np.array(r["input_ids"], np.int32) for r in examples]
        labels = [np.array(r["labels"], np.int32) for r in examples]
        rows = pack_best_fit([len(x) for x in ids], 64)  # packing all at once, as prepare did before streaming
        expected = rows_to_table(ids, labels, rows).to_pylist()
        got = datasets.load_from_disk(str(tmp_path / "packed" / split)).to_list()
        assert [{k: r[k] for k in ("input_ids", "labels", "position_ids")} for r in got] == expected
        assert [r["dialogue_ids"] for r in got] == [[examples[i]["dialogue_ids"][0] for i in row] for row in rows]
        assert [r["trained_messages"] for r in got] == [
            [m for i in row for m in examples[i]["trained_messages"]] for row in rows]
    assert packed.stats["examples"] == plain.stats["examples"] and packed.stats["tokens"] == plain.stats["tokens"]


def test_a_small_packing_buffer_keeps_every_token_within_capacity(tmp_path, tiny_model_dir):
    whole = prepare(chats_config(tmp_path, tiny_model_dir, "whole"), quiet=True).stats
    small = prepare(chats_config(tmp_path, tiny_model_dir, "small", pack_buffer=5), quiet=True).stats
    for split in ("train", "validation"):
        rows = {name: datasets.load_from_disk(str(tmp_path / name / split)).to_list() for name in ("whole", "small")}
        assert all(len(r["input_ids"]) <= 64 for r in rows["small"])
        assert sorted(examples_of_rows(rows["small"])) == sorted(examples_of_rows(rows["whole"]))
        assert sorted(d for r in rows["small"] for d in r["dialogue_ids"]) == \
            sorted(d for r in rows["whole"] for d in r["dialogue_ids"])
    assert small["tokens"] == whole["tokens"] and small["trained_tokens"] == whole["trained_tokens"]
    assert small["splits"]["train"]["rows"] >= whole["splits"]["train"]["rows"]


def test_a_split_written_in_shards_loads_to_the_same_rows(tmp_path, tiny_model_dir, monkeypatch):
    prepare(chats_config(tmp_path, tiny_model_dir, "one_shard"), quiet=True)
    monkeypatch.setattr("dialogtune.prepare.SHARD_BYTES", 2000)
    monkeypatch.setattr("dialogtune.prepare.BATCH", 4)
    prepare(chats_config(tmp_path, tiny_model_dir, "shards", pack_buffer=6), quiet=True)
    prepare(chats_config(tmp_path, tiny_model_dir, "buffered", pack_buffer=6), force=True, quiet=True)
    shards = sorted(p.name for p in (tmp_path / "shards" / "train").glob("*.arrow"))
    assert len(shards) > 2 and shards[0] == f"data-00000-of-{len(shards):05d}.arrow"
    loaded = datasets.load_from_disk(str(tmp_path / "shards" / "train"))
    assert len(loaded.cache_files) == len(shards)
    monkeypatch.setattr("dialogtune.prepare.SHARD_BYTES", 10**9)
    prepare(chats_config(tmp_path, tiny_model_dir, "buffered", pack_buffer=6), force=True, quiet=True)
    assert loaded.to_list() == datasets.load_from_disk(str(tmp_path / "buffered" / "train")).to_list()
    # The metadata is what datasets' own save_to_disk writes for the same rows.
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(loaded.to_list(), features=loaded.features).save_to_disk(str(saved))
    ours = tmp_path / "shards" / "train"
    assert json.loads((ours / "dataset_info.json").read_text()) == json.loads((saved / "dataset_info.json").read_text())
    state, theirs = (json.loads((d / "state.json").read_text()) for d in (ours, saved))
    assert {k: v for k, v in state.items() if k not in ("_data_files", "_fingerprint")} == \
        {k: v for k, v in theirs.items() if k not in ("_data_files", "_fingerprint")}


# -- what a failed or killed preparation leaves: no open files, no staging copy -----------------
def files_open_under(directory):
    """This process's open file descriptors that point into `directory`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)):
                found.append(target)
    return found


def staging_dirs(tmp_path, name="out"):
    return sorted(p.name for p in tmp_path.glob(f".{name}-staging-*"))


def fail_in_packing(monkeypatch):
    """Packing yields its first packed table, then breaks: pass 2 fails with a shard open."""
    from dialogtune import prepare as module

    real = module.pack_stream

    def breaking(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(module, "pack_stream", breaking)


@pytest.mark.parametrize("where", ["reading", "tokenizing", "packing", "packing after 2 processes tokenized"])
def test_a_failed_preparation_leaves_no_open_file_and_no_staging_directory(tmp_path, tiny_model_dir, monkeypatch,
                                                                          where):
    if where == "reading":  # --strict stops at a reader's reject, in pass 1
        config, error, message = make_config(tmp_path, tiny_model_dir, strict=True), StrictError, "play.txt:8"
    elif where == "tokenizing":  # --strict stops at a turn too long, once pass 1 has written the scratch file
        lines = [json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                          {"role": "assistant", "content": "word " * (60 if i == 7 else 2)}]})
                 for i in range(12)]
        (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
        config = build_config({"data": {"path": str(tmp_path / "chats.jsonl")}, "task": {"as": "assistant"},
                               "model": {"name": str(tiny_model_dir)}, "template": {"name": "chatml"},
                               "max_length": 64, "strict": True, "output": str(tmp_path / "out")})
        error, message = StrictError, "does not fit in max_length=64"
    else:  # a write failing in pass 2, with a shard and the scratch file open
        fail_in_packing(monkeypatch)
        processes = 2 if "2 processes" in where else 1
        config = chats_config(tmp_path, tiny_model_dir, "out", num_proc=processes)
        error, message = OSError, "disk full"
    monkeypatch.setattr("dialogtune.prepare.BATCH", 4)  # several batches: a reader is mid-file when it stops
    with pytest.raises(error, match=message) as failed:
        prepare(config, quiet=True)
    # `failed` holds the traceback, and so every frame of the run: what is still open is still open.
    assert failed.traceback and files_open_under(tmp_path) == []
    assert staging_dirs(tmp_path) == [] and not (tmp_path / "out").exists()


def killed_preparation(tmp_path, config, sig):
    """Run `prepare(config)` in a child process that gets `sig` once pass 1 has written a batch."""
    child = f"""
import json, os, signal, sys
from dialogtune import prepare as module
from dialogtune.config import build_config
module.BATCH = 4
real = module.encoded_tables
def then_killed(*args, **kwargs):
    tables = real(*args, **kwargs)
    yield next(tables)
    os.kill(os.getpid(), {int(sig)})  # the first table is in the scratch file by now
    yield from tables
module.encoded_tables = then_killed
module.prepare(build_config(json.loads(sys.argv[1])), quiet=True)
"""
    raw = json.dumps(config.model_dump(mode="json", by_alias=True))
    return subprocess.run([sys.executable, "-c", child, raw], check=False, capture_output=True, text=True, timeout=300)


def test_sigterm_removes_the_staging_directory_on_the_way_out(tmp_path, tiny_model_dir):
    done = killed_preparation(tmp_path, chats_config(tmp_path, tiny_model_dir, "out"), signal.SIGTERM)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert staging_dirs(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_killed_preparations_staging_is_removed_by_the_next_once_none_runs(tmp_path, tiny_model_dir, capsys):
    config = chats_config(tmp_path, tiny_model_dir, "out")
    done = killed_preparation(tmp_path, config, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL, done.stderr
    [left] = staging_dirs(tmp_path)  # SIGKILL runs no cleanup: the scratch copy of the corpus stays
    assert (tmp_path / left / ".examples.arrow").stat().st_size > 0
    # Another preparation of the same output holds the lock: its staging directory might be this
    # one, so nothing is removed; this preparation goes on beside it.
    with open(tmp_path / ".out.lock", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        assert not prepare(config, quiet=True).cache_hit
        assert staging_dirs(tmp_path) == [left]
        assert not prepare(config, force=True, quiet=True).cache_hit  # nor the next, while it runs
        assert staging_dirs(tmp_path) == [left]
    # None runs now: even a cache hit removes it, and says so.
    sibling = tmp_path / ".out-staging-keep" / "x"  # not of staged_dir's making: not touched
    sibling.parent.mkdir()
    sibling.write_text("x")
    other = tmp_path / ".outer-staging-abcdefgh"  # another output's, whose name starts the same
    other.mkdir()
    capsys.readouterr()
    assert prepare(config).cache_hit
    assert staging_dirs(tmp_path) == [".out-staging-keep"] and other.exists()
    assert f"removed 1 staging directory that stopped preparations of {tmp_path / 'out'} left: {left}" \
        in capsys.readouterr().err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())  # the output is whole
    assert datasets.load_from_disk(str(tmp_path / "out" / "train")).num_rows == stats["splits"]["train"]["rows"] > 0
