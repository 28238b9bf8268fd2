"""`dialogtune train` on tiny random models: learning, exact accumulation, run directories,
loading with plain PEFT, and the errors a user can meet."""

from __future__ import annotations

import json

import pytest
import torch

from dialogtune.config import TrainJobConfig, build_config
from dialogtune.errors import ConfigError, DataError, RunError
from dialogtune.train.run import train

QUESTIONS = ["Where is the station?", "What time is it?", "Can you book a table?", "Is it raining?",
             "How far is the museum?", "Do you like trains?"]
ANSWERS = ["The station is on Main Street.", "It is seven o'clock.", "Your table is booked for two.",
           "No, it is sunny today.", "The museum is two miles away.", "Yes, I love trains."]


def write_chats(path, count=24):
    lines = []
    for i in range(count):
        q, a = QUESTIONS[i % 6], ANSWERS[i % 6]
        lines.append(json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def job(tmp_path, model_dir, **sections) -> TrainJobConfig:
    data = write_chats(tmp_path / "chats.jsonl")
    raw = {
        "data": {"path": str(data)}, "task": {"as": "assistant"}, "split": {"validation": 0.25, "seed": 0},
        "model": {"name": str(model_dir)}, "template": {"name": "chatml"}, "max_length": 128,
        "output": str(tmp_path / "prepared"), "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 12, "learning_rate": 0.01, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "warmup_steps": 0, "lr_scheduler_type": "constant", "report_to": []},
        "eval": {"every": 6}, "run_dir": str(tmp_path / "run"), "samples": 1,
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return build_config(raw, schema=TrainJobConfig)


def test_lora_training_lowers_validation_loss_and_writes_the_run(tmp_path, tiny_model_dir):
    summary = train(job(tmp_path, tiny_model_dir), quiet=True)
    # A random 2-layer model starts at the uniform loss ln(400) = 5.99; LoRA moves it slowly.
    assert summary["eval_loss_before"] == pytest.approx(5.99, abs=0.05)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1
    run = tmp_path / "run"
    final = run / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    info = json.loads((final / "dialogtune.json").read_text())
    assert (info["template"], info["end_of_turn"], info["speakers_as"]) == ("chatml", "<|im_end|>", ["assistant"])
    assert "<|im_start|>" in (final / "chat_template.jinja").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 6, 12, 12]
    assert all(r["tokens_per_s"] > 0 and r["skipped_steps"] == 0 for r in records if "loss" in r)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-6"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 12


def test_run_json_records_the_resolved_training_arguments(tmp_path, tiny_model_dir):
    train(job(tmp_path, tiny_model_dir, train={"max_steps": 2}, samples=0), quiet=True)
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    arguments = recorded["training_arguments"]
    assert (arguments["max_steps"], arguments["learning_rate"]) == (2, 0.01)  # from train:
    assert (arguments["seed"], arguments["data_seed"], arguments["max_grad_norm"]) == (0, 0, 1.0)  # dialogtune's
    assert (arguments["save_steps"], arguments["eval_steps"]) == (6, 6)  # from eval.every
    assert arguments["output_dir"] == str(tmp_path / "run" / "checkpoints")
    assert recorded["config"]["eval"]["greater_is_better"] is False  # the config as resolved


def test_training_prints_no_deprecation_warnings_from_transformers_or_peft(tmp_path, tiny_model_dir):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(job(tmp_path, tiny_model_dir, train={"max_steps": 2}, samples=0), quiet=True)
    libraries = ("/transformers/", "/peft/")
    deprecations = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning))
                    and any(name in w.filename for name in libraries)]
    assert deprecations == []


def test_adapter_loads_with_plain_peft_and_merges(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dialogtune.train.export import export_merged

    train(job(tmp_path, tiny_model_dir, train={"max_steps": 4}), quiet=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final")).eval()
    merged_dir = export_merged(tmp_path / "run")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.tensor([[1, 5, 9, 30, 60, 7]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert not torch.allclose(plain, merged(input_ids=ids).logits, atol=1e-4)  # the adapter did something
    assert (merged_dir / "dialogtune.json").exists() and (merged_dir / "tokenizer.json").exists()


def test_full_fine_tuning_lowers_validation_loss(tmp_path, tiny_model_dir):
    summary = train(job(tmp_path, tiny_model_dir, method="full", train={"learning_rate": 0.003}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def _final_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "final" / "model.safetensors"))


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_model_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    common = {"max_steps": 1, "learning_rate": 0.01, "optim": "sgd", "weight_decay": 0.0}
    big = job(tmp_path / "a", tiny_model_dir, method="full", eval={"every": None}, split={"validation": 0},
              run_dir=str(tmp_path / "big"),
              train={**common, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1})
    small = job(tmp_path / "b", tiny_model_dir, method="full", eval={"every": None}, split={"validation": 0},
                run_dir=str(tmp_path / "small"),
                train={**common, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4})
    train(big, quiet=True)
    train(small, quiet=True)

    def logged_loss(run):
        return next(json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(line))

    assert logged_loss(tmp_path / "big") == pytest.approx(logged_loss(tmp_path / "small"), abs=1e-5)
    a, b = _final_weights(tmp_path / "big"), _final_weights(tmp_path / "small")
    before = _load_tiny_weights(tiny_model_dir)
    assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-4  # the step moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def _load_tiny_weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_run_directory_is_not_clobbered(tmp_path, tiny_model_dir):
    config = job(tmp_path, tiny_model_dir, train={"max_steps": 2})
    train(config, quiet=True)
    with pytest.raises(RunError, match="already holds a run; pass --resume .* or --overwrite"):
        train(config, quiet=True)
    other = job(tmp_path, tiny_model_dir, train={"max_steps": 2}, lora={"r": 4})
    with pytest.raises(RunError, match=r"holds a different run \(lora differ\)"):
        train(other, resume=True, quiet=True)
    assert train(other, overwrite=True, quiet=True)["steps"] == 2


def test_configuration_errors_are_clear(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="train.output_dir is managed by dialogtune; set run_dir instead"):
        train(job(tmp_path, tiny_model_dir, train={"output_dir": "x"}), quiet=True)
    with pytest.raises(ConfigError, match="train.greater_is_better is managed by dialogtune; set"
                                          " eval.greater_is_better instead"):
        train(job(tmp_path, tiny_model_dir, train={"greater_is_better": True}), quiet=True)
    with pytest.raises(ConfigError, match=r"learnig_rate \(did you mean learning_rate\?\)"):
        train(job(tmp_path, tiny_model_dir, train={"learnig_rate": 1.0}), quiet=True)
    with pytest.raises(RunError, match="needs a CUDA GPU"):
        train(job(tmp_path, tiny_model_dir, method="qlora"), quiet=True)
    with pytest.raises(RunError, match="precision: bf16 needs a CUDA GPU"):
        train(job(tmp_path, tiny_model_dir, precision="bf16"), quiet=True)
    with pytest.raises(RunError, match=r"lora.target_modules: qkv not in this model; .*q_proj"):
        train(job(tmp_path, tiny_model_dir, lora={"target_modules": ["qkv"]}), quiet=True)


def test_data_prepared_for_another_tokenizer_is_refused(tmp_path, tiny_model_dir, metaspace_tokenizer):
    from dialogtune.prepare import prepare

    other = tmp_path / "other-model"
    metaspace_tokenizer.save_pretrained(other)
    config = job(tmp_path, tiny_model_dir)
    prepare(build_config({**config.model_dump(by_alias=True), "model": {"name": str(other)}}), quiet=True)
    # Same output directory, different tokenizer: train re-prepares (the fingerprint includes the
    # tokenizer), so the refusal is for a manifest that does not match the model.
    from dialogtune.records import PreparedInfo

    manifest = PreparedInfo.load(tmp_path / "prepared")
    from dialogtune.models import load_tokenizer
    from dialogtune.train.run import check_tokenizer

    with pytest.raises(DataError, match=f"prepared with the tokenizer of '{other}'"):
        check_tokenizer(manifest, load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir), tmp_path / "prepared")


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][0] = float("inf")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    config = job(tmp_path, broken, method="full", max_bad_steps=2, eval={"every": None}, split={"validation": 0})
    with pytest.raises(RunError, match="stopped at step 2: 2 optimizer steps in a row had a non-finite"):
        train(config, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [1, 2]


def test_seq2seq_bart_trains(tmp_path, tiny_bart_dir):
    config = job(tmp_path, tiny_bart_dir, method="full", template={"name": "user_assistant"},
                 train={"learning_rate": 0.003, "max_steps": 12})
    summary = train(config, quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    info = json.loads((tmp_path / "run" / "final" / "dialogtune.json").read_text())
    assert info["template"] == "user_assistant"


def test_seq2seq_refuses_packed_data(tmp_path, tiny_bart_dir):
    with pytest.raises(RunError, match="cannot train on packed rows"):
        train(job(tmp_path, tiny_bart_dir, method="full", template={"name": "user_assistant"}, pack=True), quiet=True)


def test_export_refuses_a_directory_that_is_not_a_dialogtune_model(tiny_job_dir, tmp_path, capsys, monkeypatch):
    import peft

    from dialogtune.cli import main

    def no_merge(*args, **kwargs):
        raise AssertionError("the refusal must come before the merge work")

    monkeypatch.setattr(peft.AutoPeftModelForCausalLM, "from_pretrained", no_merge)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert main(["export", str(tiny_job_dir / "run"), "--merge", "-o", str(target)]) == 2
    assert capsys.readouterr().err == (f"dialogtune export: error: {target}: exists and is not a dialogtune model"
                                       " directory (no dialogtune.json); export would replace what it holds:"
                                       " choose another -o\n")
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("a file")
    assert main(["export", str(tiny_job_dir / "run"), "--merge", "-o", str(tmp_path / "file")]) == 2
    assert "file: exists and is not a dialogtune model directory" in capsys.readouterr().err
    final = tiny_job_dir / "run" / "final"
    assert main(["export", str(tiny_job_dir / "run"), "--merge", "-o", str(final)]) == 2
    assert capsys.readouterr().err == (f"dialogtune export: error: {final}: is the run's adapter, which the merged"
                                       " model would replace; choose another -o\n")
    assert (final / "adapter_config.json").exists()


def test_export_writes_into_an_empty_directory_and_replaces_its_own_export(tiny_job_dir, tmp_path, capsys):
    from dialogtune.cli import main

    target = tmp_path / "merged"
    target.mkdir()
    for _ in range(2):  # empty, then holding the first export (with its dialogtune.json)
        assert main(["export", str(tiny_job_dir / "run"), "--merge", "-o", str(target)]) == 0
        assert capsys.readouterr().out == f"merged model written to {target}\n"
    assert sorted(p.name for p in target.iterdir()) == ["chat_template.jinja", "config.json", "dialogtune.json",
                                                        "generation_config.json", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging or old copy left
