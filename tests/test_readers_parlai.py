"""ParlAI text data (PersonaChat/ConvAI2): numbered lines and the `text:...\\tlabels:...` layout."""

from __future__ import annotations

import pytest
from helpers import FIXTURES, SHARED_DATA, split_items, turn_pairs

from dialogtune.readers import detect_format, parlai

PERSONACHAT = FIXTURES / "personachat.txt"
PERSONACHAT_REAL = SHARED_DATA / "personachat" / "valid_both_original_no_cands.txt"




def test_numbered_episodes_with_personas():
    dialogues, rejects = split_items(parlai.read(PERSONACHAT))
    assert rejects == []
    assert [(d.id, d.line, d.source) for d in dialogues] == [
        ("personachat.txt#0", 1, str(PERSONACHAT)),
        ("personachat.txt#1", 9, str(PERSONACHAT)),
    ]
    first, second = dialogues
    assert first.meta["personas"] == {
        "self": ["i love to bake bread.", "i have two golden retrievers.", "i work as a night nurse."],
        "partner": ["i am a college student.", "i play the trumpet in a jazz band."],
    }
    assert turn_pairs(first) == [
        ("partner", "hi there ! how is your evening going ?"),
        ("self", "pretty good , just got home from a long shift at the hospital ."),
        ("partner", "oh wow , are you a doctor ?"),
        ("self", "no , i'm a nurse . i work nights so i sleep all day ."),
        ("partner", "that sounds tiring . i'm up late studying anyway ."),
        ("self", "what do you study ? i bake bread when i can't sleep ."),
    ]
    assert [t.meta["line"] for t in first.turns] == [6, 6, 7, 7, 8, 8]
    assert second.meta["personas"] == {
        "self": ["my favorite color is green.", "i just moved to the city."],
        "partner": ["i am a vegetarian."],
    }
    # `__SILENCE__` means self speaks first: no partner turn.
    assert turn_pairs(second) == [
        ("self", "hello ! i just moved here , do you know any good parks ?"),
        ("partner", "the botanical garden downtown is lovely ."),
        ("self", "green is my favorite color , so that sounds perfect ."),
    ]


def test_field_layout(tmp_path):
    path = tmp_path / "convai2_fields.txt"
    path.write_text(
        "text:your persona: i like cats.\\nyour persona: i am a chef.\\npartner's persona: i run marathons.\\n"
        "hi , how are you ?\tlabels:i am great , just cooked dinner .\treward:0\n"
        "text:what did you cook ?\tlabels:pasta , my cats watched .|pasta\tepisode_done:True\n"
        "text:your persona: i play guitar.\\n__SILENCE__\tlabels:hello , anyone there ?\tepisode_done:False\n"
        "text:yes , hi !\teval_labels:do you like music ?\tepisode_done:True\n"
    )
    assert detect_format(path) == "parlai"
    dialogues, rejects = split_items(parlai.read(path))
    assert rejects == []
    assert [(d.id, d.line) for d in dialogues] == [("convai2_fields.txt#0", 1), ("convai2_fields.txt#1", 3)]
    first, second = dialogues
    assert first.meta["personas"] == {"self": ["i like cats.", "i am a chef."], "partner": ["i run marathons."]}
    # Only the first of several labels (`|`-separated) is the response.
    assert turn_pairs(first) == [
        ("partner", "hi , how are you ?"),
        ("self", "i am great , just cooked dinner ."),
        ("partner", "what did you cook ?"),
        ("self", "pasta , my cats watched ."),
    ]
    assert second.meta["personas"] == {"self": ["i play guitar."]}
    # `__SILENCE__` is dropped here too; eval_labels stand in for labels.
    assert turn_pairs(second) == [
        ("self", "hello , anyone there ?"),
        ("partner", "yes , hi !"),
        ("self", "do you like music ?"),
    ]


def test_unnumbered_and_untabbed_lines_are_rejected(tmp_path):
    path = tmp_path / "broken.txt"
    path.write_text(
        "1 your persona: i surf.\n"
        "2 hi there\n"
        "just some text\n"
        "3 how are you ?\tgreat , just back from the beach .\n"
    )
    dialogues, rejects = split_items(parlai.read(path))
    assert [(r.line, r.reason) for r in rejects] == [
        (2, "expected 'utterance<TAB>response'"),
        (3, "expected a numbered line ('N text') or ParlAI fields ('text:...')"),
    ]
    assert [(d.line, d.meta, turn_pairs(d)) for d in dialogues] == [
        (1, {"personas": {"self": ["i surf."]}},
         [("partner", "how are you ?"), ("self", "great , just back from the beach .")]),
    ]


@pytest.mark.skipif(not PERSONACHAT_REAL.exists(), reason="shared PersonaChat data not available")
def test_real_personachat_valid():
    dialogues, rejects = split_items(parlai.read(PERSONACHAT_REAL))
    assert rejects == []
    assert len(dialogues) == 1000
    for dialogue in dialogues:
        personas = dialogue.meta["personas"]
        assert len(personas["self"]) >= 3
        assert personas["partner"]  # "both_original": partner personas are present too
        assert dialogue.speakers() == ["partner", "self"]
    first = dialogues[0]
    assert first.meta["personas"]["self"][0] == "i read twenty books a year."
    assert turn_pairs(first)[:2] == [
        ("partner", "hello what are doing today ?"),
        ("self", "i am good , i just got off work and tired , i have two jobs ."),
    ]
