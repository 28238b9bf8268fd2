"""Integration: LoRA-train the real embedded SmolLM2-135M for a few steps on the shipped
sample, then load the adapter the way users do and generate with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dialogtune.config import TrainJobConfig, build_config
from dialogtune.train.run import train
from dialogtune.train_summary import finish_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lora_on_smollm2_trains_and_reloads_for_generation(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dialogtune.models import load_tokenizer, resolve

    config = build_config({
        "data": {"path": str(ROOT / "examples" / "data" / "sgd_sample"), "format": "sgd"},
        "task": {"as": "SYSTEM", "context": {"rounds": 2}}, "split": {"validation": 0.05},
        "model": {"name": "smollm2-135m-instruct"}, "max_length": 128, "pack": True,
        "output": str(tmp_path / "prepared"), "method": "lora",
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 3, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 8,
                  "learning_rate": 1e-3, "logging_steps": 1, "report_to": []},
        "eval": {"every": 3}, "run_dir": str(tmp_path / "run"), "samples": 1,
    }, schema=TrainJobConfig)
    summary = finish_run(config, train(config, quiet=True), quiet=True)
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert 0 < summary["eval_loss_after"] < 10 and summary["eval_loss_before"] < 10
    assert summary["samples"] and summary["samples"][0]["reply"]

    base = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct"))
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final")).eval()
    tokenizer = load_tokenizer(str(tmp_path / "run" / "final"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "I want to find a restaurant."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(out[0]) > prompt["input_ids"].shape[1] and reply.strip()
