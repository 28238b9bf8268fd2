"""`dialogtune eval` end to end on tiny models: values against independent computations, long
contexts, resuming, comparing."""

from __future__ import annotations

import json
import math
import shutil
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import save_with_chatml, tiny_llama

from dialogtune.cli import main
from dialogtune.errors import DataError
from dialogtune.evaluate import run as eval_run
from dialogtune.evaluate.run import evaluate
from dialogtune.evaluate.samples import samples_of
from dialogtune.models import load_tokenizer
from dialogtune.tokenize import IGNORE_INDEX

DIALOGUES = [
    ("Amanda: I baked cookies. Do you want some?\nJerry: Sure!", "Amanda baked cookies for Jerry."),
    ("Olivia: Who are you voting for?\nOliver: Liberals as always.", "Oliver votes for the liberals."),
    ("Tim: Is the station far?\nAnna: Two miles away.", "The station is two miles away."),
    ("Sam: Can you book a table?\nLee: Done, for two.", "Lee booked a table for two."),
    ("Kim: Is it raining?\nBo: No, it is sunny.", "It is sunny, not raining."),
]
SUMMARIES = [s for _, s in DIALOGUES * 2]
INSTRUCTION_HEAD = "<|im_start|>user\nSummarize the following dialogue:"


def long_dialogue(lines: int) -> str:
    return "\n".join(f"Tim{i % 7}: Is the station far from the museum, {i}?" for i in range(lines))


def write_summaries(path, pairs):
    path.write_text("\n".join(json.dumps({"id": str(i), "dialogue": d, "summary": s})
                              for i, (d, s) in enumerate(pairs)) + "\n")
    return path


@pytest.fixture(scope="module")
def unk_model_dir(tmp_path_factory, metaspace_tokenizer):
    """A tiny random Llama-style model whose tokenizer knows no 'O', 'C' or 'v' (they become <unk>)."""
    return save_with_chatml(tmp_path_factory.mktemp("unk-llama"), tiny_llama(metaspace_tokenizer, layers=1),
                            metaspace_tokenizer)


@pytest.fixture
def generated(monkeypatch) -> list:
    """Every prompt evaluation generates for, from the moment the test asks for this on."""
    prompts: list = []
    real = eval_run.generate_replies

    def counting(chat, batch, *args, **kwargs):
        prompts.extend(batch)
        return real(chat, batch, *args, **kwargs)

    monkeypatch.setattr(eval_run, "generate_replies", counting)
    return prompts


@pytest.fixture(scope="module")
def summaries(tmp_path_factory):
    return write_summaries(tmp_path_factory.mktemp("samsum") / "summaries.jsonl", DIALOGUES * 2)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def prepared_rows(out, split="train"):
    import datasets

    return list(datasets.load_from_disk(str(out / "prepared" / split)))


def load_model(model_dir, run=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if run is not None:
        from peft import PeftModel

        with warnings.catch_warnings():  # PEFT's own use of a deprecated transformers property
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            model = PeftModel.from_pretrained(model, str(run / "final"))
    return model.eval()


def loss_of(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed loss and count over the trained tokens of one sequence, the plain transformers way."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    targets = torch.tensor(labels[1:])
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum").item(), int(keep.sum())


def expected_loss(model, rows) -> tuple[float, int]:
    """Every prepared row (one whole example each, none longer than the model's context) scored whole."""
    parts = [loss_of(model, row["input_ids"], row["labels"]) for row in rows]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def assert_loss(report, total, count):
    assert report["trained_tokens"] == count
    assert report["metrics"]["loss"] == pytest.approx(total / count, abs=1e-5)
    assert report["metrics"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_summarize_report_values_predictions_and_markdown(tiny_model_dir, summaries, tmp_path):
    report = evaluate(str(tiny_model_dir), str(summaries), "summarize", out=tmp_path / "ev", quiet=True,
                      sampling=eval_run.Sampling(temperature=0, max_new_tokens=6))
    assert (report["samples"], report["task"], report["decoding"]["greedy"]) == (10, "summarize", True)
    assert report["cut"] == {"context_length": 512, "prompt_limit": 506, "samples": 0, "tokens": 0,
                             "heads_dropped": 0, "loss_samples": 0, "loss_tokens": 0, "loss_heads_dropped": 0}
    rows = prepared_rows(tmp_path / "ev")
    assert_loss(report, *expected_loss(load_model(tiny_model_dir), rows))
    assert [row["trained_messages"] for row in rows] == [[s] for s in SUMMARIES]  # the data's own text
    assert [row["system_messages"] for row in rows] == [[""]] * 10
    assert len(report["data_fingerprint"]) == 32
    predictions = read_jsonl(tmp_path / "ev" / "predictions.jsonl")
    assert [p["index"] for p in predictions] == list(range(10))
    assert [p["reference"] for p in predictions] == SUMMARIES
    assert predictions[0]["context"] == (f"{INSTRUCTION_HEAD}\n{DIALOGUES[0][0]}<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    assert all(p["context_cut"] == 0 for p in predictions)
    markdown = (tmp_path / "ev" / "report.md").read_text()
    assert "## 10 best" in markdown and "## 10 worst" in markdown and "| rouge1 |" in markdown


def test_a_context_longer_than_the_model_is_cut_from_the_left_not_dropped(tiny_model_dir, tmp_path):
    """The tiny model reads 512 tokens; with 6 for the reply a prompt may have 506. The long
    dialogue's prompt keeps its instruction and its end; its loss window keeps 512 tokens."""
    data = write_summaries(tmp_path / "long.jsonl", [DIALOGUES[0], (long_dialogue(20), "Tim asks about the way."),
                                                     DIALOGUES[1]])
    report = evaluate(str(tiny_model_dir), str(data), "summarize", out=tmp_path / "ev", quiet=True,
                      sampling=eval_run.Sampling(temperature=0, max_new_tokens=6))
    rows = prepared_rows(tmp_path / "ev")
    long_row = rows[1]
    trained = [i for i, label in enumerate(long_row["labels"]) if label != IGNORE_INDEX]
    start, end = trained[0], trained[-1] + 1
    assert start > 506  # the whole example was prepared: nothing split off or rejected
    assert report["samples"] == 3
    assert report["cut"] == {"context_length": 512, "prompt_limit": 506, "samples": 1, "tokens": start - 506,
                             "heads_dropped": 0, "loss_samples": 1, "loss_tokens": end - 512, "loss_heads_dropped": 0}
    predictions = read_jsonl(tmp_path / "ev" / "predictions.jsonl")
    assert [p["context_cut"] for p in predictions] == [0, start - 506, 0]
    assert [p["reference"] for p in predictions] == [DIALOGUES[0][1], "Tim asks about the way.", DIALOGUES[1][1]]
    context = predictions[1]["context"]
    assert context.startswith(INSTRUCTION_HEAD) and "museum, 0?" not in context
    assert context.endswith("Tim5: Is the station far from the museum, 19?<|im_end|>\n<|im_start|>assistant\n")
    # The loss window is the kept head (the tokens the cut prompt shares with the full one) and
    # the last 512 - head tokens up to the end of the summary.
    prompt = load_tokenizer(str(tiny_model_dir))(context, add_special_tokens=False)["input_ids"]
    head = next(i for i, (a, b) in enumerate(zip(prompt, long_row["input_ids"], strict=False)) if a != b)
    assert load_tokenizer(str(tiny_model_dir)).decode(prompt[:head]) == f"{INSTRUCTION_HEAD}\n"
    window = long_row["input_ids"][:head] + long_row["input_ids"][end - (512 - head) : end]
    window_labels = [IGNORE_INDEX] * (512 - (end - start)) + long_row["labels"][start:end]
    model = load_model(tiny_model_dir)
    parts = [loss_of(model, rows[0]["input_ids"], rows[0]["labels"]), loss_of(model, window, window_labels),
             loss_of(model, rows[2]["input_ids"], rows[2]["labels"])]
    assert_loss(report, sum(p[0] for p in parts), sum(p[1] for p in parts))


def test_the_prompt_needs_room_in_the_model(tiny_model_dir, summaries, tmp_path, capsys):
    code = main(["eval", str(tiny_model_dir), "--data", str(summaries), "--task", "summarize",
                 "--max-new-tokens", "512", "-o", str(tmp_path / "ev")])
    assert code == 2
    assert "--max-new-tokens 512 leaves no room for a prompt" in capsys.readouterr().err


def test_the_same_eval_twice_gives_identical_metrics(tiny_model_dir, summaries, tmp_path):
    settings = {"out": None, "quiet": True, "sampling": eval_run.Sampling(temperature=0, max_new_tokens=5)}
    first = evaluate(str(tiny_model_dir), str(summaries), "summarize", **{**settings, "out": tmp_path / "a"})
    second = evaluate(str(tiny_model_dir), str(summaries), "summarize", **{**settings, "out": tmp_path / "b"})
    assert first["metrics"] == second["metrics"]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["metrics"] == first["metrics"]


def test_a_torn_last_prediction_is_redone_not_fatal(tiny_model_dir, summaries, tmp_path, generated):
    sampling = eval_run.Sampling(temperature=0, max_new_tokens=5)
    evaluate(str(tiny_model_dir), str(summaries), "summarize", limit=4, out=tmp_path / "ev", quiet=True,
             sampling=sampling)
    path = tmp_path / "ev" / "predictions.jsonl"
    whole = path.read_text(encoding="utf-8")
    path.write_text(whole + whole.splitlines()[0][:30], encoding="utf-8")  # killed in the middle of a write
    generated.clear()
    report = evaluate(str(tiny_model_dir), str(summaries), "summarize", out=tmp_path / "ev", quiet=True,
                      sampling=sampling)
    assert len(generated) == 6 and report["samples"] == 10
    assert len(read_jsonl(path)) == 10


def test_an_interrupted_eval_resumes_without_redoing_samples(tiny_model_dir, summaries, tmp_path, generated):
    sampling = eval_run.Sampling(temperature=0, max_new_tokens=5)
    evaluate(str(tiny_model_dir), str(summaries), "summarize", limit=4, out=tmp_path / "ev", quiet=True,
             sampling=sampling)  # stands in for a run stopped after 4 samples
    generated.clear()
    report = evaluate(str(tiny_model_dir), str(summaries), "summarize", out=tmp_path / "ev", quiet=True,
                      sampling=sampling)
    assert len(generated) == 6 and report["samples"] == 10
    fresh = evaluate(str(tiny_model_dir), str(summaries), "summarize", out=tmp_path / "fresh", quiet=True,
                     sampling=sampling)
    assert fresh["metrics"] == report["metrics"]
    assert read_jsonl(tmp_path / "ev" / "predictions.jsonl") == read_jsonl(tmp_path / "fresh" / "predictions.jsonl")


def test_respond_eval_from_a_job_config(tiny_model_dir, tiny_job_dir, tmp_path):
    from test_train_run import ANSWERS

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": str(tiny_job_dir / "chats.jsonl")},
                                      "split": {"validation": 0.25}}))
    report = evaluate(str(tiny_job_dir / "run"), str(config), out=tmp_path / "ev", quiet=True,
                      sampling=eval_run.Sampling(temperature=0, max_new_tokens=6))
    rows = prepared_rows(tmp_path / "ev", "validation")
    held_out = [int(row["dialogue_ids"][0].removeprefix("c")) for row in rows]
    assert report["task"] == "respond" and report["samples"] == len(held_out) == 6
    predictions = read_jsonl(tmp_path / "ev" / "predictions.jsonl")
    assert [p["reference"] for p in predictions] == [ANSWERS[i % 6] for i in held_out]
    assert set(report["metrics"]) == {"perplexity", "loss", "bleu", "rougeL", "distinct1", "distinct2", "avg_words",
                                      "stopped_share"}
    assert_loss(report, *expected_loss(load_model(tiny_model_dir, tiny_job_dir / "run"), rows))


def test_compare_scores_every_model_on_the_same_samples(tiny_model_dir, tiny_job_dir, tmp_path, capsys,
                                                        monkeypatch):
    """The run was trained with max_length 128; a 200-token dialogue is still one of its samples."""
    data = write_summaries(tmp_path / "data.jsonl", [*DIALOGUES, (long_dialogue(6), "Tim asks about the way.")])
    bars = []

    class Bar:  # stands in for tqdm: what was shown
        def __init__(self, **kwargs):
            self.shown = {**kwargs, "done": kwargs["initial"]}
            bars.append(self.shown)

        def update(self, n):
            self.shown["done"] += n

        def close(self):
            pass

    monkeypatch.setattr(eval_run, "tqdm", Bar)
    models = [str(tiny_model_dir), str(tiny_job_dir / "run")]
    code = main(["eval", "--compare", *models, "--data", str(data), "--task", "summarize", "--max-new-tokens", "4",
                 "-o", str(tmp_path / "cmp")])
    assert code == 0
    shown = capsys.readouterr().out
    rows = [line for line in shown.splitlines() if line.startswith("| /")]
    assert [row.split(" | ")[0][2:] for row in rows] == models
    assert "| model | perplexity | loss | rouge1 |" in shown
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert [(b["desc"], b["total"], b["done"], b["unit"]) for b in bars] == [(m, 6, 6, " samples") for m in models]
    for name in (tiny_model_dir.name, "run"):
        assert json.loads((tmp_path / "cmp" / name / "report.json").read_text())["samples"] == 6
        references = [p["reference"] for p in read_jsonl(tmp_path / "cmp" / name / "predictions.jsonl")]
        assert references == [s for _, s in DIALOGUES] + ["Tim asks about the way."]


def test_compare_refuses_models_scored_on_different_samples(tiny_model_dir, summaries, tmp_path, capsys,
                                                           monkeypatch):
    """A chat template that refuses some conversations leaves its model fewer samples: refused
    before any model's weights load, let alone generate."""
    loaded, generated = [], []
    monkeypatch.setattr(eval_run, "load_chat_model", lambda name, **kwargs: loaded.append(name))
    monkeypatch.setattr(eval_run, "generate_replies", lambda *args, **kwargs: generated.append(args))
    picky = tmp_path / "picky"
    shutil.copytree(tiny_model_dir, picky)
    config = json.loads((picky / "tokenizer_config.json").read_text())
    template = (picky / "chat_template.jinja") if (picky / "chat_template.jinja").exists() else None
    source = template.read_text() if template else config["chat_template"]
    source = ("{%- for m in messages if 'cookies' in m['content'] -%}{{ raise_exception('no cookies') }}"
              "{%- endfor -%}" + source)
    if template:
        template.write_text(source)
    else:
        (picky / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": source}))
    code = main(["eval", "--compare", str(tiny_model_dir), str(picky), "--data", str(summaries), "--task",
                 "summarize", "--max-new-tokens", "2", "-o", str(tmp_path / "cmp")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"{tiny_model_dir} has 10 samples and {picky} 8" in error
    assert "differ from sample 0 on (reference 'Amanda baked cookies for Jerry.' vs 'Oliver votes" in error
    assert str(tmp_path / "cmp" / "picky" / "prepared" / "rejects.jsonl") in error
    assert loaded == generated == []
    assert not (tmp_path / "cmp" / tiny_model_dir.name / "predictions.jsonl").exists()


def test_compare_prepares_every_model_first_then_scores_one_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    """Each model is freed (its modules hold reference cycles) before the next one loads."""
    data = write_summaries(tmp_path / "data.jsonl", DIALOGUES[:2])
    events, models = [], []
    real_prepare, real_load = eval_run.prepare_for, eval_run.load_chat_model

    def preparing(prompting, *args):
        events.append(("prepare", prompting.name))
        return real_prepare(prompting, *args)

    def loading(name, **kwargs):
        assert [ref() for ref in models] == [None] * len(models)  # every model before this one is gone
        events.append(("load", name.name))  # eval hands over the Prompting it read first
        chat = real_load(name, **kwargs)
        models.append(weakref.ref(chat.model))
        return chat

    monkeypatch.setattr(eval_run, "prepare_for", preparing)
    monkeypatch.setattr(eval_run, "load_chat_model", loading)
    names = [str(tiny_model_dir), f"{tiny_model_dir}/"]
    reports = eval_run.compare(names, str(data), "summarize", tmp_path / "cmp",
                               sampling=eval_run.Sampling(temperature=0, max_new_tokens=2))
    assert events == [("prepare", names[0]), ("prepare", names[1]), ("load", names[0]), ("load", names[1])]
    assert [r["samples"] for r in reports] == [2, 2]


def test_compare_keys_samples_by_the_data_text_not_each_tokenizer_decoding(tiny_model_dir, unk_model_dir, tmp_path):
    """The second model's tokenizer decodes 'Oliver votes' as '<unk>li<unk>er <unk>otes': the
    samples are still the same texts of the same data, compared and scored as such."""
    data = write_summaries(tmp_path / "data.jsonl", DIALOGUES)
    reports = eval_run.compare([str(tiny_model_dir), str(unk_model_dir)], str(data), "summarize", tmp_path / "cmp",
                               sampling=eval_run.Sampling(temperature=0, max_new_tokens=2))
    assert [r["samples"] for r in reports] == [5, 5]
    for name in (tiny_model_dir.name, unk_model_dir.name):
        references = [p["reference"] for p in read_jsonl(tmp_path / "cmp" / name / "predictions.jsonl")]
        assert references == [s for _, s in DIALOGUES]
    unk = load_tokenizer(str(unk_model_dir))
    rows = prepared_rows(tmp_path / "cmp" / unk_model_dir.name)
    assert [s.reference for s in samples_of([{k: v for k, v in row.items() if k != "trained_messages"}
                                             for row in rows], unk, "<|im_end|>")][1] == \
        "<unk>li<unk>er <unk>otes for the liberals."  # what keying by the decoded text compared


def test_a_cut_context_keeps_the_whole_system_message(tiny_model_dir, tmp_path):
    """No system prompt is configured: the system message is the data's own (`rows` contexts,
    like persona lines), and a cut context keeps it whole, with the user's header."""
    system = "Your persona: I live by the station.\nYour persona: I walk everywhere."
    records = [{"input": long_dialogue(30), "response": "Two miles.", "contexts": system.split("\n")},
               {"input": "Is it far?", "response": "No.", "contexts": system.split("\n")}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = evaluate(str(tiny_model_dir), str(data), "respond", out=tmp_path / "ev", quiet=True,
                      sampling=eval_run.Sampling(temperature=0, max_new_tokens=6))
    head_text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    predictions = read_jsonl(tmp_path / "ev" / "predictions.jsonl")
    context = predictions[0]["context"]
    assert context.startswith(head_text) and "museum, 0?" not in context
    assert context.endswith("Tim1: Is the station far from the museum, 29?<|im_end|>\n<|im_start|>assistant\n")
    assert predictions[0]["context_cut"] > 0 and predictions[1]["context_cut"] == 0
    rows = prepared_rows(tmp_path / "ev")
    assert [row["system_messages"] for row in rows] == [[system], [system]]
    head = len(load_tokenizer(str(tiny_model_dir))(head_text, add_special_tokens=False)["input_ids"])
    long_row = rows[0]
    trained = [i for i, label in enumerate(long_row["labels"]) if label != IGNORE_INDEX]
    end = trained[-1] + 1
    assert report["cut"]["loss_samples"] == 1 and report["cut"]["heads_dropped"] == 0
    window = long_row["input_ids"][:head] + long_row["input_ids"][end - (512 - head) : end]
    window_labels = [IGNORE_INDEX] * (512 - len(trained)) + long_row["labels"][trained[0] : end]
    model = load_model(tiny_model_dir)
    parts = [loss_of(model, window, window_labels), loss_of(model, rows[1]["input_ids"], rows[1]["labels"])]
    assert_loss(report, sum(p[0] for p in parts), sum(p[1] for p in parts))


def test_nothing_to_evaluate_is_refused(tiny_model_dir, summaries, tmp_path, capsys):
    code = main(["eval", str(tiny_model_dir), "--data", str(summaries), "--task", "summarize", "--limit", "0",
                 "-o", str(tmp_path / "ev")])
    assert code == 2
    assert capsys.readouterr().err == ("dialogtune eval: error: nothing to evaluate: --limit 0 (eval.limit in a job"
                                       " config) selects no samples\n")
    assert not (tmp_path / "ev").exists()
    untrained = samples_of([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}], None, "<|im_end|>")
    with pytest.raises(DataError) as refused:
        eval_run.require_samples(untrained, tmp_path / "ev" / "prepared", "validation", 1)
    assert str(refused.value) == (f"nothing to evaluate: the validation split of {tmp_path / 'ev' / 'prepared'} has"
                                  " no trained turns (1 examples); check the task and `as` (--as)")


def test_the_reply_must_fit_the_decoder_of_an_encoder_decoder():
    from types import SimpleNamespace

    from dialogtune.errors import ConfigError

    bart = SimpleNamespace(name="runs/bart", context_length=256, is_encoder_decoder=True)
    assert eval_run.prompt_limit(bart, eval_run.Sampling(max_new_tokens=256)) == 256
    with pytest.raises(ConfigError) as refused:
        eval_run.prompt_limit(bart, eval_run.Sampling(max_new_tokens=257))
    assert str(refused.value) == "--max-new-tokens 257 is more than runs/bart can write: its decoder has 256 positions"


def test_train_evaluates_at_the_end_when_asked(tiny_model_dir, tmp_path):
    from test_train_run import job

    from dialogtune.train.run import train
    from dialogtune.train_summary import finish_run

    config = job(tmp_path, tiny_model_dir, train={"max_steps": 2}, samples=0, eval={"report": True, "limit": 3})
    summary = finish_run(config, train(config, quiet=True), quiet=True)
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["samples"] == 3 and report["task"] == "respond"
    assert summary["eval_report"]["metrics"] == report["metrics"]
    rows = prepared_rows(tmp_path / "run" / "eval", "validation")[:3]  # one trained turn a row
    assert_loss(report, *expected_loss(load_model(tiny_model_dir, tmp_path / "run"), rows))


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
    rows = prepared_rows(tmp_path / "ev", "validation")
    assert report["samples"] == sum(len(row["turn_sessions"]) for row in rows) == 4 * len(rows)
    assert_loss(report, *expected_loss(load_model(tiny_model_dir), rows))
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
    assert report["samples"] == len(prepared_rows(tmp_path / "ev", "validation")) == 5


def test_a_comparison_needs_one_task(tmp_path):
    from dialogtune.errors import ConfigError

    base = eval_run.SampleSet("base", "respond", [(0, "Hi.")], tmp_path / "a" / "rejects.jsonl")
    run = eval_run.SampleSet("runs/samsum", "summarize", [(0, "Hi.")], tmp_path / "b" / "rejects.jsonl")
    with pytest.raises(ConfigError, match="base would be evaluated on respond and runs/samsum on summarize; name"):
        base.require_same(run)
    base.require_same(eval_run.SampleSet("other", "respond", [(0, "Hi.")], tmp_path / "c" / "rejects.jsonl"))


def test_models_of_one_name_never_share_predictions(tiny_model_dir, tmp_path, generated):
    data = write_summaries(tmp_path / "data.jsonl", DIALOGUES[:3])
    eval_run.compare([str(tiny_model_dir), f"{tiny_model_dir}/"], str(data), "summarize", tmp_path / "cmp",
                     sampling=eval_run.Sampling(temperature=0, max_new_tokens=2))
    name = tiny_model_dir.name
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [f"1-{name}", f"2-{name}", "compare.png"]
    assert len(generated) == 6
    # Other decoding settings are other predictions, not a resume.
    evaluate(str(tiny_model_dir), str(data), "summarize", out=tmp_path / "cmp" / f"1-{name}", quiet=True,
             sampling=eval_run.Sampling(temperature=0, max_new_tokens=3))
    assert len(generated) == 9


def test_eval_of_an_encoder_decoder_run(tiny_bart_run, tmp_path):
    """Perplexity over the decoder targets, checked against plain transformers + PEFT forward passes."""
    from peft import PeftModel
    from test_train_run import ANSWERS
    from transformers import AutoModelForSeq2SeqLM

    from dialogtune.records import RunInfo

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": str(tiny_bart_run / "chats.jsonl")},
                                      "task": {"as": "assistant", "context": {"rounds": 2}},
                                      "split": {"validation": 0.25, "seed": 0}}))
    assert main(["eval", str(tiny_bart_run / "run"), "--data", str(config), "--max-new-tokens", "4",
                 "-o", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    trained = prepared_rows(tiny_bart_run, "validation")  # what training held out
    assert report["samples"] == sum(len(row["turn_sessions"]) for row in trained) == 6
    held_out = [int(row["dialogue_ids"][0].removeprefix("c")) for row in trained]
    predictions = read_jsonl(tmp_path / "ev" / "predictions.jsonl")
    assert [p["reference"] for p in predictions] == [ANSWERS[i % 6] for i in held_out]
    base = AutoModelForSeq2SeqLM.from_pretrained(RunInfo.load(tiny_bart_run / "run" / "final").base_model_path)
    with warnings.catch_warnings():  # PEFT's own use of a deprecated transformers property
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        model = PeftModel.from_pretrained(base, str(tiny_bart_run / "run" / "final")).eval()
    total, count = 0.0, 0
    for row in prepared_rows(tmp_path / "ev", "validation"):
        trained_at = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
        start, target = trained_at[0], row["input_ids"][trained_at[0] : trained_at[-1] + 1]
        with torch.no_grad():
            mean = model(input_ids=torch.tensor([row["input_ids"][:start]]), labels=torch.tensor([target])).loss.item()
        total, count = total + mean * len(target), count + len(target)
    assert_loss(report, total, count)
    assert report["cut"]["prompt_limit"] == report["cut"]["context_length"] == 256  # the encoder reads the prompt alone
