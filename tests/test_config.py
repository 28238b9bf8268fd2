"""Config validation: errors that name the key, the bad value and what would be valid."""

from __future__ import annotations

import pytest

from dialogtune.config import build_config, load_yaml, merge, parse_overrides
from dialogtune.errors import ConfigError


def test_minimal_config_gets_defaults():
    config = build_config({"data": {"path": "chats.jsonl"}})
    assert config.data.path == ["chats.jsonl"]
    assert (config.task.name, config.task.context, config.model.name, config.template.name) == (
        "respond", "full", "smollm2-135m-instruct", "model")
    assert (config.max_length, config.pack, config.split.validation) == (1024, False, 0.1)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'task.contxt'; did you mean 'task.context'\?"):
        build_config({"data": {"path": "x"}, "task": {"contxt": "full"}})
    with pytest.raises(ConfigError, match=r"unknown key 'max_lenght'; did you mean 'max_length'\?"):
        build_config({"data": {"path": "x"}, "max_lenght": 5})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"max_length: .*integer.*\(got 'long'\)"):
        build_config({"data": {"path": "x"}, "max_length": "long"})
    with pytest.raises(ConfigError, match=r"split.validation: .*less than 1"):
        build_config({"data": {"path": "x"}, "split": {"validation": 1.5}})


def test_missing_data_path_is_named():
    with pytest.raises(ConfigError, match="missing required key 'data.path'"):
        build_config({"data": {}})


def test_rounds_and_as_accept_short_forms():
    config = build_config({"data": {"path": "x"}, "task": {"as": "Bob", "context": {"rounds": 5}}})
    assert config.task.speakers_as == ["Bob"] and config.task.context.rounds == 5


def test_overrides_parse_yaml_values_and_merge_deeply():
    tree = parse_overrides(["task.context.rounds=3", "pack=true", "task.as=[Bob, Alice]"])
    assert tree == {"task": {"context": {"rounds": 3}, "as": ["Bob", "Alice"]}, "pack": True}
    merged = merge({"task": {"name": "respond", "as": "X"}}, tree)
    assert merged["task"] == {"name": "respond", "as": ["Bob", "Alice"], "context": {"rounds": 3}}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["pack"])


def test_yaml_paths_are_relative_to_the_config(tmp_path):
    (tmp_path / "jobs").mkdir()
    config = tmp_path / "jobs" / "job.yaml"
    config.write_text("data:\n  path: ../data/chats.jsonl\n")
    assert load_yaml(config)["data"]["path"] == [str(tmp_path / "jobs" / "../data/chats.jsonl")]
    with pytest.raises(ConfigError, match="cannot read config"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)


def test_context_has_one_clear_message():
    for bad in ({"rounds": -1}, {"round": 3}, 5, "fulll"):
        with pytest.raises(ConfigError) as caught:
            build_config({"data": {"path": "x"}, "task": {"context": bad}})
        message = str(caught.value)
        assert message.count("\n") == 0 and 'task.context: expected "full" or {rounds: N}' in message


def test_bad_path_types_are_named_not_a_traceback(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("data:\n  path: [a.txt, 5]\n")
    with pytest.raises(ConfigError, match=r"data.path.1: Input should be a valid string"):
        build_config(load_yaml(config))


def _train_job(**eval_section):
    from dialogtune.config import TrainJobConfig

    return build_config({"data": {"path": "x"}, "eval": eval_section}, schema=TrainJobConfig)


def test_eval_metric_must_be_one_training_computes():
    with pytest.raises(ConfigError) as caught:
        _train_job(metric="eval_bleu")
    assert str(caught.value) == ("config: eval.metric: 'eval_bleu' is not computed when training evaluates;"
                                 " choose one of: eval_loss, eval_perplexity")


def test_greater_is_better_defaults_to_the_metric_and_can_be_set():
    assert _train_job().eval.greater_is_better is False
    assert _train_job(metric="eval_perplexity").eval.greater_is_better is False
    assert _train_job(metric="eval_perplexity", greater_is_better=True).eval.greater_is_better is True
    with pytest.raises(ConfigError, match=r"eval.greater_is_better: Input should be a valid boolean"):
        _train_job(greater_is_better="sometimes")


def test_eval_limit_must_select_some_samples():
    with pytest.raises(ConfigError, match=r"eval.limit: Input should be greater than or equal to 1"):
        _train_job(report=True, limit=0)
    assert _train_job(report=True, limit=5).eval.limit == 5


@pytest.mark.parametrize("name", ["sgd_respond", "samsum_summarize", "sgd_understand", "sgd_embedder"])
def test_the_shipped_example_configs_validate(name):
    from pathlib import Path

    from dialogtune.config import EmbedderTrainConfig, TrainJobConfig

    path = Path(__file__).parent.parent / "examples" / f"{name}.yaml"
    config = build_config(load_yaml(path), str(path),
                          schema=EmbedderTrainConfig if name == "sgd_embedder" else TrainJobConfig)
    if name == "sgd_understand":  # inputs named in the file are relative to it
        assert (config.task.name, config.task.index) == ("understand", str(path.parent / "data" / "sgd-index"))
        assert config.data.path == [str(path.parent / "data" / "sgd" / "train")] and config.data.sample == 0.05
