"""`dialogtune estimate CONFIG.yaml`: the memory a training job needs on each device, before
renting GPUs.

    dialogtune estimate examples/sgd_respond.yaml
    dialogtune estimate job.yaml --processes 8 --set distributed.strategy=fsdp --json

The model is built from its config alone on the meta device (no weights are read or
allocated; a hub name fetches only config.json), wrapped with LoRA by PEFT exactly as training
wraps it, and counted. Memory per device is then the sum of these terms, in bytes:

weights      fp32 master weights, 4 bytes a parameter (training loads every model in fp32 and
             computes in bf16/fp16 under autocast). QLoRA: the linear layers of the blocks in
             4 bits (NF4 with double-quantized absmax: 0.5 + 1/64 + 4/16384 bytes a parameter) or
             8 bits (1 byte plus a fp32 scale per row), the rest fp32. DeepSpeed with bf16/fp16
             keeps the model itself in 2 bytes (ZeRO's 2 + 2 + 12 bytes per parameter).
gradients    4 bytes a trainable parameter (2 under DeepSpeed half precision).
optimizer    bytes a trainable parameter by `train.optim` (AdamW: two fp32 moments, 8 bytes;
             8-bit AdamW: 2; DeepSpeed half precision adds its fp32 master copy, 4).
activations  what backward needs, per block and token (h hidden size, I intermediate size,
             q = heads x head dim, k = kv heads x head dim, c the compute dtype's bytes):
               each RMSNorm keeps its fp32 input and 1/rms, 4h + 4 bytes, and with a trained
                 weight the normalised input too: 8h + 4 (half-precision model: 6h + 4);
               a linear layer keeps its input when its weight is trained: one copy per input
                 in fp32, under autocast one cast per layer fed by a norm (q, k, v, gate, up:
                 5 copies of h), c bytes each; a LoRA adapter keeps its own: with dropout the
                 mask (one byte an element on a GPU, 4 on a CPU: PEFT casts the input to the
                 adapter's fp32 first) and the dropped input (c), without dropout the input
                 (under autocast a cast copy per adapter), and A's output, r x c;
               attention: queries, keys, values and output, c(2q + 2k), plus a fp32
                 log-sum-exp per head; dialogtune's segment attention (training's default for
                 causal LMs, see train/attention.py) repeats grouped keys/values to every head
                 and keeps its per-block outputs besides their concatenation (3qc + the keys,
                 which under autocast each query block casts again up to its end); eager
                 attention keeps the keys/values repeated (3qc) and the softmax, heads x length
                 per token in fp32 (plus its c-byte copy under autocast);
               the gated MLP's gate and up outputs and the activation's output, 3Ic (an ungated
                 one: Ic), the product being the down projection's input (above);
             plus the causal mask blocks segment attention builds for examples longer than
             128 tokens (c bytes per query x key of each block after the first), the rotary
             tables once (2 x head dim x 4 bytes a token), and the final norm. Under autocast
             each linear weight's bf16 copy is kept for backward: 2 bytes per block linear
             parameter (adapters included). With gradient checkpointing a block keeps only its
             input (4h a token) and one block at a time is recomputed whole; autocast's cast
             cache then holds only the trained weights' copies until the forward ends (frozen
             weights' copies are made and dropped layer by layer), and the recomputed block its
             own: the larger of the two is counted. Tokens per
             micro-batch: batch x max_length (packed rows are at most max_length; every
             example is assumed as long as a row, the worst case for the mask terms).
             tests/test_estimate.py checks the formula byte for byte against what a Llama
             block keeps (full, LoRA with and without dropout; segment, SDPA and eager
             attention; fp32, bf16 autocast, and bf16 weights under autocast as FSDP runs
             them), and the weight copies a checkpointed step holds against the copies alive
             in a real one; other architectures reuse it as an approximation.
logits       counted apart, since for small models with big vocabularies it is often the
             largest single term. dialogtune's loss (loss.py) runs the output layer and the
             cross-entropy fused, in chunks of CHUNK_ELEMENTS logits, over trained positions only:
             one chunk of fp32 logits (and its c-byte copies), the trained hidden states and their
             gradient, and with a trained output layer its fp32 gradient and one product of that
             size. Models whose logits are transformed after the head (and encoder-decoders)
             take the standard path: tokens x vocabulary logits in c bytes, their fp32 upcast
             and the fp32 log-softmax the loss keeps; so do runs of several processes, whose
             loss goes through the engine's forward (at trained positions only). Every token is
             assumed trained.
distribution DDP replicates everything and adds gradient buckets the size of the gradients
             (with more than one process); FSDP full-shard and ZeRO-3 divide weights,
             gradients and optimizer state by the processes and add two gathered blocks
             (the one computing and the one prefetched); ZeRO-2 divides gradients and
             optimizer state. FSDP (Accelerate's fsdp2_prepare_model) keeps fp32 shards and
             gathers them in the compute precision (MixedPrecisionPolicy param_dtype: bf16 in
             a bf16 run, so autocast makes no weight copies and activations are counted as for
             a half-precision model); it also keeps its unit of [final norm, output layer]
             gathered from the end of the forward through the backward (from its start when the
             embedding, tied to the output layer, is in the unit too), adds one block's unsharded gradients in its reduce-scatter buffer, and
             leaves 4-bit weights out of its shards (each process keeps them whole). DeepSpeed
             adds its communication buckets: training sets them (train/distributed.py: reduce
             h*h elements, ZeRO-3 prefetch 0.9*h*h, ZeRO-2 all-gather 5e7), and with
             overlap_comm DeepSpeed's documentation puts their footprint at about 4.5 times the
             reduce and all-gather buckets. cpu_offload moves the optimizer state (and, with
             FSDP or ZeRO-3, the sharded weights and gradients) to host memory, reported apart.
             The engines' terms follow their code and documentation; no multi-GPU run has
             checked them.

The total is the sum of the terms (in backward, gradients appear as activations are freed, so
a full fine-tuning peak holds less than all its gradients): the tensors, what a GPU's
max_memory_allocated reports. Not counted: the CUDA context and kernels' workspace (about
0.5-1 GiB a GPU); on a CPU, the Python process itself (runtime, libraries, tokenizer and data)
and the freed heap glibc keeps resident (train/malloc.py); benchmarks/estimate_check.py
measures both for SmolLM2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dialogtune.config import TrainJobConfig
from dialogtune.errors import ConfigError, ModelError, RunError
from dialogtune.models import quiet_peft, resolve
from dialogtune.train.attention import QUERY_BLOCK  # query blocks after the first carry a mask

MIB = 2**20

# dialogtune's own TrainingArguments defaults (train/run.py) for the keys memory depends on.
DEFAULT_BATCH_SIZE = 4
DEFAULT_OPTIMIZER = "adamw_torch_fused"  # transformers' default `optim`

# State bytes per trainable parameter for transformers' `optim` names.
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8, "adamw_torch_fused": 8, "adamw_torch_xla": 8, "adamw_torch_npu_fused": 8,
    "adamw_apex_fused": 8, "adamw_anyprecision": 8, "paged_adamw": 8, "paged_adamw_32bit": 8,
    "adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2, "lion_32bit": 4, "paged_lion_32bit": 4,
    "lion_8bit": 1, "paged_lion_8bit": 1, "adagrad": 4, "rmsprop": 4, "sgd": 0, "adafactor": 0,
}

# NF4 with double quantization: 4 bits, an 8-bit absmax per 64 weights, a fp32 scale per 256 absmax.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Distribution:
    """How training is spread: `distributed:` in the config (validated there), and the number of processes."""

    processes: int = 1
    strategy: str = "ddp"  # ddp, fsdp (full shard) or deepspeed
    zero_stage: int = 3  # deepspeed: 2 or 3
    cpu_offload: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ConfigError(f"--processes: expected a whole number >= 1, got {self.processes}")

    @property
    def shards_weights(self) -> bool:
        return self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.zero_stage == 3)

    @property
    def shards_optimizer(self) -> bool:  # and the gradients
        return self.strategy in ("fsdp", "deepspeed")


def distribution_of(config: TrainJobConfig, processes: int = 1) -> Distribution:
    """The config's `distributed:` section over `processes` processes."""
    if processes == 1:  # a run of one process ignores the section
        return Distribution(processes)
    section = config.distributed
    return Distribution(processes, section.strategy, section.zero_stage, section.cpu_offload,
                        section.activation_checkpointing)


@dataclass(frozen=True)
class ModelCount:
    """What memory depends on, counted on the meta device."""

    architecture: str
    parameters: int  # all, adapter included (PEFT's count)
    trainable: int
    blocks: int  # transformer blocks (decoder layers; encoder and decoder layers for seq2seq)
    largest_block: int  # parameters of the largest block: what FSDP/ZeRO-3 gather at once
    largest_block_trainable: int  # its trainable ones: what FSDP reduce-scatters at once
    block_linear: int  # weights of the blocks' linear layers (what QLoRA quantizes)
    block_linear_rows: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool
    linears: tuple[tuple[str, str], ...]  # (name in the block, group) of the first block's linear layers
    adapted: tuple[str, ...]  # those LoRA wraps
    lora_rank: int
    lora_dropout: float
    base_trained: bool  # full fine-tuning: every weight takes a gradient
    attention: str  # segments, sdpa, flash_attention_2, eager, ...
    fused_loss: bool  # the chunked head + cross-entropy of loss.py
    head_trained: bool
    encoder_decoder: bool


def load_model_config(name: str):
    """The model's config only: the cached copy of the embedded model, a local directory, or
    config.json from the hub."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(name))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the model config of {name!r}: {err}") from err


# Linear layers by the input they take: the attention's (from the first norm), the attention
# output's, the MLP's (from the second norm) and the MLP output's. Names across architectures.
ATTENTION_INPUT = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value", "Wqkv",
                   "query_key_value", "q", "k", "v", "in_proj"}
MLP_INPUT = {"gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "w1", "w3", "wi", "wi_0", "wi_1", "dense_h_to_4h"}


def linear_group(qualified_name: str) -> str:
    name = qualified_name.rsplit(".", 1)[-1]
    if name in ATTENTION_INPUT:
        return "attention_in"
    if name in MLP_INPUT:
        return "mlp_in"
    return "attention_out" if "attn" in qualified_name or "attention" in qualified_name else "mlp_out"


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def count_model(config: TrainJobConfig) -> ModelCount:
    """Build the job's model (LoRA-wrapped unless method: full) on the meta device and count it."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from dialogtune.loss import core_model, needs_full_logits

    model_config = load_model_config(config.model.name)
    encoder_decoder = bool(model_config.is_encoder_decoder)
    loader = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    with init_empty_weights():
        model = loader.from_config(model_config)
    # init_empty_weights replaces each parameter as it is registered, which unties tied
    # embeddings; tie them again as loading would.
    model.tie_weights()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    linears = [m for block in blocks for m in block.modules() if _is_linear(m)]
    first_linears = tuple((name, linear_group(name)) for name, m in blocks[0].named_modules() if _is_linear(m)) \
        if blocks else ()
    head = model.get_output_embeddings()
    text = model_config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = next((v for k in ("intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "d_ff")
                         if (v := getattr(text, k, None))), 4 * hidden)
    gated = any(name.rsplit(".", 1)[-1] in ("gate_proj", "w3", "gate_up_proj", "wi_0")
                for block in blocks[:1] for name, _ in block.named_modules())
    supports_segments = not encoder_decoder and getattr(model, "_supports_attention_backend", False)
    fused = not needs_full_logits(model) and type(head) is torch.nn.Linear and head.bias is None
    if config.method == "full":
        parameters = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        head_trained = head is not None and head.weight.requires_grad
        adapted: tuple[str, ...] = ()
    else:
        from peft import get_peft_model

        from dialogtune.train.model import lora_config

        try:  # training's own LoraConfig, and its message for targets the model lacks
            lora = lora_config(model, config)
        except RunError as err:
            raise ConfigError(str(err)) from err
        with init_empty_weights(), quiet_peft():
            model = get_peft_model(model, lora)
        trainable, parameters = model.get_nb_trainable_parameters()
        head_trained = any(p.requires_grad for p in model.get_output_embeddings().parameters())
        # PEFT wraps a linear layer in place: the wrapper has the base layer's name and lora_A.
        adapted = tuple(name for name, m in blocks[0].named_modules() if hasattr(m, "lora_A")) if blocks else ()
    return ModelCount(
        architecture=type(core_model(model)).__name__,
        parameters=int(parameters), trainable=int(trainable), blocks=len(blocks),
        largest_block=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        largest_block_trainable=max((sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks),
                                    default=0),
        block_linear=sum(m.weight.numel() for m in linears),
        block_linear_rows=sum(m.weight.shape[0] for m in linears),
        hidden=hidden, intermediate=intermediate, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim, vocab=text.vocab_size,
        gated_mlp=gated, linears=first_linears, adapted=adapted, lora_rank=config.lora.r,
        lora_dropout=config.lora.dropout, base_trained=config.method == "full", attention="segments" if supports_segments else model_config._attn_implementation or "sdpa",
        fused_loss=fused, head_trained=head_trained, encoder_decoder=encoder_decoder)


def training_precision(requested: str, device: str) -> str:
    """The precision training would run in on `device` (train/model.py pick_precision, for a
    machine other than this one): auto is bf16 on a GPU (fp16 on one without bf16: the same
    bytes), fp32 on a CPU."""
    if device == "cpu":
        if requested in ("bf16", "fp16"):
            raise ConfigError(f"precision: {requested} needs a CUDA GPU; estimate with --device gpu, or set"
                              " precision: fp32 (or auto) for a CPU run")
        return "fp32"
    return "bf16" if requested == "auto" else requested


@dataclass(frozen=True)
class Numerics:
    """Bytes per element where they differ: fp32, autocast (fp32 weights, half compute) or blocks
    computing on half-precision weights (DeepSpeed's half model, FSDP's weights gathered in bf16)."""

    mode: str  # fp32, autocast, half
    device: str = "gpu"  # dropout masks: one byte an element on a GPU, the input's dtype on a CPU

    @property
    def compute(self) -> int:
        return 4 if self.mode == "fp32" else 2

    @property
    def residual(self) -> int:  # the stream between blocks: fp32 unless the model itself is half
        return 2 if self.mode == "half" else 4


def query_blocks(example_length: int) -> list[tuple[int, int]]:
    """(start, end) of segment attention's query blocks in one example."""
    return [(start, min(start + QUERY_BLOCK, example_length)) for start in range(0, example_length, QUERY_BLOCK)]


def mask_bytes(example_length: int, element_bytes: int) -> int:
    """The causal masks segment attention builds for one example (every query block after the
    first sees the keys up to its end through a mask), kept by SDPA for backward as a float bias."""
    return sum((end - start) * end for start, end in query_blocks(example_length)[1:]) * element_bytes


def _linear_input_bytes(count: ModelCount, numerics: Numerics, attention: str) -> int:
    """Per token: the inputs the blocks' linear layers keep for their weights' gradients (the base
    weight when it is trained, the LoRA adapter's A when it is there, after its dropout)."""
    c = numerics.compute
    widths = {"attention_in": count.hidden, "attention_out": count.heads * count.head_dim,
              "mlp_in": count.hidden, "mlp_out": count.intermediate}
    total = 0
    for group, width in widths.items():
        members = [name for name, g in count.linears if g == group]
        # Under autocast, layers fed by a norm (fp32) each cast their own copy of the input;
        # the others get it in the compute dtype already and share it.
        casts = numerics.mode == "autocast" and group in ("attention_in", "mlp_in")
        # SDPA's output is the attention output layer's input, kept by the kernel anyway.
        shared_is_free = group == "attention_out" and attention not in ("segments", "eager")
        shared = False  # one uncast copy of the group's input is kept
        if count.base_trained and members:
            total += len(members) * width * c if casts else (0 if shared_is_free else width * c)
            shared = not casts
        # PEFT casts an adapter's input to the adapter's dtype (fp32 unless the model is half)
        # before its dropout; under autocast A casts it back, so each adapter keeps its own copy.
        adapter_bytes = 2 if numerics.mode == "half" else 4
        for _ in (name for name in members if name in count.adapted):
            if count.lora_dropout > 0:  # the dropout's mask (bool on a GPU) and its output
                total += width * (1 if numerics.device == "gpu" else adapter_bytes) + width * c
            elif numerics.mode == "autocast":
                total += width * c
            elif not shared:
                total += 0 if shared_is_free else width * c
                shared = True
            total += count.lora_rank * c  # A's output, kept by B
    return total


def block_activation_bytes(count: ModelCount, tokens: int, example_length: int, numerics: Numerics,
                           attention: str | None = None) -> int:
    """What one block keeps for backward over `tokens` tokens made of examples of
    `example_length` (the formula in this module's docstring)."""
    h, inter, c = count.hidden, count.intermediate, numerics.compute
    q, k = count.heads * count.head_dim, count.kv_heads * count.head_dim
    attention = attention or count.attention
    # A norm keeps its input (fp32) and 1/rms, and with a trained weight the normalised input.
    if count.base_trained:
        norm = 6 * h + 4 if numerics.mode == "half" else 8 * h + 4
    else:
        norm = 4 * h + 4
    mlp = (3 if count.gated_mlp else 1) * inter * c  # gate and up outputs, the activation's output
    per_token = 2 * norm + _linear_input_bytes(count, numerics, attention) + mlp
    examples = max(1, tokens // example_length)
    if attention == "segments":
        # The rotary embedding leaves queries and keys in fp32 under autocast, so each query
        # block casts its own copy of the keys it sees (all those before its end).
        keys = sum(end for _, end in query_blocks(example_length)) if numerics.mode == "autocast" else example_length
        per_token += 3 * q * c + 4 * count.heads  # queries, values, per-block outputs; log-sum-exp
        extra = examples * (keys * q * c + mask_bytes(example_length, c))
    elif attention == "eager":
        softmax = 4 + (c if c != 4 else 0)  # fp32 softmax, and its cast for the product with values
        per_token += 3 * q * c
        extra = examples * count.heads * example_length * example_length * softmax
    else:  # sdpa, flash: the kernels keep no length x length matrix
        per_token += (2 * q + 2 * k) * c + 4 * count.heads
        extra = 0
    return per_token * tokens + extra


def weight_copy_bytes(count: ModelCount, numerics: Numerics, checkpointing: bool, quantized: bool = False) -> int:
    """The most bf16 copies of the blocks' linear weights that autocast holds at once. Without
    checkpointing every copy is saved for backward (LoRA's adapters too). With it nothing inside a
    block is saved, and autocast's cast cache keeps only the copies of trained weights (leaves that
    require grad) until the forward ends: the most held is the larger of those and one block's
    copies, recomputed in backward. A quantized layer dequantizes its weight as it computes instead."""
    if numerics.mode != "autocast":
        return 0
    adapters = 0 if count.base_trained else count.trainable
    base = 0 if quantized else count.block_linear
    if not checkpointing:
        return 2 * (base + adapters)
    trained = count.block_linear if count.base_trained else adapters
    return max(2 * trained, 2 * (base + adapters) // max(count.blocks, 1))


def activation_bytes(count: ModelCount, tokens: int, example_length: int, numerics: Numerics,
                     checkpointing: bool, quantized: bool = False) -> int:
    """Every block's activations (or, checkpointed, every block's input and one block whole),
    the final norm, the rotary tables, and under autocast the bf16 copies of the weights."""
    one_block = block_activation_bytes(count, tokens, example_length, numerics)
    if checkpointing:
        blocks = count.blocks * count.hidden * numerics.residual * tokens + one_block
    else:
        blocks = count.blocks * one_block
    final_norm = (8 * count.hidden + 4) * tokens
    rotary = 2 * count.head_dim * 4 * tokens
    return blocks + final_norm + rotary + weight_copy_bytes(count, numerics, checkpointing, quantized)


def logits_bytes(count: ModelCount, tokens: int, numerics: Numerics, through_forward: bool = False) -> int:
    """The output layer and the loss (every token assumed trained). `through_forward`: several
    processes, where an engine synchronises in the model's forward and the loss goes through it."""
    from dialogtune.loss import CHUNK_ELEMENTS

    c, vocab, h = numerics.compute, count.vocab, count.hidden
    half_copy = c if c != 4 else 0
    if not count.fused_loss or through_forward:
        return tokens * vocab * (half_copy + 4 + 4)  # the logits, their fp32 upcast, the log-softmax
    rows = min(tokens, max(1, CHUNK_ELEMENTS // vocab))
    hidden_bytes = 4 if numerics.mode != "half" else 2  # the final norm's output
    total = rows * vocab * (4 + half_copy) + 2 * tokens * h * hidden_bytes  # fp32 logits, half probabilities
    if count.head_trained:
        total += vocab * h * 4 + vocab * h * (c + half_copy)  # its fp32 gradient, and one chunk's product
    if numerics.mode == "autocast":
        total += vocab * h * 2  # the head's bf16 copy
    return total


@dataclass
class Estimate:
    config: str
    model: str
    architecture: str
    method: str
    parameters: int
    trainable_parameters: int
    precision: str
    device: str
    batch_size: int
    max_length: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    attention: str
    optimizer: str
    distribution: Distribution
    tokens_per_micro_batch: int
    terms: dict[str, int]  # bytes per device, in the order shown
    host_bytes: int  # offloaded to the host, per process
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.terms.values())

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_bytes"] = self.total_bytes
        out["total_mib"] = round(self.total_bytes / MIB, 1)
        return out


def _weights_bytes(config: TrainJobConfig, count: ModelCount, half_model: bool) -> tuple[int, int]:
    """(the quantized block linears, the rest)."""
    if config.method == "qlora":
        quantized = count.block_linear * NF4_BYTES if config.quantization_bits == 4 else \
            count.block_linear + 4 * count.block_linear_rows
        return int(quantized), 4 * (count.parameters - count.block_linear)
    return 0, count.parameters * (2 if half_model else 4)


def _whole_number(train: dict, key: str, default: int) -> int:
    value = train.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"train.{key}: expected a whole number >= 1, got {value!r}")
    return value


def deepspeed_bucket_bytes(count: ModelCount, zero_stage: int, element_bytes: int) -> int:
    """DeepSpeed's communication buckets at the sizes training's config gives them
    (train/distributed.py deepspeed_config; transformers fills "auto" from the hidden size h:
    reduce h*h elements, ZeRO-3 prefetch 0.9*h*h). With overlap_comm DeepSpeed holds about 4.5
    times the reduce and all-gather buckets (its documented rule: 5e8-element buckets take ~9 GB
    in 2 bytes); ZeRO-3 adds its prefetch bucket of parameters."""
    from dialogtune.train.distributed import ZERO2_ALLGATHER_BUCKET_SIZE

    reduce = count.hidden * count.hidden
    if zero_stage == 2:
        return int(4.5 * element_bytes * (reduce + ZERO2_ALLGATHER_BUCKET_SIZE))
    return int(4.5 * element_bytes * reduce) + element_bytes * int(0.9 * reduce)


def estimate(config: TrainJobConfig, *, processes: int = 1, device: str = "gpu", source: str = "config") -> Estimate:
    """Memory per device for training `config` on `processes` processes of `device` (gpu or cpu)."""
    if config.task.name == "memory":
        raise ConfigError("task: memory trains with its own recurrent trainer, which estimate does not model yet")
    if device not in ("gpu", "cpu"):
        raise ConfigError(f"--device: expected gpu or cpu, got {device!r}")
    layout = distribution_of(config, processes)
    if device == "cpu" and layout.strategy != "ddp":  # as training refuses (train/distributed.py engine_arguments)
        raise ConfigError(f"distributed.strategy: {layout.strategy} needs GPUs (Accelerate runs CPU processes with"
                          " DDP only); use strategy ddp on CPU")
    if config.method == "qlora" and device == "cpu":
        raise ConfigError("method: qlora loads the base model in 4/8-bit with bitsandbytes, which needs a CUDA GPU;"
                          " estimate it with --device gpu, or use method: lora for a CPU run")
    precision = training_precision(config.precision, device)
    half = precision != "fp32"
    # DeepSpeed keeps the model itself in half precision. FSDP keeps fp32 shards but gathers them in
    # half precision (Accelerate's MixedPrecisionPolicy(param_dtype=bf16)): blocks compute on half
    # weights, so autocast makes no copies and the residual stream is half, as with DeepSpeed.
    half_model = layout.strategy == "deepspeed" and half
    half_compute = layout.strategy in ("deepspeed", "fsdp") and half
    numerics = Numerics("fp32" if not half else "half" if half_compute else "autocast", device)
    batch = _whole_number(config.train, "per_device_train_batch_size", DEFAULT_BATCH_SIZE)
    accumulation = _whole_number(config.train, "gradient_accumulation_steps", 1)
    optimizer = str(config.train.get("optim", DEFAULT_OPTIMIZER))
    checkpointing = bool(config.train.get("gradient_checkpointing", False)) or config.method == "qlora" \
        or layout.activation_checkpointing
    count = count_model(config)
    tokens = batch * config.max_length
    notes = []
    if processes == 1 and config.distributed.strategy != "ddp":
        notes.append(f"distributed.strategy {config.distributed.strategy} applies to several processes only:"
                     " estimate them with --processes N")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        notes.append(f"optimizer {optimizer!r} unknown here: counted as AdamW (8 bytes a trainable parameter)")
    state = OPTIMIZER_STATE_BYTES.get(optimizer, 8) + (4 if half_model else 0)
    grad = 2 if half_model else 4
    n = layout.processes
    quantized, weights = _weights_bytes(config, count, half_model)
    gradients = count.trainable * grad
    optimizer_state = count.trainable * state
    host = 0
    # FSDP leaves 4-bit weights out of its shards (Accelerate's fsdp2_prepare_model ignores frozen
    # non-float Params4bit): every process keeps them whole.
    replicated = quantized if layout.strategy == "fsdp" and config.quantization_bits == 4 else 0
    weights += quantized - replicated
    if layout.shards_weights:
        weights //= n
    if layout.shards_optimizer:
        gradients //= n
        optimizer_state //= n
    if layout.cpu_offload:
        host += optimizer_state
        optimizer_state = 0
        if layout.shards_weights:
            host += weights + gradients
            weights = gradients = 0
    weights += replicated
    terms = {"weights": weights, "gradients": gradients, "optimizer state": optimizer_state,
             "activations": activation_bytes(count, tokens, config.max_length, numerics, checkpointing,
                                             quantized=config.method == "qlora"),
             "logits and loss": logits_bytes(count, tokens, numerics, through_forward=n > 1)}
    if layout.strategy == "ddp" and n > 1:
        terms["DDP gradient buckets"] = count.trainable * grad
    if layout.shards_weights:
        # The block computing and the one prefetched, gathered in the compute precision (FSDP's
        # param_dtype, DeepSpeed's half model); FSDP does not gather the 4-bit weights it leaves out.
        gathered = count.largest_block - (count.block_linear // max(count.blocks, 1) if replicated else 0)
        terms["gathered blocks"] = 2 * gathered * (2 if half else 4)
    if layout.strategy == "fsdp":
        # Accelerate shards [final norm, output layer] (the embedding too when tied to it) as one
        # unit that stays gathered from the end of the forward through the backward
        # (reshard_after_forward=False); and a block's unsharded gradients (reduce dtype: the
        # param dtype) are copied into one reduce-scatter buffer.
        terms["gathered output layer"] = (count.vocab * count.hidden + count.hidden) * (2 if half else 4)
        terms["reduce-scatter buffer"] = count.largest_block_trainable * (2 if half else 4)
    if layout.strategy == "deepspeed":
        terms["DeepSpeed buckets"] = deepspeed_bucket_bytes(count, layout.zero_stage, grad)
    if not count.gated_mlp or count.encoder_decoder:
        notes.append("activations: the formula is measured on Llama-style blocks; for this architecture it is"
                     " an approximation")
    return Estimate(
        config=source, model=config.model.name, architecture=count.architecture, method=config.method,
        parameters=count.parameters, trainable_parameters=count.trainable, precision=precision, device=device,
        batch_size=batch, max_length=config.max_length, gradient_accumulation_steps=accumulation,
        gradient_checkpointing=checkpointing, attention=count.attention, optimizer=optimizer,
        distribution=layout, tokens_per_micro_batch=tokens, terms=terms, host_bytes=host, notes=notes)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MIB:.1f} MiB"


def format_table(result: Estimate) -> str:
    layout = result.distribution
    spread = f"{layout.processes} process{'es' if layout.processes > 1 else ''}, {layout.strategy}"
    if layout.strategy == "deepspeed":
        spread += f" ZeRO-{layout.zero_stage}"
    if layout.cpu_offload:
        spread += ", CPU offload"
    share = result.trainable_parameters / max(result.parameters, 1)
    lines = [
        f"{result.config}: {result.model} ({result.architecture}), {result.method}",
        f"  parameters           {result.parameters:,}",
        f"  trainable            {result.trainable_parameters:,} ({share:.2%})",
        f"  precision            {result.precision} on {result.device}",
        (f"  micro-batch          {result.batch_size} x {result.max_length} tokens = "
         f"{result.tokens_per_micro_batch:,} tokens (x{result.gradient_accumulation_steps} accumulation), "
         f"gradient checkpointing {'on' if result.gradient_checkpointing else 'off'}"),
        f"  attention            {result.attention}; optimizer {result.optimizer}",
        f"  distribution         {spread}",
        "",
        "  memory per device",
    ]
    lines += [f"    {name:<22}{_size(value):>12}" for name, value in result.terms.items()]
    lines.append(f"    {'total':<22}{_size(result.total_bytes):>12}")
    if result.host_bytes:
        lines.append(f"    {'offloaded to host':<22}{_size(result.host_bytes):>12}")
    not_counted = ("the CUDA context and kernel workspace (about 0.5-1 GiB a GPU)" if result.device == "gpu"
                   else "the Python process (runtime, libraries, tokenizer, data) and the freed heap glibc keeps;"
                   " see benchmarks/results/estimate_check.md")
    lines.append(f"  not counted: {not_counted}")
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)
