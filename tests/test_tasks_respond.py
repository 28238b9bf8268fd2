from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.tasks.respond import respond


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
