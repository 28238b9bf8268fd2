"""Embedder fine-tuning: pairs and hard negatives exact on a constructed case, a few steps on the
tiny embedder lower the loss and move the embeddings, the trained directory loads in `index`,
and config errors name the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import FIXTURES

from dialogtune.cli import main
from dialogtune.errors import ConfigError, DataError
from dialogtune.retrieval.embedder import embed, load_embedder
from dialogtune.retrieval.exemplars import Exemplar, extract_sgd_exemplars
from dialogtune.retrieval.finetune import (
    Pair,
    Pool,
    build_pairs,
    description_pool,
    load_config,
    mine_hard_negatives,
    template_pool,
    train_embedder,
    with_negatives,
)
from dialogtune.retrieval.index import load_index, template_text
from dialogtune.retrieval.schemas import Function, read_functions

SGD_FIXTURE = FIXTURES / "retrieval" / "sgd"
FUNCTIONS = [Function("A", "Book a table."), Function("B", "Play a song."), Function("C", "Get the weather.")]
EXEMPLARS = [
    Exemplar("A", "book a table at Nopa", "book a table at <restaurant_name>", {}, ("d1", 0)),
    Exemplar("B", "play it again", None, {}, ("d1", 2)),  # no template: no template pair
    Exemplar("B", "play Hey Jude and the weather in Paris", "play <song_name> and the weather in Paris", {}, ("d2", 0)),
    Exemplar("C", "play Hey Jude and the weather in Paris", "play Hey Jude and the weather in <city>", {}, ("d2", 0)),
    Exemplar("C", None, "will it rain in <city>", {}, ("hand.yaml", 0)),  # no utterance: not an anchor
    Exemplar(None, "thanks, bye", None, {}, ("d2", 4)),  # out of domain: not an anchor
]


def test_pairs_are_utterance_to_template_and_to_description():
    pairs, stats = build_pairs(EXEMPLARS, FUNCTIONS)
    assert [(p.anchor, p.positive, p.kind, p.function, p.group) for p in pairs] == [
        ("book a table at Nopa", "book a table at restaurant name", "template", "A", "d1"),
        ("book a table at Nopa", "Book a table.", "description", "A", "d1"),
        ("play it again", "Play a song.", "description", "B", "d1"),
        ("play Hey Jude and the weather in Paris", "play song name and the weather in Paris", "template", "B", "d2"),
        ("play Hey Jude and the weather in Paris", "Play a song.", "description", "B", "d2"),
        ("play Hey Jude and the weather in Paris", "play Hey Jude and the weather in city", "template", "C", "d2"),
        ("play Hey Jude and the weather in Paris", "Get the weather.", "description", "C", "d2"),
    ]
    # the turn that opens two intents means both: neither function may be the other's negative
    assert [p.excluded for p in pairs[3:]] == [frozenset("BC")] * 4
    assert (dict(stats.pairs), stats.no_template, stats.no_utterance) == ({"template": 3, "description": 4}, 1, 1)
    only_descriptions, stats = build_pairs(EXEMPLARS, FUNCTIONS, ["description"])
    assert [p.kind for p in only_descriptions] == ["description"] * 4 and stats.no_template == 0
    with pytest.raises(DataError, match="'Z' is not in the schemas"):
        build_pairs([Exemplar("Z", "hi", "hi", {}, ("d", 0))], FUNCTIONS)


def test_pools_hold_each_owned_template_once_without_held_out_dialogues():
    pool = template_pool([*EXEMPLARS, EXEMPLARS[0]], held_out={"d2"})
    assert pool == Pool(("A", "C"), ("book a table at restaurant name", "will it rain in city"))
    assert description_pool(FUNCTIONS) == Pool(("A", "B", "C"), ("Book a table.", "Play a song.", "Get the weather."))


def test_the_hard_negative_is_the_best_text_of_a_function_the_utterance_does_not_mean():
    pool = Pool(("A", "B", "C", "B"), ("t-a", "t-b", "t-c", "t-b2"))
    pool_vectors = np.eye(4, dtype=np.float32)
    anchor = np.array([0.9, 0.8, 0.7, 0.95], dtype=np.float32)  # its score against each pool row
    pairs = [
        Pair("u", "t-a", "template", "A", "g"),  # the best row of another function: t-b2
        Pair("u", "t-b", "template", "B", "g", frozenset("BC")),  # B and C meant: only A is left
        Pair("u", "t-b2", "template", "A", "g"),  # another function's text equal to the positive: not it
        Pair("u", "t-a", "template", "A", "g", frozenset("ABC")),  # nothing left
        Pair("u", "t-c", "template", "C", "g"),  # equal scores go to the earlier row
    ]
    anchors = np.stack([anchor, anchor, anchor, anchor, np.array([0.5, 0.5, 0.9, 0.5], dtype=np.float32)])
    assert mine_hard_negatives(anchors, pairs, pool, pool_vectors) == [3, 0, 1, None, 0]


def test_mined_negatives_on_the_fixture_never_share_the_function(tiny_embedder_dir):
    functions = read_functions(SGD_FIXTURE)
    exemplars = extract_sgd_exemplars(SGD_FIXTURE)[0]
    pairs, stats = build_pairs(exemplars, functions)
    mined = with_negatives(load_embedder(str(tiny_embedder_dir)), pairs,
                           {"template": template_pool(exemplars), "description": description_pool(functions)}, stats)
    assert len(mined) == len(pairs) == 10 and stats.no_template == 2  # 6 descriptions + 4 templates
    owner_of = {template_text(e.template): e.function for e in exemplars if e.template} | {
        f.description: f.name for f in functions}
    for pair, negative in mined:
        assert owner_of[negative] not in pair.excluded and negative != pair.positive


def _config(tmp_path, embedder, **overrides):
    raw = {"embedder": str(embedder), "schemas": str(SGD_FIXTURE), "exemplars": [str(SGD_FIXTURE)],
           "validation": 0.0, "output": str(tmp_path / "trained"),
           "train": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1e-3}} | overrides
    path = tmp_path / "embedder.yaml"
    path.write_text(json.dumps(raw))
    return path


def test_a_few_steps_lower_the_loss_move_the_embeddings_and_the_model_loads_in_index(
        tmp_path, tiny_embedder_dir, capsys):
    assert main(["train-embedder", str(_config(tmp_path, tiny_embedder_dir))]) == 0
    printed = capsys.readouterr().out
    assert "hard negatives mined: 10" in printed and "utterances without a template: 2" in printed
    trained = tmp_path / "trained"
    summary = json.loads((trained / "train_embedder.json").read_text())
    assert (summary["train_pairs"], summary["validation_pairs"], summary["hard_negatives"], summary["steps"]) == (
        10, 0, 10, 6)
    # the tiny embedder's WordPiece vocabulary is trained anew each session and can differ
    # between runs, so the values are not fixed: the loss falls by a clear margin each time
    before, after = summary["loss_before"]["train_sample"], summary["loss_after"]["train_sample"]
    assert 0.5 < before < 3.0 and after < before - 0.1
    assert summary["loss_before"]["validation"] is None

    texts = ["Will it rain in Paris tomorrow?", "Book me a table for 4 at Sushi Ran in Sausalito."]
    base, tuned = load_embedder(str(tiny_embedder_dir)), load_embedder(str(trained))
    assert np.abs(embed(base, texts) - embed(tuned, texts)).max() > 0.05
    # the utterances' gold descriptions move up: the sum of their ranks among the 5 functions
    functions = read_functions(SGD_FIXTURE)
    pairs, _ = build_pairs(extract_sgd_exemplars(SGD_FIXTURE)[0], functions, ["description"])

    def rank_sum(model) -> int:
        scores = embed(model, [p.anchor for p in pairs]) @ embed(model, [f.description for f in functions]).T
        gold = [next(i for i, f in enumerate(functions) if f.name == p.function) for p in pairs]
        return int(sum((scores[row] > scores[row, g]).sum() for row, g in enumerate(gold)))

    assert rank_sum(tuned) < rank_sum(base)

    index_dir = tmp_path / "index"
    assert main(["index", str(SGD_FIXTURE), "--exemplars", str(SGD_FIXTURE), "--embedder", str(trained),
                 "-o", str(index_dir)]) == 0
    assert load_index(index_dir).embedder == str(trained.resolve())
    capsys.readouterr()
    assert main(["retrieve", str(index_dir), "Will it rain in Paris tomorrow?", "-k", "2"]) == 0
    assert capsys.readouterr().out.startswith("1. ")


def test_an_output_directory_that_is_not_an_embedder_is_refused(tmp_path, tiny_embedder_dir):
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="output: .* not an embedder written by train-embedder"):
        train_embedder(load_config(_config(tmp_path, tiny_embedder_dir)))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"pairs": ["templates"]}, r"pairs\.0: Input should be 'template' or 'description'"),
    ({"pairs": []}, "pairs: List should have at least 1 item"),
    ({"pairs": ["template", "template"]}, "pairs: each kind of pair at most once"),
    ({"exemplar": ["x"]}, "unknown key 'exemplar'; did you mean 'exemplars'"),
    ({"validation": 1.5}, "validation: Input should be less than 1"),
    ({"schemas": []}, "schemas: expected at least one path"),
    ({"train": {"max_step": 4}}, r"train: unknown .* key\(s\): max_step \(did you mean max_steps"),
    ({"train": {"output_dir": "x"}}, "train.output_dir is managed by dialogtune train-embedder; set output"),
    ({"train": {"batch_sampler": "batch_sampler"}}, "train.batch_sampler is managed"),
])
def test_config_errors_name_the_key(tmp_path, tiny_embedder_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_embedder(load_config(_config(tmp_path, tiny_embedder_dir, **overrides)))


def test_a_missing_key_is_named_and_relative_paths_follow_the_config(tmp_path):
    path = tmp_path / "embedder.yaml"
    path.write_text("exemplars: sgd/train\n")
    with pytest.raises(ConfigError, match="missing required key 'schemas'"):
        load_config(path)
    path.write_text("schemas: [sgd/train, /abs/dev]\nexemplars: sgd/train\n")
    config = load_config(path)
    assert config.schemas == [str(tmp_path / "sgd/train"), "/abs/dev"]
    assert config.exemplars == [str(tmp_path / "sgd/train")] and config.pairs == ["template", "description"]
    assert config.embedder == "minilm-l6-v2"
