"""The understand task: stage-1 prompts over retrieved candidates, one argument question per
parameter, exact targets, the token budget's drop order, and what is counted."""

from __future__ import annotations

import pytest
from helpers import FIXTURES

from dialogtune.readers import sgd
from dialogtune.retrieval.embedder import load_embedder
from dialogtune.retrieval.exemplars import extract_sgd_exemplars
from dialogtune.retrieval.index import build_index
from dialogtune.retrieval.schemas import read_functions
from dialogtune.tasks.understand import NONE, NULL, UnderstandPrompts, argument_options, understand

SGD_FIXTURE = FIXTURES / "retrieval" / "sgd"


@pytest.fixture(scope="module")
def index(tiny_embedder_dir):
    exemplars, _ = extract_sgd_exemplars(SGD_FIXTURE)
    return build_index(read_functions(SGD_FIXTURE), exemplars, embedder=str(tiny_embedder_dir),
                       model=load_embedder(str(tiny_embedder_dir)))


def dialogues():
    return {d.id: d for d in sgd.read(SGD_FIXTURE)}


def words(text: str) -> int:
    return len(text.split())


def conversation(examples):
    return [[(m["role"], m["content"], m["train"]) for m in e.messages] for e in examples]


def test_one_example_per_user_turn_with_the_function_then_each_argument(index):
    prompts = UnderstandPrompts(index, candidates=5, exemplars=2)
    examples = understand(dialogues()["2_00000"], prompts, rounds=2)
    assert len(examples) == 5 and prompts.stats.turns == 5
    booking = conversation(examples)[1]
    system, user = booking[0][1], booking[1][1]
    for function in index.functions:  # 5 functions, 5 candidates: all offered, then none
        assert f"- {function.name}" in system
    assert system.rstrip().endswith(f"- {NONE}: the turn calls none of these")
    assert user == ("Conversation:\nUser: Hi there.\nSystem: Hello, how can I help?\n"
                    "User: Book me a table for 4 at Sushi Ran in Sausalito.\n\n"
                    "Which function does the last User turn call?")
    assert booking[2] == ("assistant", "Restaurants_1__ReserveRestaurant", True)
    questions = [content for role, content, _ in booking[3::2]]
    answers = [(content, trained) for role, content, trained in booking[4::2]]
    reserve = index.by_name["Restaurants_1__ReserveRestaurant"]
    assert len(questions) == len(reserve.parameters)
    for question, parameter in zip(questions, reserve.parameters, strict=True):
        assert question.startswith(f"Argument {parameter.name}: ")
        if parameter.enum:  # categorical: every possible value listed
            assert f"One of: {', '.join(parameter.enum)}." in question
    said = {"restaurant_name": "Sushi Ran", "city": "Sausalito", "party_size": "4"}
    assert answers == [(said.get(p.name, NULL), True) for p in reserve.parameters]
    # the next turn changes only the party size: everything else is null
    resize = conversation(examples)[2]
    assert [c for r, c, t in resize[4::2]] == ["5" if p.name == "party_size" else NULL for p in reserve.parameters]
    # a turn that calls nothing: the answer is none and no argument is asked
    assert conversation(examples)[0][2:] == [("assistant", NONE, True)]
    assert argument_options(index.by_name["Restaurants_1__ReserveRestaurant"].parameter("party_size")) == \
        ["1", "2", "3", "4", "5", "6", "dontcare", NULL]


def test_a_training_turn_never_sees_exemplars_of_its_own_dialogue(index):
    own = {e.template for e in index.exemplars if e.source[0] == "2_00001"}
    assert own  # the fixture's second dialogue has templates in the index
    examples = understand(dialogues()["2_00001"], UnderstandPrompts(index, candidates=5, exemplars=3), rounds=2)
    for example in examples:
        assert not any(template in example.messages[0]["content"] for template in own)


def test_the_function_in_progress_is_always_offered(index):
    examples = understand(dialogues()["2_00000"], UnderstandPrompts(index, candidates=1, exemplars=0), rounds=0)
    resize = examples[2].messages[0]["content"]  # "Actually make it 5 people." after the booking
    assert "- Restaurants_1__ReserveRestaurant (in progress): " in resize
    assert resize.count("\n- ") == 2  # that one candidate, and none


def test_a_gold_function_the_index_does_not_offer_is_trained_as_none_and_counted(index):
    prompts = UnderstandPrompts(index, candidates=1, exemplars=0)
    examples = [e for d in dialogues().values() for e in understand(d, prompts, rounds=0)]
    from dialogtune.state import sgd_user_turns

    gold = [t.function for d in dialogues().values() for t in sgd_user_turns(d)]
    offered = [e.messages[0]["content"] for e in examples]
    missed = [g for g, o in zip(gold, offered, strict=True) if g is not None and f"- {g}" not in o]
    assert missed and prompts.stats.gold_not_retrieved == len(missed)
    answers = [e.messages[2]["content"] for e in examples]
    assert [a for a, g, o in zip(answers, gold, offered, strict=True) if g is not None and f"- {g}" not in o] == \
        [NONE] * len(missed)
    assert prompts.stats.second_calls == 1  # the Music + Weather turn


def test_the_budget_drops_exemplars_then_context_then_candidates_never_the_turn(index):
    dialogue = dialogues()["2_00000"]
    roomy = understand(dialogue, UnderstandPrompts(index, 5, 2, measure=words, max_tokens=10_000), rounds=4)
    tight = UnderstandPrompts(index, 5, 2, measure=words, max_tokens=150)
    cut = understand(dialogue, tight, rounds=4)
    assert tight.stats.dropped["exemplars"] > 0 and tight.stats.dropped["context turns"] > 0
    assert tight.stats.dropped["candidates"] > 0
    for full, short in zip(roomy, cut, strict=True):
        utterance = full.messages[1]["content"].split("\n\n")[0].splitlines()[-1]
        assert utterance.startswith("User: ") and short.messages[1]["content"].split("\n\n")[0].endswith(utterance)
        assert [m["content"] for m in full.messages[2:]] == [m["content"] for m in short.messages[2:]]
    # exemplars go first: a budget that fits everything but the templates drops only those
    size = sum(words(m["content"]) + 8 for m in roomy[1].messages)
    shown = roomy[1].messages[0]["content"].count('e.g. "')
    just = UnderstandPrompts(index, 5, 2, measure=words, max_tokens=size - 1)
    understand(dialogue, just, rounds=4)
    assert shown and set(just.stats.dropped) == {"exemplars"}


def test_data_without_sgd_frames_is_rejected_with_a_reason(index):
    from dialogtune.dialogue import Dialogue, Reject, Turn

    result = understand(Dialogue("d1", [Turn("Bob", "hi")], source="x.txt"), UnderstandPrompts(index))
    assert isinstance(result, Reject) and "SGD frames" in result.reason


@pytest.mark.slow
def test_with_smollm2_each_trained_answer_is_its_standalone_tokens_then_the_end_of_turn(index):
    """What constrained decoding relies on: an answer's trained tokens are the answer tokenized
    alone (as `understand.option_trie` tokenizes the options), then the end-of-turn token."""
    from dialogtune.models import load_tokenizer
    from dialogtune.templates import resolve_template
    from dialogtune.tokenize import ExampleEncoder, trained_runs

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    encoder = ExampleEncoder(tokenizer, resolve_template("model", tokenizer, None), 4096)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    checked = 0
    for dialogue in dialogues().values():
        for example in understand(dialogue, UnderstandPrompts(index, candidates=5, exemplars=1), rounds=2):
            tokenized = encoder.encode_many([example])[0]
            answers = [m["content"] for m in example.messages if m["train"]]
            runs = trained_runs(tokenized.labels)
            assert len(runs) == len(answers)
            for (start, stop), answer in zip(runs, answers, strict=True):
                assert tokenized.labels[start:stop].tolist() == \
                    [*tokenizer(answer, add_special_tokens=False).input_ids, end]
                checked += 1
    assert checked > 20


def test_prompts_may_keep_to_the_dialogues_services(index):
    dialogue = dialogues()["2_00000"]  # services: Restaurants_1 only
    examples = understand(dialogue, UnderstandPrompts(index, candidates=5, exemplars=0, dialogue_services=True))
    for example in examples:
        offered = [line.split(":")[0][2:].removesuffix(" (in progress)")
                   for line in example.messages[0]["content"].splitlines() if line.startswith("- ")]
        assert set(offered) <= {"Restaurants_1__ReserveRestaurant", "Restaurants_1__FindRestaurants", NONE}
        assert offered[-1] == NONE and len(offered) == 3
    open_prompts = understand(dialogue, UnderstandPrompts(index, candidates=5, exemplars=0))
    assert "Music_1__PlaySong" in open_prompts[1].messages[0]["content"]
