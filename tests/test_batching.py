"""The continuous-batching engine: each reply equals the one-at-a-time reply (Conversation.respond)
to the same request, token for token, whatever else shares the batch and whenever it joined."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from transformers import StopStringCriteria
from transformers.generation.logits_process import TopPLogitsWarper

from dialogtune.batching import BatchEngine, batchable, warpers_for
from dialogtune.infer import Conversation, Sampling, load_chat_model

QUESTIONS = ["Hi", "Where is the station?", "I would like to find a restaurant in San Jose, please.",
             "Hello there! How are you doing today? I'm fine, thanks for asking. And you?", "Sushi Sam?",
             "What about the weather tomorrow in San Jose and in the city?"]


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return load_chat_model(str(tiny_model_dir))


def conversation(chat, question: str) -> Conversation:
    talk = Conversation(chat, reuse_cache=False)
    talk.messages.append({"role": "user", "content": question})
    return talk


def alone(chat, question: str, sampling: Sampling):
    return conversation(chat, question).respond(sampling)


def submit(engine: BatchEngine, question: str, sampling: Sampling, **options):
    talk = conversation(engine.chat, question)
    _, ids = talk.prompt_ids(sampling.max_new_tokens)
    return engine.submit(ids, sampling, engine.chat.stops_for(talk.user_name), **options)


def greedy(tokens: int) -> Sampling:
    return Sampling(temperature=0, max_new_tokens=tokens)


def fields(reply) -> tuple:
    """All of a reply but its first-token time."""
    return dataclasses.astuple(dataclasses.replace(reply, first_token_seconds=0.0))


def test_greedy_replies_equal_one_at_a_time_as_requests_join_and_leave_at_different_steps(chat):
    lengths = [7, 30, 12, 25, 4, 18]  # rows leave at different steps, so waiting ones join mid-flight
    expected = [alone(chat, q, greedy(n)) for q, n in zip(QUESTIONS, lengths, strict=True)]
    assert len({e.prompt_tokens for e in expected}) == len(QUESTIONS)  # prompts of different lengths
    engine = BatchEngine(chat, max_batch=3)
    try:
        futures = []

        def chain(i: int):  # request i+1 arrives once request i has shown some text: a later step
            fired = threading.Event()

            def on_text(_: str) -> None:
                if i + 1 < len(QUESTIONS) and not fired.is_set():
                    fired.set()
                    futures.append(submit(engine, QUESTIONS[i + 1], greedy(lengths[i + 1]), on_text=chain(i + 1)))
            return on_text

        futures.append(submit(engine, QUESTIONS[0], greedy(lengths[0]), on_text=chain(0)))
        replies = []
        while len(replies) < len(QUESTIONS):
            replies.append(futures[len(replies)].result(timeout=60))
    finally:
        engine.close()
    assert [fields(r) for r in replies] == [fields(e) for e in expected]
    assert engine.steps > 0 and engine.stepped_rows / engine.steps > 1.5  # really batched
    assert (engine.joined, engine.join_steps) == (len(QUESTIONS), len(QUESTIONS))  # each at a step of its own


def test_joins_at_different_steps_with_a_full_batch_and_a_queue(chat):
    lengths = [9, 3, 14, 6, 11, 5]
    expected = [alone(chat, q, greedy(n)) for q, n in zip(QUESTIONS, lengths, strict=True)]
    engine = BatchEngine(chat, max_batch=2)
    try:
        with engine.wake:  # all queued before the worker looks: two run, four wait for a free row
            futures = [submit(engine, q, greedy(n)) for q, n in zip(QUESTIONS, lengths, strict=True)]
        replies = [f.result(timeout=60) for f in futures]
    finally:
        engine.close()
    assert [fields(r) for r in replies] == [fields(e) for e in expected]
    # Two read before the first step, then one at each of 4 other steps, as a row left.
    assert (engine.joined, engine.join_steps) == (6, 5)


def test_stop_strings_and_end_tokens_cut_the_reply_as_one_at_a_time(chat):
    free = alone(chat, QUESTIONS[1], greedy(30)).raw
    cut = free[len(free) // 2 : len(free) // 2 + 2]  # a stop string the greedy reply runs into
    stopping = dataclasses.replace(chat, stop_strings=[*chat.stop_strings, cut], _criteria={})
    expected = alone(stopping, QUESTIONS[1], greedy(30))
    assert expected.stopped and expected.new_tokens < 30 and cut not in expected.raw
    engine = BatchEngine(stopping, max_batch=4)
    try:
        with engine.wake:
            futures = [submit(engine, q, greedy(30)) for q in QUESTIONS[:4]]
        replies = [f.result(timeout=60) for f in futures]
    finally:
        engine.close()
    assert fields(replies[1]) == fields(expected)
    assert [fields(r) for r in replies] == [fields(alone(stopping, q, greedy(30))) for q in QUESTIONS[:4]]


def test_a_seeded_sampled_reply_is_the_same_whatever_else_is_in_the_batch(chat):
    seeded = Sampling(temperature=0.9, top_k=0, top_p=0.9, max_new_tokens=20, seed=7)
    engine = BatchEngine(chat, max_batch=8)
    try:
        by_itself = submit(engine, QUESTIONS[2], seeded).result(timeout=60)
        with engine.wake:
            others = [submit(engine, q, Sampling(temperature=1.2, top_k=0, top_p=1.0, max_new_tokens=25, seed=i))
                      for i, q in enumerate(QUESTIONS[3:])]
            crowded = submit(engine, QUESTIONS[2], seeded)
            others.append(submit(engine, QUESTIONS[0], greedy(15)))
        crowded = crowded.result(timeout=60)
        for other in others:
            other.result(timeout=60)
        unseeded = [submit(engine, QUESTIONS[2], dataclasses.replace(seeded, seed=None)).result(timeout=60).raw
                    for _ in range(3)]
    finally:
        engine.close()
    assert fields(crowded) == fields(by_itself)
    # The one-at-a-time path seeds torch's generator with the same seed: the same draws.
    assert fields(by_itself) == fields(alone(chat, QUESTIONS[2], seeded))
    assert len(set(unseeded)) > 1  # without a seed, each reply draws afresh


def test_streamed_pieces_join_to_the_reply(chat):
    pieces: list[str] = []
    engine = BatchEngine(chat)
    try:
        reply = submit(engine, QUESTIONS[3], greedy(24), on_text=pieces.append).result(timeout=60)
    finally:
        engine.close()
    assert "".join(pieces) == reply.raw and len(pieces) > 1


def test_cancelling_one_request_ends_only_that_one(chat):
    cancel = threading.Event()
    engine = BatchEngine(chat, max_batch=4)
    try:
        with engine.wake:
            cancelled = submit(engine, QUESTIONS[1], greedy(200), cancel=cancel, on_text=lambda _: cancel.set())
            kept = submit(engine, QUESTIONS[2], greedy(40))
        cancelled, kept = cancelled.result(timeout=60), kept.result(timeout=60)
        waiting = threading.Event()
        waiting.set()
        never_read = submit(engine, QUESTIONS[0], greedy(10), cancel=waiting).result(timeout=60)
    finally:
        engine.close()
    assert not cancelled.stopped and cancelled.new_tokens < 20
    assert fields(kept) == fields(alone(chat, QUESTIONS[2], greedy(40)))
    assert never_read.new_tokens == 0 and never_read.raw == ""  # its client left before it was read


def test_max_time_ends_a_reply_after_its_first_token(chat):
    engine = BatchEngine(chat)
    try:
        reply = submit(engine, QUESTIONS[1], greedy(50), max_time=0.0).result(timeout=60)
    finally:
        engine.close()
    assert reply.new_tokens == 1 and not reply.stopped


def test_what_cannot_be_batched_is_refused_by_name(chat, tiny_bart_dir):
    assert batchable(chat)
    bart = load_chat_model(str(tiny_bart_dir))
    assert not batchable(bart)
    with pytest.raises(ValueError, match="cannot be batched"):
        BatchEngine(bart)
    with pytest.raises(ValueError, match="not repetition_penalty=1.3"):
        warpers_for(Sampling(repetition_penalty=1.3))
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        BatchEngine(chat, max_batch=0)


def test_warpers_are_generates_own_for_the_same_settings():
    names = [type(w).__name__ for w in warpers_for(Sampling(temperature=0.7, top_k=0, top_p=0.9))]
    assert names == ["TemperatureLogitsWarper", "TopPLogitsWarper"]
    assert list(warpers_for(Sampling(temperature=0))) == []
    assert [type(w).__name__ for w in warpers_for(Sampling(temperature=1.0, top_k=50, top_p=1.0))] == [
        "TopKLogitsWarper"]


def test_a_prompt_that_cannot_be_read_fails_only_its_own_request(chat):
    lengths = [12, 20, 6]
    expected = [alone(chat, q, greedy(n)) for q, n in zip(QUESTIONS[:3], lengths, strict=True)]
    engine = BatchEngine(chat, max_batch=4)
    try:
        with engine.wake:  # all read in the same round, the bad one between the others
            first = submit(engine, QUESTIONS[0], greedy(lengths[0]))
            bad = engine.submit([chat.model.config.vocab_size + 5], greedy(5), chat.stops_for(None))
            rest = [submit(engine, q, greedy(n)) for q, n in zip(QUESTIONS[1:3], lengths[1:], strict=True)]
        replies = [f.result(timeout=60) for f in [first, *rest]]
        with pytest.raises(IndexError):  # a token id beyond the vocabulary: its embedding cannot be read
            bad.result(timeout=60)
    finally:
        engine.close()
    assert [fields(r) for r in replies] == [fields(e) for e in expected]


@pytest.mark.parametrize("raise_at", [1, 3])  # the first piece (possibly as its prompt is read) or a later step
def test_an_on_text_that_raises_fails_only_its_own_reply(chat, raise_at):
    expected = [alone(chat, q, greedy(25)) for q in QUESTIONS[:3]]
    shown: list[str] = []

    def failing(piece: str) -> None:
        shown.append(piece)
        if len(shown) == raise_at:
            raise ConnectionError("the client went away")

    engine = BatchEngine(chat, max_batch=4)
    try:
        with engine.wake:
            futures = [submit(engine, q, greedy(25), on_text=failing if i == 1 else None)
                       for i, q in enumerate(QUESTIONS[:3])]
        with pytest.raises(ConnectionError, match="the client went away"):
            futures[1].result(timeout=60)
        replies = [futures[0].result(timeout=60), futures[2].result(timeout=60)]
        after = submit(engine, QUESTIONS[1], greedy(25)).result(timeout=60)  # the engine goes on
    finally:
        engine.close()
    assert len(shown) == raise_at  # nothing more was shown to a failed reply
    assert [fields(r) for r in replies] == [fields(expected[0]), fields(expected[2])]
    assert fields(after) == fields(expected[1])


def test_a_failed_decoding_step_fails_the_rows_in_it_and_the_engine_goes_on(chat):
    engine = BatchEngine(chat, max_batch=4)
    forward, failed = engine._forward, []

    def failing_once(input_ids, *args):
        if input_ids.shape[1] == 1 and not failed:  # a decoding step (a prompt is read whole)
            failed.append(input_ids.shape[0])
            raise RuntimeError("out of memory")
        return forward(input_ids, *args)

    engine._forward = failing_once
    try:
        with engine.wake:
            futures = [submit(engine, q, greedy(10)) for q in QUESTIONS[:2]]
        for future in futures:
            with pytest.raises(RuntimeError, match="out of memory"):
                future.result(timeout=60)
        after = submit(engine, QUESTIONS[2], greedy(10)).result(timeout=60)
    finally:
        engine.close()
    assert failed == [2]  # the step both rows were decoded in
    assert fields(after) == fields(alone(chat, QUESTIONS[2], greedy(10)))


def test_each_step_reads_only_the_last_tokens_the_stop_check_needs(chat, monkeypatch):
    """The stop check reads `maximum_token_len` tokens and the warpers none: a step's work does not
    grow with the context, and the replies stay the one-at-a-time ones."""
    greedy_alone = alone(chat, QUESTIONS[3], greedy(30))
    sampled = Sampling(temperature=0.8, top_k=0, top_p=0.9, max_new_tokens=30, seed=5)
    sampled_alone = alone(chat, QUESTIONS[3], sampled)
    stop_widths, warper_widths, windows = [], [], set()
    stop_call, warper_call = StopStringCriteria.__call__, TopPLogitsWarper.__call__

    def stop_recorded(self, input_ids, scores, **kwargs):
        stop_widths.append(input_ids.shape[1])
        windows.add(self.maximum_token_len)
        return stop_call(self, input_ids, scores, **kwargs)

    def warper_recorded(self, input_ids, scores):
        warper_widths.append(input_ids.shape[1])
        return warper_call(self, input_ids, scores)

    monkeypatch.setattr(StopStringCriteria, "__call__", stop_recorded)
    monkeypatch.setattr(TopPLogitsWarper, "__call__", warper_recorded)
    engine = BatchEngine(chat, max_batch=4)
    try:
        with engine.wake:
            futures = [submit(engine, QUESTIONS[3], greedy(30)), submit(engine, QUESTIONS[3], sampled)]
        replies = [f.result(timeout=60) for f in futures]
    finally:
        engine.close()
    assert [fields(r) for r in replies] == [fields(greedy_alone), fields(sampled_alone)]
    (window,) = windows
    assert greedy_alone.prompt_tokens > window  # else the whole context would be the window anyway
    assert len(stop_widths) >= greedy_alone.new_tokens - 1  # each token but one that ended the reply anyway
    assert set(stop_widths) == {window}
    assert warper_widths == [1] * sampled_alone.new_tokens


def test_an_unseeded_reply_never_touches_torchs_global_generator(chat):
    unseeded = Sampling(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=20)
    engine = BatchEngine(chat)
    try:
        replies = []
        for _ in range(2):
            torch.manual_seed(0)  # as the one-at-a-time path does for a seeded request
            state = torch.get_rng_state()
            replies.append(submit(engine, QUESTIONS[2], unseeded).result(timeout=60).raw)
            assert torch.equal(torch.get_rng_state(), state)
    finally:
        engine.close()
    assert replies[0] != replies[1]  # its seed is its own: a reseeded process does not repeat it
