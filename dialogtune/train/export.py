"""The run's final model, loadable without dialogtune, and `dialogtune export RUN --merge`.

final/ holds the model (full fine-tuning) or the LoRA adapter, the tokenizer with the exact
chat template used in training as its `chat_template`, and dialogtune.json: task, template,
end-of-turn marker, speakers and stop strings, so chat and serve render prompts exactly as
training did. An adapter loads with the usual snippet:

    base = AutoModelForCausalLM.from_pretrained(BASE)
    model = PeftModel.from_pretrained(base, "RUN/final")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dialogtune
from dialogtune.config import TrainJobConfig
from dialogtune.models import resolve

FINAL = "final"
RUN_INFO = "dialogtune.json"


def save_final(model, tokenizer, manifest: dict, config: TrainJobConfig, run: Path) -> Path:
    final = run / FINAL
    staging = run / f".{FINAL}-staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.chat_template = manifest["template"]["source"]
    tokenizer.save_pretrained(staging)
    info = {
        "dialogtune_version": dialogtune.__version__,
        "method": config.method,
        "base_model": config.model.name,
        "base_model_path": resolve(config.model.name),
        "task": manifest["task"],
        "template": manifest["template"]["name"],
        "end_of_turn": manifest["template"]["end_of_turn"],
        "speakers_as": manifest["speakers_as"],
        "stop_strings": manifest["stop_strings"],
        "max_length": manifest["max_length"],
        "system_prompt": config.task.system_prompt,
        "instruction": config.task.instruction if manifest["task"] == "summarize" else None,
    }
    (staging / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


class ExportError(ValueError):
    pass


def export_merged(run: Path, output: Path | None = None) -> Path:
    """Fold a LoRA adapter into its base model and save a plain full model."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM
    from transformers import AutoConfig, AutoTokenizer

    final = Path(run) / FINAL
    info_path = final / RUN_INFO
    if not info_path.exists():
        raise ExportError(f"{run}: no finished run here ({info_path} is missing); train it first")
    info = json.loads(info_path.read_text())
    target = Path(output) if output else Path(run) / "merged"
    if info["method"] == "full":
        raise ExportError(f"{run} was fully fine-tuned: {final} already is a plain model")
    config = AutoConfig.from_pretrained(info["base_model_path"])
    loader = AutoPeftModelForSeq2SeqLM if config.is_encoder_decoder else AutoPeftModelForCausalLM
    model = loader.from_pretrained(str(final)).merge_and_unload()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(final)).save_pretrained(target)
    shutil.copy(info_path, target / RUN_INFO)
    return target
