import json

from helpers import FIXTURES, split_items

from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.readers import sgd
from dialogtune.tasks.respond import TOOL_RESULTS_SHOWN, ToolCallStats, respond


def play() -> Dialogue:
    turns = [Turn("Alice", "Hi Bob."), Turn(None, "Bob looks up."), Turn("Bob", "Hello Alice."),
             Turn("Alice", "How are you?"), Turn("Bob", "Fine.")]
    return Dialogue("scene0", turns, source="play.txt", line=3,
                    meta={"personas": {"Bob": ["I like trains."]}, "group": "ep1"})


def roles(example):
    return [(m["role"], m.get("name"), m["content"], m["train"]) for m in example.messages]


def test_full_context_trains_every_target_turn_in_one_example():
    (example,) = respond(play(), {"Bob"})
    assert roles(example) == [
        ("user", "Alice", "Hi Bob.", False),
        ("user", None, "Bob looks up.", False),
        ("assistant", "Bob", "Hello Alice.", True),
        ("user", "Alice", "How are you?", False),
        ("assistant", "Bob", "Fine.", True),
    ]
    assert (example.group, example.source, example.line) == ("ep1", "play.txt", 3)


def test_rounds_window_ends_on_the_target_turn_only_it_trained():
    first, second = respond(play(), {"Bob"}, rounds=2)
    assert roles(first) == [("user", "Alice", "Hi Bob.", False), ("user", None, "Bob looks up.", False),
                            ("assistant", "Bob", "Hello Alice.", True)]
    assert roles(second) == [("assistant", "Bob", "Hello Alice.", False), ("user", "Alice", "How are you?", False),
                             ("assistant", "Bob", "Fine.", True)]


def test_system_prompt_and_persona_lead_the_example():
    (example,) = respond(play(), {"Bob"}, system_prompt="You are Bob.", persona=True)
    assert example.messages[0] == {"role": "system", "content": "You are Bob.\nYour persona: I like trains.",
                                   "train": False}


def test_every_speaker_and_missing_target():
    (example,) = respond(play(), {"*"})
    assert [m["train"] for m in example.messages] == [True, False, True, True, True]
    reject = respond(play(), {"Carol"})
    assert isinstance(reject, Reject) and reject.reason == "no turn by Carol" and reject.stage == "unused"


# -- tool calls (SGD service calls) ---------------------------------------------------------
def sgd_calls() -> Dialogue:
    """Events in Chicago: the first system reply searched (4 results), the third bought tickets."""
    (dialogue,), _ = split_items(sgd.read(FIXTURES / "sgd_calls"))
    return dialogue


def test_a_turn_with_calls_becomes_the_call_the_tool_answer_and_the_reply():
    stats = ToolCallStats()
    (example,) = respond(sgd_calls(), {"SYSTEM"}, tool_calls=True, tool_stats=stats)
    assert [(m["role"], m["train"]) for m in example.messages] == [
        ("user", False), ("assistant", True), ("tool", False), ("assistant", True),  # search, 4 results
        ("user", False), ("assistant", True),
        ("user", False), ("assistant", True), ("tool", False), ("assistant", True),  # tickets, 1 result
        ("user", False), ("assistant", True),
    ]
    call, answer, reply = example.messages[1:4]
    assert call == {"role": "assistant", "content": "", "name": "SYSTEM", "train": True, "tool_calls": [
        {"id": "call00100", "type": "function", "function": {
            "name": "Events_1__FindEvents",
            "arguments": {"category": "Music", "city_of_event": "Chicago", "date": "2019-03-02"}}}]}
    assert answer["name"] == "Events_1__FindEvents" and answer["tool_call_id"] == "call00100"
    shown = json.loads(answer["content"])
    # The count stays whole; the results past TOOL_RESULTS_SHOWN are left out, and counted.
    assert shown["count"] == 4 and [r["event_name"] for r in shown["results"]] == [
        "Alejandro Sanz", "Beach House", "Cher"][:TOOL_RESULTS_SHOWN]
    assert reply["content"] == "I found 4 events. Alejandro Sanz is playing at Aragon Ballroom."
    assert stats == ToolCallStats(calls=2, results=5, results_left_out=4 - TOOL_RESULTS_SHOWN)
    # What the template sees: OpenAI's shape, no `train`.
    assert example.chat()[1:3] == [
        {"role": "assistant", "content": "", "name": "SYSTEM", "tool_calls": call["tool_calls"]},
        {"role": "tool", "content": answer["content"], "name": "Events_1__FindEvents", "tool_call_id": "call00100"}]


def test_rounds_count_turns_and_a_turn_trains_its_call_and_its_reply():
    examples = respond(sgd_calls(), {"SYSTEM"}, rounds=2, tool_calls=True)
    assert len(examples) == 4  # one per system turn, as without calls
    assert [(m["role"], m["train"]) for m in examples[1].messages] == [
        ("assistant", False), ("tool", False), ("assistant", False),  # the first turn, as context
        ("user", False), ("assistant", True)]
    assert [(m["role"], m["train"]) for m in examples[2].messages] == [
        ("assistant", False), ("user", False),
        ("assistant", True), ("tool", False), ("assistant", True)]


def test_without_tool_calls_or_calls_nothing_changes():
    dialogue = sgd_calls()
    plain = respond(dialogue, {"SYSTEM"})
    for turn in dialogue.turns:
        turn.meta.pop("tool_calls", None)
    assert respond(dialogue, {"SYSTEM"}, tool_calls=True) == plain == respond(dialogue, {"SYSTEM"})
    assert not any("tool_calls" in m for m in plain[0].messages)
    assert respond(play(), {"Bob"}, tool_calls=True) == respond(play(), {"Bob"})
    assert respond(play(), {"Bob"}, rounds=1, tool_calls=True) == respond(play(), {"Bob"}, rounds=1)


def test_calls_are_written_only_for_the_speaker_the_model_is():
    stats = ToolCallStats()
    (example,) = respond(sgd_calls(), {"USER"}, tool_calls=True, tool_stats=stats)
    assert [m["role"] for m in example.messages] == ["assistant", "user"] * 4
    assert stats == ToolCallStats()
