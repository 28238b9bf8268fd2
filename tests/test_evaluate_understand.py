"""eval --task understand: the metrics on a replay with known answers, DSTC8's fuzzy match, and
the reports written."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from helpers import FIXTURES

from dialogtune.evaluate.understand import evaluate_understanding, value_score
from dialogtune.readers import sgd
from dialogtune.retrieval.exemplars import Exemplar
from dialogtune.understand import TurnResult

RESERVE, FIND = "Restaurants_1__ReserveRestaurant", "Restaurants_1__FindRestaurants"
PARAMETERS = {RESERVE: ["restaurant_name", "city", "party_size"], FIND: ["city", "cuisine"]}
# what the "model" answers for each user turn of the fixture's first dialogue
SCRIPT = {
    "Hi there.": (None, {}),  # right: none
    "Book me a table for 4 at Sushi Ran in Sausalito.": (
        RESERVE, {"restaurant_name": "sushi ran", "city": "Sausalito", "party_size": "4"}),  # all right
    "Actually make it 5 people.": (RESERVE, {}),  # the function right, the new party size missed
    "Now find Thai food in Oakland, any Thai place in Oakland.": (FIND, {"city": "Oakland", "cuisine": "Thai food"}),
    "That's all, thanks.": (FIND, {}),  # gold: none
}


class Scripted:
    """Answers from SCRIPT and keeps the state as the real Understander does: what the metrics
    are computed from is the replay's own state."""

    def __init__(self):
        exemplars = [Exemplar(RESERVE, "book it", "book it", {}, ("train", 0))]
        self.prompts = SimpleNamespace(index=SimpleNamespace(exemplars=exemplars))

    def turn(self, conversation, utterance):
        function, changes = SCRIPT[utterance]
        call = conversation.state.update(function, changes, PARAMETERS)
        conversation.turns.append(("USER", utterance))
        return TurnResult(call, function, dict(changes), [RESERVE, FIND], 0.01)


def first_dialogue():
    return [d for d in sgd.read(FIXTURES / "retrieval" / "sgd") if d.id == "2_00000"]


def test_value_scores_follow_dstc8():
    from rapidfuzz import fuzz

    assert value_score("sushi ran", ["Sushi Ran"], categorical=False) == 1.0
    assert value_score("4", ["5"], categorical=True) == 0.0
    assert value_score("Thai food", ["Thai"], categorical=False) == pytest.approx(fuzz.token_sort_ratio("Thai food", "Thai") / 100)
    assert 0 < value_score("Thai food", ["Thai"], categorical=False) < 1
    assert value_score(None, ["Thai"], categorical=False) == 0.0


def test_metrics_of_a_replay_with_known_answers(tmp_path):
    assert [t.text for t in first_dialogue()[0].turns if t.speaker == "USER"] == list(SCRIPT)
    report = evaluate_understanding(Scripted(), first_dialogue(), tmp_path, quiet=True)
    every = report["groups"]["all"]
    assert every["turns"] == 5 and every["function_accuracy"] == pytest.approx(4 / 5)
    assert (every["none_turns"], every["none_accuracy"]) == (2, 0.5)
    # states of the 3 service turns hold 3 + 3 + 4 values, the gold states 3 + 3 + 4; right: 3, 2
    # (the party size stays 4), 2 (party size, and "Thai food" is not "Thai")
    assert every["slot_precision"] == pytest.approx(7 / 10) and every["slot_recall"] == pytest.approx(7 / 10)
    assert every["slot_f1"] == pytest.approx(0.7)
    assert every["joint_goal_accuracy"] == pytest.approx(1 / 3) and every["goal_turns"] == 3
    assert every["exact_call"] == pytest.approx(2 / 5)
    assert report["groups"]["seen"]["turns"] == 3 and report["groups"]["unseen"]["turns"] == 0
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert sorted(e["turn"] for e in errors) == [4, 6, 8]
    markdown = (tmp_path / "report.md").read_text()
    assert "| all | 5 | 0.800 | 0.500 | 0.700 | 0.700 | 0.700 | 0.400 | 0.333 |" in markdown
    assert "Actually make it 5 people." in markdown


def test_the_tiny_run_is_evaluated_end_to_end(tiny_understand_run, tmp_path):
    from dialogtune.cli import main

    started = time.perf_counter()
    assert main(["eval", str(tiny_understand_run / "run"), "--task", "understand", "--data",
                 str(FIXTURES / "retrieval" / "sgd"), "-o", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dialogues"] == 2 and report["groups"]["all"]["turns"] == 9
    assert 0 <= report["groups"]["all"]["function_accuracy"] <= 1
    assert 0 < report["latency"]["p50_ms"] < (time.perf_counter() - started) * 1000
    stages = report["latency_by_stage"]
    assert set(stages) == {"retrieval", "function", "arguments"}
    assert sum(stage["p50_ms"] for stage in stages.values()) <= report["latency"]["p95_ms"] * 1.5


def test_limit_takes_a_fixed_sample_by_a_hash_of_the_ids(tmp_path):
    every = list(sgd.read(FIXTURES / "retrieval" / "sgd"))
    # 2_00000's hash (db5e...) sorts before 2_00001's (e245...): whatever the order they come in
    for order in (every, every[::-1]):
        report = evaluate_understanding(Scripted(), order, tmp_path, limit=1, quiet=True)
        assert report["dialogues"] == 1 and report["groups"]["all"]["turns"] == 5
