"""Streams of dialogues: the queue, resets, epochs and an exact continuation from saved state."""

from __future__ import annotations

import json
from dataclasses import asdict

from dialogtune.memory.streams import Streams, StreamState


def dialogues(lengths, sessions=None):
    out = []
    for i, n in enumerate(lengths):
        marks = sessions[i] if sessions else [1] * n
        out.append({"trained": [True] * n, "sessions": marks, "id": i})
    return out


def drain(streams):
    steps = []
    while (nxt := streams.next()) is not None:
        steps.append(nxt)
    return steps


def test_streams_take_turns_in_order_and_refill_from_the_queue_with_a_reset():
    streams = Streams(dialogues([2, 3, 1]), streams=2, seed=0, epochs=1, shuffle=False)
    steps = drain(streams)
    assert steps[0] == ([(0, 0), (1, 0)], [True, True])
    assert steps[1] == ([(0, 1), (1, 1)], [False, False])
    assert steps[2] == ([(2, 0), (1, 2)], [True, False])
    assert len(steps) == 3  # then both streams are idle: the data is done


def test_an_idle_stream_waits_while_the_other_finishes():
    steps = drain(Streams(dialogues([1, 3]), streams=2, seed=0, epochs=1, shuffle=False))
    assert [picks for picks, _ in steps] == [[(0, 0), (1, 0)], [None, (1, 1)], [None, (1, 2)]]


def test_each_epoch_shuffles_the_queue_by_seed_and_every_dialogue_comes_once_per_epoch():
    data = dialogues([1] * 10)
    first = [p[0][0] for p, _ in drain(Streams(data, streams=1, seed=3, epochs=2))]
    again = [p[0][0] for p, _ in drain(Streams(data, streams=1, seed=3, epochs=2))]
    other = [p[0][0] for p, _ in drain(Streams(data, streams=1, seed=4, epochs=2))]
    assert first == again and first != other
    assert sorted(first[:10]) == list(range(10)) == sorted(first[10:])
    assert first[:10] != first[10:]


def test_reset_each_session_flags_the_first_turn_of_every_session():
    data = dialogues([4], sessions=[[1, 1, 2, 3]])
    steps = drain(Streams(data, streams=1, seed=0, epochs=1, shuffle=False, reset_each_session=True))
    assert [resets for _, resets in steps] == [[True], [False], [True], [True]]
    plain = drain(Streams(data, streams=1, seed=0, epochs=1, shuffle=False))
    assert [resets for _, resets in plain] == [[True], [False], [False], [False]]


def test_a_stream_state_saved_mid_run_continues_exactly():
    data = dialogues([3, 1, 4, 2, 5, 2])
    whole = drain(Streams(data, streams=2, seed=1, epochs=2))
    streams = Streams(data, streams=2, seed=1, epochs=2)
    head = [streams.next() for _ in range(5)]
    saved = json.loads(json.dumps(asdict(streams.state)))  # what a checkpoint writes
    resumed = Streams(data, streams=2, seed=1, epochs=2, state=StreamState(**saved))
    assert head + drain(resumed) == whole
