"""The train split as training reads it: loaded, or streamed from its shards with a seeded
shuffle buffer, and a streamed run resumed mid-epoch gives the unbroken run's losses."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import pytest
from test_train_run import job

from dialogtune.prepare import prepare
from dialogtune.train.run import train
from dialogtune.train.shards import SizedStream, open_train_split

STREAM = {"shuffle_buffer": 8, "seed": 3}


@pytest.fixture
def small_shards(monkeypatch):
    """A new shard after each 1 kB (with pack_buffer: 4, every 4 examples): a tiny split spans several files."""
    monkeypatch.setattr("dialogtune.prepare.SHARD_BYTES", 1000)


def names(rows) -> list[str]:
    return [row["dialogue_ids"][0] for row in rows]


def test_a_stream_yields_every_row_once_an_epoch_in_a_seeded_order(tmp_path, tiny_model_dir, small_shards):
    config = job(tmp_path, tiny_model_dir, stream=STREAM, pack_buffer=4)
    prepared = prepare(config, quiet=True).directory / "train"
    loaded = datasets.load_from_disk(str(prepared))
    assert len(loaded.cache_files) > 2
    assert names(open_train_split(prepared, job(tmp_path, tiny_model_dir))) == names(loaded)  # no stream: as loaded

    stream = open_train_split(prepared, config)
    assert isinstance(stream, SizedStream) and len(stream) == len(loaded) == 18
    first = names(stream)
    stream.set_epoch(1)
    second = names(stream)
    assert Counter(first) == Counter(second) == Counter(names(loaded))  # each row once an epoch
    assert first != names(loaded) and second != first  # shuffled, and anew each epoch
    again = open_train_split(prepared, config)
    assert names(again) == first  # seeded
    again.set_epoch(1)
    assert names(again) == second
    other = open_train_split(prepared, job(tmp_path, tiny_model_dir, stream={**STREAM, "seed": 4}))
    assert names(other) != first
    assert open_train_split(prepared, job(tmp_path, tiny_model_dir, stream=True)).stream is not None  # `stream: true`


def step_losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def streamed_job(directory, model_dir, max_steps: int, **train):
    # 18 train rows in batches of 4: 5 batches an epoch, so step 7 lies inside the second epoch.
    directory.mkdir(exist_ok=True)
    return job(directory, model_dir, stream=STREAM, pack_buffer=4, samples=0, eval={"every": 7},
               train={"max_steps": max_steps, **train})


def test_a_streamed_run_resumed_mid_epoch_gives_the_unbroken_runs_losses(tmp_path, tiny_model_dir, small_shards):
    train(streamed_job(tmp_path / "whole", tiny_model_dir, 12), quiet=True)
    unbroken = step_losses(tmp_path / "whole" / "run")
    assert sorted(unbroken) == list(range(1, 13))

    train(streamed_job(tmp_path / "stopped", tiny_model_dir, 7), quiet=True)  # stops after the save at step 7
    assert (tmp_path / "stopped" / "run" / "checkpoints" / "checkpoint-7").exists()
    train(streamed_job(tmp_path / "stopped", tiny_model_dir, 12), resume=True, quiet=True)
    resumed = step_losses(tmp_path / "stopped" / "run")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(unbroken[step], abs=1e-6), step

    # The test has teeth: resumed without skipping the consumed batches, the losses differ.
    train(streamed_job(tmp_path / "careless", tiny_model_dir, 7), quiet=True)
    train(streamed_job(tmp_path / "careless", tiny_model_dir, 12, ignore_data_skip=True), resume=True, quiet=True)
    careless = step_losses(tmp_path / "careless" / "run")
    assert careless[8] != pytest.approx(unbroken[8], abs=1e-4)
