from dialogtune.dialogue import Dialogue, Reject, Turn
from dialogtune.tasks.summarize import summarize


def test_summary_is_the_only_trained_message():
    dialogue = Dialogue("13817023", [Turn("Amanda", "I baked cookies. Do you want some?"), Turn("Jerry", "Sure!")],
                        meta={"summary": "Amanda baked cookies and will bring Jerry some."})
    (example,) = summarize(dialogue, "Summarize the following dialogue:", system_prompt="Be concise.")
    assert example.messages == [
        {"role": "system", "content": "Be concise.", "train": False},
        {"role": "user", "content": "Summarize the following dialogue:\nAmanda: I baked cookies. Do you want some?\n"
                                    "Jerry: Sure!", "train": False},
        {"role": "assistant", "content": "Amanda baked cookies and will bring Jerry some.", "train": True},
    ]


def test_dialogue_without_summary_is_rejected():
    reject = summarize(Dialogue("x", [Turn("A", "hi")], source="f.json", line=4))
    assert isinstance(reject, Reject) and (reject.source, reject.line, reject.reason) == ("f.json", 4, "no summary to learn")
