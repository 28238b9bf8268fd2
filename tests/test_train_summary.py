"""What `dialogtune train` adds after training: sample replies beside the message they answer,
the eval report, summary.json and the printed summary; and training itself importing neither
inference nor evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dialogtune.config import TrainJobConfig, build_config
from dialogtune.train.run import train
from dialogtune.train_summary import finish_run, summary_text

INSTRUCTION = "Summarize the following dialogue:"
DIALOGUES = [
    ("Amanda: I baked cookies. Do you want some?\nJerry: Sure!", "Amanda baked cookies for Jerry."),
    ("Olivia: Who are you voting for?\nOliver: Liberals as always.", "Oliver votes for the liberals."),
    ("Tim: Is the station far?\nAnna: Two miles away.", "The station is two miles away."),
    ("Sam: Can you book a table?\nLee: Done, for two.", "Lee booked a table for two."),
]


@pytest.fixture(scope="module")
def summarised(tmp_path_factory, tiny_model_dir):
    """A summarize run trained for 2 steps, finished with one sample and the eval report."""
    directory = tmp_path_factory.mktemp("summarize")
    data = directory / "summaries.jsonl"
    data.write_text("\n".join(json.dumps({"id": str(i), "dialogue": d, "summary": s})
                              for i, (d, s) in enumerate(DIALOGUES * 3)) + "\n")
    config = build_config({
        "data": {"path": str(data)}, "task": {"name": "summarize", "instruction": INSTRUCTION},
        "split": {"validation": 0.25}, "model": {"name": str(tiny_model_dir)}, "template": {"name": "chatml"},
        "max_length": 128, "output": str(directory / "prepared"), "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "report_to": []},
        "eval": {"report": True, "limit": 2}, "run_dir": str(directory / "run"), "samples": 1,
    }, schema=TrainJobConfig)
    summary = finish_run(config, train(config, quiet=True), quiet=True)
    return directory / "run", summary


def test_a_summarize_sample_shows_the_dialogue_not_the_instruction(summarised):
    _, summary = summarised
    [sample] = summary["samples"]
    by_dialogue = dict(DIALOGUES)
    assert sample["context"] in by_dialogue  # the whole dialogue, without the instruction line
    assert sample["reference"] == by_dialogue[sample["context"]]
    first, second = sample["context"].splitlines()
    assert f"  user: {first}\n        {second}\n  model: " in summary_text(summary)


def test_summary_json_gets_the_samples_and_the_eval_report(summarised):
    run, summary = summarised
    written = json.loads((run / "summary.json").read_text())
    assert written["samples"] == summary["samples"] and written["steps"] == 2
    assert written["eval_report"]["path"] == str(run / "eval" / "report.md")
    report = json.loads((run / "eval" / "report.json").read_text())
    assert (report["task"], report["samples"]) == ("summarize", 2)
    assert written["eval_report"]["metrics"] == report["metrics"]


def test_summary_text_rounds_losses_to_four_decimals():
    summary = {
        "run_dir": "runs/r", "final": "runs/r/final", "steps": 12, "train_seconds": 3.44, "tokens_per_s": 2075.6,
        "trained_tokens_per_s": 846.5, "peak_memory_mb": 512.4, "train_loss_last": 2.5733022689819336,
        "eval_loss_before": 5.990314483642578, "eval_loss_after": 5.93617582321167, "skipped_steps": 0,
        "samples": [{"context": "Where is the station?", "reply": "On Main Street.",
                     "reference": "The station is on Main Street."}],
    }
    assert summary_text(summary) == (
        "trained 12 steps in 3s (2076 tokens/s, 846 trained tokens/s, peak memory 512 MB); validation loss"
        " 5.9903 -> 5.9362; last train loss 2.5733; skipped steps 0\n"
        "run: runs/r   model: runs/r/final   plot: runs/r/loss.png\n"
        "  user: Where is the station?\n  model: On Main Street.\n  (reference: The station is on Main Street.)")
    assert "last train loss not logged" in summary_text({**summary, "train_loss_last": None})


def test_training_imports_no_inference_or_evaluation(tmp_path, tiny_model_dir):
    """Run in a fresh interpreter: every dialogtune.train module imported and a run trained
    (asking for samples and a report), then no use or evaluation module may be loaded."""
    tests = Path(__file__).parent
    script = f"""
import importlib, json, pkgutil, sys
from pathlib import Path
sys.path.insert(0, {str(tests)!r})
import dialogtune.train
from test_train_run import job
from dialogtune.train.run import train
for module in pkgutil.iter_modules(dialogtune.train.__path__):
    importlib.import_module("dialogtune.train." + module.name)
train(job(Path({str(tmp_path)!r}), Path({str(tiny_model_dir)!r}), train={{"max_steps": 1}}, samples=1,
          eval={{"every": None, "report": True}}), quiet=True)
print(json.dumps(sorted(sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert "dialogtune.train.run" in loaded and (tmp_path / "run" / "final").exists()
    forbidden = ("dialogtune.infer", "dialogtune.generate", "dialogtune.chat", "dialogtune.serve",
                 "dialogtune.evaluate", "dialogtune.train_summary")
    assert [name for name in loaded if name.startswith(forbidden)] == []


def test_samples_load_a_qlora_base_in_its_training_bits(tmp_path):
    from test_train_run import job

    from dialogtune.train_summary import quantization_of

    assert quantization_of(job(tmp_path, "m", method="qlora")) == {"load_in_4bit": True}
    assert quantization_of(job(tmp_path, "m", method="qlora", quantization_bits=8)) == {"load_in_8bit": True}
    assert quantization_of(job(tmp_path, "m", method="lora", quantization_bits=8)) == {}
    assert quantization_of(job(tmp_path, "m", method="full")) == {}


def test_finish_run_loads_the_run_with_the_quantization_of_its_config(tmp_path, monkeypatch):
    """Up to loading the run: the rest needs the GPU and bitsandbytes that QLoRA trained on."""
    from test_train_run import job

    import dialogtune.infer

    class Loaded(Exception):
        pass

    def load_chat_model(name, **kwargs):
        raise Loaded(name, kwargs)

    monkeypatch.setattr(dialogtune.infer, "load_chat_model", load_chat_model)
    config = job(tmp_path, "m", method="qlora", quantization_bits=8, samples=2)
    with pytest.raises(Loaded) as loaded:
        finish_run(config, {"final": str(tmp_path / "run" / "final"), "run_dir": str(tmp_path / "run")}, quiet=True)
    assert loaded.value.args == (str(tmp_path / "run"), {"load_in_4bit": False, "load_in_8bit": True})


def test_the_eval_report_loads_a_qlora_run_in_its_training_bits(tmp_path, monkeypatch):
    from test_train_run import job

    import dialogtune.evaluate.run

    class Evaluated(Exception):
        pass

    def evaluate(model, data, **kwargs):
        raise Evaluated(model, kwargs)

    monkeypatch.setattr(dialogtune.evaluate.run, "evaluate", evaluate)
    config = job(tmp_path, "m", method="qlora", quantization_bits=4, samples=0, eval={"report": True, "limit": 3})
    (tmp_path / "prepared" / "validation").mkdir(parents=True)
    with pytest.raises(Evaluated) as evaluated:
        finish_run(config, {"final": str(tmp_path / "run" / "final"), "run_dir": str(tmp_path / "run")}, quiet=True)
    assert evaluated.value.args == (str(tmp_path / "run"), {"limit": 3, "out": tmp_path / "run" / "eval",
                                                            "quiet": True, "load_in_4bit": True})
