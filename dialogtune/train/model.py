"""Load the model to train: full fine-tuning, LoRA, or QLoRA (4/8-bit base, GPU only)."""

from __future__ import annotations

import torch

from dialogtune.config import TrainJobConfig
from dialogtune.errors import ModelError, RunError
from dialogtune.models import quiet_peft, resolve


def pick_precision(requested: str) -> str:
    """fp32 on a CPU; bf16 where the GPU has it (else fp16) for `auto`."""
    on_gpu = torch.cuda.is_available()
    if requested == "auto":
        if not on_gpu:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested in ("bf16", "fp16") and not on_gpu:
        raise RunError(f"precision: {requested} needs a CUDA GPU and none is visible; use precision: fp32 (or auto)")
    return requested


def load_model(config: TrainJobConfig):
    """The (possibly PEFT-wrapped) model, ready to train."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    location = resolve(config.model.name)
    if config.method == "qlora":
        if not torch.cuda.is_available():
            raise RunError("method: qlora loads the base model in 4/8-bit with bitsandbytes, which needs a"
                                  " CUDA GPU; none is visible here. Use method: lora on this machine.")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise RunError("method: qlora needs bitsandbytes: pip install 'dialogtune[qlora]'"
                                  " (or pip install bitsandbytes)")
    try:
        model_config = AutoConfig.from_pretrained(location)
    except OSError as err:
        raise ModelError(f"cannot load the model config of {config.model.name!r}: {err}") from err
    loader = AutoModelForSeq2SeqLM if model_config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {}
    if config.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=config.quantization_bits == 4, load_in_8bit=config.quantization_bits == 8,
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    model = loader.from_pretrained(location, dtype=torch.float32, **kwargs)
    if config.method == "full":
        return model
    return add_lora(model, config)


def linear_module_names(model) -> list[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(model, config: TrainJobConfig):
    """The PEFT LoraConfig for this model, its target modules checked against the model's own
    linear layers (`dialogtune estimate` builds the same)."""
    from peft import LoraConfig

    targets = config.lora.target_modules
    if targets != "all-linear":
        wanted = [targets] if isinstance(targets, str) else list(targets)
        present = set(linear_module_names(model))
        missing = [t for t in wanted if t not in present]
        if missing:
            raise RunError(f"lora.target_modules: {', '.join(missing)} not in this model; its linear modules"
                                  f" are: {', '.join(sorted(present))} (or use all-linear)")
        targets = wanted
    task_type = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    return LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=targets, task_type=task_type)


def add_lora(model, config: TrainJobConfig):
    from peft import get_peft_model, prepare_model_for_kbit_training

    lora = lora_config(model, config)
    if config.method == "qlora":
        # PEFT would switch activation checkpointing on through `gradient_checkpointing_enable`,
        # deprecated in transformers 5: switched on here by its current name instead.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.activation_checkpointing_enable()
    with quiet_peft():
        return get_peft_model(model, lora)
