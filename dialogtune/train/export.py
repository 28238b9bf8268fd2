"""The run's final model, loadable without dialogtune, and `dialogtune export RUN --merge`.

final/ holds the model (full fine-tuning) or the LoRA adapter, the tokenizer with the exact
chat template used in training as its `chat_template`, and dialogtune.json: task, template,
end-of-turn marker, speakers and stop strings, so chat and serve render prompts exactly as
training did. An adapter loads with the usual snippet:

    base = AutoModelForCausalLM.from_pretrained(BASE)
    model = PeftModel.from_pretrained(base, "RUN/final")
"""

from __future__ import annotations

from pathlib import Path

import dialogtune
from dialogtune.config import TrainJobConfig
from dialogtune.errors import RunError
from dialogtune.files import staged_dir
from dialogtune.models import quiet_peft, resolve
from dialogtune.records import RUN_INFO_FILE, PreparedInfo, RunInfo

FINAL = "final"


def save_final(model, tokenizer, manifest: PreparedInfo, config: TrainJobConfig, run: Path,
               state_dict: dict | None = None) -> Path:
    """final/: the model (or adapter); `state_dict`: the whole weights gathered from a sharded run."""
    final = run / FINAL
    with staged_dir(final) as staging:
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.chat_template = manifest.template.source
        tokenizer.save_pretrained(staging)
        RunInfo.of_training(manifest, version=dialogtune.__version__, method=config.method,
                            base_model=config.model.name, base_model_path=resolve(config.model.name),
                            system_prompt=config.task.system_prompt, instruction=config.task.instruction).save(staging)
    return final


def export_merged(run: Path, output: Path | None = None) -> Path:
    """Fold a LoRA adapter into its base model and save a plain full model."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM
    from transformers import AutoConfig, AutoTokenizer

    final = Path(run) / FINAL
    info = RunInfo.load(final)
    target = Path(output) if output else Path(run) / "merged"
    if info.method == "full":
        raise RunError(f"{run} was fully fine-tuned: {final} already is a plain model")
    if target.resolve() == final.resolve():
        raise RunError(f"{target}: is the run's adapter, which the merged model would replace; choose another -o")
    if not may_hold_a_merge(target):  # checked before the minutes of merging
        raise RunError(f"{target}: exists and is not a dialogtune model directory (no {RUN_INFO_FILE}); export"
                       " would replace what it holds: choose another -o")
    config = AutoConfig.from_pretrained(info.base_model_path)
    loader = AutoPeftModelForSeq2SeqLM if config.is_encoder_decoder else AutoPeftModelForCausalLM
    with quiet_peft():
        model = loader.from_pretrained(str(final)).merge_and_unload()
    with staged_dir(target, may_replace=may_hold_a_merge) as staging:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(str(final)).save_pretrained(staging)
        info.save(staging)
    return target


def may_hold_a_merge(target: Path) -> bool:
    """Whether an export may be written to `target`, replacing what is there: absent, an empty
    directory, or a model directory dialogtune wrote (it holds dialogtune.json)."""
    if not target.exists():
        return True
    return target.is_dir() and (not any(target.iterdir()) or (target / RUN_INFO_FILE).is_file())
