"""`dialogtune understand`: constrained greedy answers, the reused key/value cache, state across
turns, batch input, and a tiny run trained end to end on the SGD fixture."""

from __future__ import annotations

import json

import pytest

from dialogtune.errors import DataError
from dialogtune.tasks.understand import NONE, NULL
from dialogtune.understand import Conversation, load_understander, option_trie, read_conversations, run_batch


@pytest.fixture(scope="module")
def understander(tiny_understand_run):
    return load_understander(str(tiny_understand_run / "run"))


def test_the_trained_run_learned_its_answers(tiny_understand_run):
    records = [json.loads(line) for line in (tiny_understand_run / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] / 3


def fixture_dialogues():
    from helpers import FIXTURES

    from dialogtune.readers import sgd

    return list(sgd.read(FIXTURES / "retrieval" / "sgd"))


def replay(understander, dialogue, fresh_cache: bool = False):
    """Every user turn of an SGD dialogue understood in order; system turns as context."""
    if fresh_cache:  # every question prefilled from scratch: what the reused cache must equal
        answer = understander._answer
        understander._answer = lambda messages, session, options: answer(messages, {}, options)
    try:
        conversation, results = Conversation(), []
        for turn in dialogue.turns:
            if turn.speaker == "USER":
                results.append(understander.turn(conversation, turn.text))
            else:
                conversation.turns.append(("SYSTEM", turn.text))
        return conversation, results
    finally:
        understander.__dict__.pop("_answer", None)


def test_options_become_a_token_trie_that_ends_only_after_a_whole_option(understander):
    tokenizer = understander.chat.tokenizer
    trie = option_trie(tokenizer, ["Music_1__PlaySong", "Music_1__LookupMusic", NONE], {7})
    for option in ["Music_1__PlaySong", "Music_1__LookupMusic", NONE]:
        ids = tokenizer(option, add_special_tokens=False).input_ids
        for i, token in enumerate(ids):
            assert token in trie[tuple(ids[:i])]
        assert trie[tuple(ids)] == {7}
    assert 7 not in trie[()]  # nothing ends before an option is whole


def test_constrained_answers_are_always_an_offered_function_and_a_listed_value(understander):
    index = understander.prompts.index
    for dialogue in fixture_dialogues():
        _, results = replay(understander, dialogue)
        for result in results:
            assert result.function is None or result.function in result.candidates
            for name, value in result.changes.items():
                parameter = index.by_name[result.function].parameter(name)
                if parameter.enum:
                    assert value in [*parameter.enum, "dontcare"]
                assert value != NULL
            assert json.loads(json.dumps(result.call.as_dict())) == result.call.as_dict()
            assert sum(result.stages.values()) == pytest.approx(result.seconds, rel=1e-6)


def test_the_reused_cache_gives_the_answers_of_a_fresh_prefill(understander):
    for dialogue in fixture_dialogues():
        _, cached = replay(understander, dialogue)
        _, fresh = replay(understander, dialogue, fresh_cache=True)
        assert [(r.function, r.changes) for r in cached] == [(r.function, r.changes) for r in fresh]


def test_the_state_folds_every_turns_changes_and_calls_carry_it(understander):
    from dialogtune.state import service_of

    for dialogue in fixture_dialogues():
        conversation, results = replay(understander, dialogue)
        expected: dict[str, dict[str, str]] = {}
        for result in results:
            if result.function:
                expected.setdefault(service_of(result.function), {}).update(result.changes)
                names = {p.name for p in understander.prompts.index.by_name[result.function].parameters}
                assert result.call.arguments == {k: v for k, v in expected[service_of(result.function)].items()
                                                 if k in names}
            else:
                assert result.call.as_dict() == {"function": None}
        assert conversation.state.values == expected


def test_batch_input_answers_every_user_turn(understander, tmp_path):
    source = tmp_path / "dialogues.jsonl"
    source.write_text(json.dumps({"id": "a", "messages": [
        {"role": "user", "content": "Book me a table for 4 at Sushi Ran in Sausalito."},
        {"role": "assistant", "content": "Booked."}, {"role": "user", "content": "Make it 5 people."}]}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "Play Hey Jude."}]}) + "\n")
    summary = run_batch(understander, source, tmp_path / "calls.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [(line["id"], line["user_turn"]) for line in lines] == [("a", 0), ("a", 1), ("2", 0)]
    assert summary["turns"] == 3 and summary["p50_ms"] > 0 and all(line["ms"] > 0 for line in lines)
    assert all(line["function"] is None or line["function"] in line["candidates"] for line in lines)


def test_bad_input_is_refused_with_its_line(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "robot"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: messages\[0\]: expected a role of user"):
        list(read_conversations(source))
    source.write_text("{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: not JSON"):
        list(read_conversations(source))


def test_a_run_of_another_task_is_refused(tiny_job_dir):
    from dialogtune.errors import RunError

    with pytest.raises(RunError, match="not an understand run"):
        load_understander(str(tiny_job_dir / "run"))


def test_the_command_prints_the_call_as_json(tiny_understand_run, capsys):
    from dialogtune.cli import main

    assert main(["understand", str(tiny_understand_run / "run"), "--utterance", "Play Hey Jude now."]) == 0
    call = json.loads(capsys.readouterr().out)
    assert set(call) in ({"function"}, {"function", "arguments"})


def test_a_conversation_keeps_to_its_services_when_the_prompts_do(understander):
    understander.prompts.dialogue_services = True
    try:
        result = understander.turn(Conversation(services=["Music_1"]), "Play Hey Jude now.")
        assert result.candidates == ["Music_1__PlaySong"]
        assert result.function in (None, "Music_1__PlaySong")
    finally:
        understander.prompts.dialogue_services = False
    assert len(understander.turn(Conversation(services=["Music_1"]), "Play Hey Jude now.").candidates) > 1
