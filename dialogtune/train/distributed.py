"""Several processes: a run started by `torchrun` or `accelerate launch` becomes DDP, FSDP or
DeepSpeed through transformers' TrainingArguments, which hands the engine to Accelerate.

    torchrun --nproc_per_node 8 -m dialogtune train job.yaml
    accelerate launch --multi_gpu --num_processes 8 -m dialogtune train job.yaml --set distributed.strategy=fsdp

The `distributed:` section picks the engine; an Accelerate config file that names one (`accelerate
launch --config_file fsdp.yaml`, which sets ACCELERATE_USE_FSDP/ACCELERATE_USE_DEEPSPEED) is used
as it is, and a `distributed.strategy` naming another engine is refused.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dialogtune.config import DistributedConfig
from dialogtune.errors import ConfigError

# ZeRO-2's all-gather bucket, in elements (DeepSpeed's default is 5e8).
ZERO2_ALLGATHER_BUCKET_SIZE = 50_000_000

# What an Accelerate launcher config sets when it names an engine.
LAUNCHER_ENGINES = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}


def launched_processes() -> int:
    """How many processes the launcher started (1 for a plain `dialogtune train`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes_on_cpu() -> bool:
    """Whether this is one of several processes on a machine without a GPU. Accelerate joins CPU
    processes (gloo) only when told the run is a CPU one; otherwise, under torchrun, each process
    takes itself for the only one and trains alone."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def launcher_engine() -> str | None:
    """The engine an Accelerate launcher config named, if any."""
    return next((name for name, variable in LAUNCHER_ENGINES.items()
                 if os.environ.get(variable, "false").lower() == "true"), None)


def engine_arguments(config: DistributedConfig) -> dict[str, Any]:
    """TrainingArguments keys for the engine the processes run (none for one process)."""
    if launched_processes() == 1:
        return {}
    arguments: dict[str, Any] = {"use_cpu": True} if processes_on_cpu() else {}
    from_launcher = launcher_engine()
    if processes_on_cpu() and (from_launcher or config.strategy) != "ddp":
        # Accelerate's state turns on FSDP and DeepSpeed for GPU kinds only: on CPU it would run
        # DDP instead, with every process holding the whole model, while the run says it shards.
        raise ConfigError(f"distributed.strategy: {from_launcher or config.strategy} needs GPUs (Accelerate runs CPU"
                          " processes with DDP only); use strategy ddp on CPU")
    if from_launcher:
        if config.strategy not in ("ddp", from_launcher):
            raise ConfigError(f"distributed.strategy: {config.strategy!r}, but the launcher's Accelerate config runs"
                              f" {from_launcher}; drop one of them")
        if config.changed_keys():
            raise ConfigError(f"distributed: {', '.join(sorted(config.changed_keys()))} would be ignored: the"
                              f" launcher's Accelerate config sets up {from_launcher}; set them there")
        return arguments  # Accelerate builds the engine from the launcher's config
    if config.strategy == "fsdp":
        arguments.update(fsdp=True, fsdp_config=fsdp_config(config))
    elif config.strategy == "deepspeed":
        arguments["deepspeed"] = deepspeed_config(config)
    return arguments


def check_engine(config: DistributedConfig, running: str) -> None:
    """Refuse a run whose engine is not the one asked for, before it trains."""
    if launched_processes() == 1 or launcher_engine():
        return
    asked = {"ddp": "ddp", "fsdp": "fsdp", "deepspeed": f"deepspeed-zero{config.zero_stage}"}[config.strategy]
    if running != asked:
        raise ConfigError(f"distributed.strategy: {config.strategy} was asked for, but Accelerate set up {running}")


def check_final_model_gathers(deepspeed_plugin) -> None:
    """ZeRO-3 holds no process's copy of the whole weights: the final model can be saved only if
    the config gathers them (a launcher's config may not), which is better known before training."""
    if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3 and not deepspeed_plugin.zero3_save_16bit_model:
        raise ConfigError("DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save cannot save the final"
                          " model; set zero3_save_16bit_model: true in the Accelerate config (or use"
                          " distributed.strategy: deepspeed, which sets it)")


def fsdp_config(config: DistributedConfig) -> dict[str, Any]:
    """FSDP2, fully sharded, one unit per decoder layer: Accelerate wraps the classes the model
    names in `_no_split_modules` (LlamaDecoderLayer, ...), with PEFT's adapters inside them. The
    final model is gathered whole (FULL_STATE_DICT) so that the run directory loads anywhere."""
    return {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "activation_checkpointing": config.activation_checkpointing, "cpu_offload": config.cpu_offload,
            "state_dict_type": "FULL_STATE_DICT"}


def deepspeed_config(config: DistributedConfig) -> dict[str, Any]:
    """A ZeRO config whose batch, precision and clipping ("auto") come from TrainingArguments, so
    the `train:` section stays the one place they are set."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ConfigError("distributed.strategy: deepspeed needs the deepspeed package (pip install deepspeed,"
                          " on a machine with CUDA and its compiler)") from err
    # Explicit buckets: DeepSpeed's default (5e8 elements) with overlap_comm holds about 4.5x
    # the buckets (up to ~9 GB). "auto" is filled by transformers from the model's hidden size h
    # (reduce h*h, stage-3 prefetch 0.9*h*h, stage-3 persistence threshold 10*h); ZeRO-2's
    # all-gather bucket has no "auto" and is fixed here.
    zero: dict[str, Any] = {"stage": config.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if config.zero_stage == 2:
        zero["allgather_bucket_size"] = ZERO2_ALLGATHER_BUCKET_SIZE
    else:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    if config.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if config.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if config.zero_stage == 3:  # the final model is gathered whole from the shards when saved
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}
