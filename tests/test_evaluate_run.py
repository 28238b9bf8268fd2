"""`dialogtune eval` end to end on tiny models: reports, determinism, resuming, comparing."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from dialogtune.cli import main
from dialogtune.evaluate import run as eval_run
from dialogtune.evaluate.run import evaluate

DIALOGUES = [
    ("Amanda: I baked cookies. Do you want some?\nJerry: Sure!", "Amanda baked cookies for Jerry."),
    ("Olivia: Who are you voting for?\nOliver: Liberals as always.", "Oliver votes for the liberals."),
    ("Tim: Is the station far?\nAnna: Two miles away.", "The station is two miles away."),
    ("Sam: Can you book a table?\nLee: Done, for two.", "Lee booked a table for two."),
    ("Kim: Is it raining?\nBo: No, it is sunny.", "It is sunny, not raining."),
]


@pytest.fixture(scope="module")
def summaries(tmp_path_factory):
    path = tmp_path_factory.mktemp("samsum") / "summaries.jsonl"
    path.write_text("\n".join(json.dumps({"id": str(i), "dialogue": d, "summary": s})
                              for i, (d, s) in enumerate(DIALOGUES * 2)) + "\n")
    return path


def test_summarize_report_predictions_and_markdown(tiny_model_dir, summaries, tmp_path):
    report = evaluate(str(tiny_model_dir), str(summaries), "summarize", out=tmp_path / "ev", quiet=True,
                      sampling=eval_run.Sampling(temperature=0, max_new_tokens=6))
    assert report["samples"] == 10 and report["task"] == "summarize" and report["decoding"]["greedy"]
    assert set(report["metrics"]) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "perplexity", "stopped_share"}
    assert report["metrics"]["perplexity"] > 1 and len(report["data_fingerprint"]) == 32
    predictions = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["index"] for p in predictions) == list(range(10))
    assert predictions[0]["reference"] == "Amanda baked cookies for Jerry."
    markdown = (tmp_path / "ev" / "report.md").read_text()
    assert "## 10 best" in markdown and "## 10 worst" in markdown and "| rouge1 |" in markdown


def test_the_same_eval_twice_gives_identical_metrics(tiny_model_dir, summaries, tmp_path):
    settings = {"out": None, "quiet": True, "sampling": eval_run.Sampling(temperature=0, max_new_tokens=5)}
    first = evaluate(str(tiny_model_dir), str(summaries), "summarize", **{**settings, "out": tmp_path / "a"})
    second = evaluate(str(tiny_model_dir), str(summaries), "summarize", **{**settings, "out": tmp_path / "b"})
    assert first["metrics"] == second["metrics"]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["metrics"] == first["metrics"]


def test_an_interrupted_eval_resumes_without_redoing_samples(tiny_model_dir, summaries, tmp_path, monkeypatch):
    sampling = eval_run.Sampling(temperature=0, max_new_tokens=5)
    evaluate(str(tiny_model_dir), str(summaries), "summarize", limit=4, out=tmp_path / "ev", quiet=True,
             sampling=sampling)  # stands in for a run stopped after 4 samples
    generated = []
    real = eval_run.generate_replies

    def counting(chat, prompts, *args, **kwargs):
        generated.extend(prompts)
        return real(chat, prompts, *args, **kwargs)

    monkeypatch.setattr(eval_run, "generate_replies", counting)
    report = evaluate(str(tiny_model_dir), str(summaries), "summarize", out=tmp_path / "ev", quiet=True,
                      sampling=sampling)
    assert len(generated) == 6 and report["samples"] == 10
    fresh = evaluate(str(tiny_model_dir), str(summaries), "summarize", out=tmp_path / "fresh", quiet=True,
                     sampling=sampling)
    assert fresh["metrics"] == report["metrics"]


def test_respond_eval_from_a_job_config(tiny_job_dir, tmp_path):
    config = tmp_path / "job.yaml"
    chats = tiny_job_dir / "chats.jsonl"
    config.write_text(yaml.safe_dump({"data": {"path": str(chats)}, "split": {"validation": 0.25}}))
    report = evaluate(str(tiny_job_dir / "run"), str(config), out=tmp_path / "ev", quiet=True,
                      sampling=eval_run.Sampling(temperature=0, max_new_tokens=6))
    assert report["task"] == "respond" and report["samples"] == 6
    assert set(report["metrics"]) >= {"bleu", "rougeL", "distinct1", "distinct2", "avg_words", "stopped_share",
                                      "perplexity"}


def test_compare_prints_one_table_and_draws_a_chart(tiny_model_dir, tiny_job_dir, summaries, tmp_path, capsys):
    code = main(["eval", "--compare", str(tiny_model_dir), str(tiny_job_dir / "run"), "--data", str(summaries),
                 "--task", "summarize", "--max-new-tokens", "4", "-o", str(tmp_path / "cmp")])
    assert code == 0
    shown = capsys.readouterr().out
    rows = [line for line in shown.splitlines() if line.startswith("| /")]
    assert [row.split(" | ")[0][2:] for row in rows] == [str(tiny_model_dir), str(tiny_job_dir / "run")]
    assert "| model | perplexity | loss | rouge1 |" in shown
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_train_evaluates_at_the_end_when_asked(tiny_model_dir, tmp_path):
    from test_train_run import job

    from dialogtune.train.run import train

    summary = train(job(tmp_path, tiny_model_dir, train={"max_steps": 2}, samples=0,
                        eval={"report": True, "limit": 3}), quiet=True)
    assert summary["eval_report"]["metrics"]["perplexity"] > 1
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["samples"] == 3 and report["task"] == "respond"


def test_multi_session_data_gets_perplexity_per_session(tiny_model_dir, tmp_path):
    data = {
        f"d{i}": [{"dial_id": f"d{i}", "turn_id": t, "text": text, "role": "bot_0" if t % 2 == 0 else "bot_1",
                   "session": 1 + t // 4}
                  for t, text in enumerate(["Hi there.", "Hello, how are you?", "Fine thanks.", "Good to hear.",
                                            "Back again!", "Welcome back.", "How was the trip?", "It was great."])]
        for i in range(8)
    }
    path = tmp_path / "msc.json"
    path.write_text(json.dumps(data))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": str(path), "format": "msc"}, "task": {"as": "B"},
                                      "split": {"validation": 0.5}}))
    report = evaluate(str(tiny_model_dir), str(config), "respond", out=tmp_path / "ev", quiet=True,
                      sampling=eval_run.Sampling(temperature=0, max_new_tokens=3))
    per_session = report["metrics_per_session"]
    assert sorted(per_session) == ["1", "2"]
    assert sum(s["tokens"] for s in per_session.values()) == report["trained_tokens"]
    overall = report["metrics"]["loss"]
    weighted = sum(math.log(s["perplexity"]) * s["tokens"] for s in per_session.values()) / report["trained_tokens"]
    assert weighted == pytest.approx(overall, abs=1e-3)


def test_the_task_comes_from_the_job_config_when_not_given(tiny_model_dir, summaries, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": str(summaries)}, "task": {"name": "summarize"},
                                      "split": {"validation": 0.5}}))
    report = evaluate(str(tiny_model_dir), str(config), out=tmp_path / "ev", quiet=True,
                      sampling=eval_run.Sampling(temperature=0, max_new_tokens=3))
    assert report["task"] == "summarize" and "rouge1" in report["metrics"]
