"""dialogtune.estimate: parameter counts equal the materialised models', LoRA counts equal PEFT's
on training's own model, the activation formula equals what a block keeps for backward, and
sharding divides what it should."""

from __future__ import annotations

import json

import pytest
import torch

from dialogtune.config import TrainJobConfig, build_config
from dialogtune.errors import ConfigError
from dialogtune.estimate import (
    DEFAULT_BATCH_SIZE,
    QUERY_BLOCK,
    Numerics,
    block_activation_bytes,
    count_model,
    estimate,
    weight_copy_bytes,
)


def job(model: str, **overrides) -> TrainJobConfig:
    raw = {"data": {"path": "unused.jsonl"}, "model": {"name": model}, "max_length": 256, **overrides}
    return build_config(raw, "test", schema=TrainJobConfig)


def _save(directory, model):
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Tied embeddings, grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("llama"), LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)))


@pytest.fixture(scope="module")
def untied_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save(tmp_path_factory.mktemp("llama-untied"), LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False)))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    return _save(tmp_path_factory.mktemp("gpt2"), GPT2LMHeadModel(GPT2Config(
        vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=128)))


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    from transformers import BartConfig, BartForConditionalGeneration

    return _save(tmp_path_factory.mktemp("bart"), BartForConditionalGeneration(BartConfig(
        vocab_size=300, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)))


def _materialised(directory: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    loader = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(directory).is_encoder_decoder else AutoModelForCausalLM
    return loader.from_pretrained(directory)


@pytest.mark.parametrize("fixture", ["llama_dir", "untied_llama_dir", "gpt2_dir", "bart_dir"])
def test_parameters_equal_the_materialised_models(fixture, request):
    directory = request.getfixturevalue(fixture)
    count = count_model(job(directory, method="full"))
    model = _materialised(directory)
    assert count.parameters == sum(p.numel() for p in model.parameters())
    assert count.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("fixture", "targets"), [
    ("llama_dir", "all-linear"), ("llama_dir", ["q_proj", "v_proj"]), ("gpt2_dir", "all-linear"),
    ("bart_dir", ["q_proj", "v_proj"]),
])
def test_lora_counts_equal_peft_on_trainings_own_model(fixture, targets, request):
    from dialogtune.train.model import load_model

    config = job(request.getfixturevalue(fixture), method="lora", lora={"r": 4, "alpha": 8, "target_modules": targets})
    trained = load_model(config)  # what `dialogtune train` builds: weights read, LoRA added
    trainable, total = trained.get_nb_trainable_parameters()
    count = count_model(config)
    assert (count.trainable, count.parameters) == (trainable, total)
    assert 0 < trainable < total


def test_smollm2_from_its_config_alone():
    from transformers import AutoConfig

    from dialogtune.models import resolve

    count = count_model(job("smollm2-135m-instruct", method="full"))
    assert count.parameters == 134_515_008
    # The same number from the config by hand: tied embeddings, 30 blocks, the final norm.
    c = AutoConfig.from_pretrained(resolve("smollm2-135m-instruct"))
    h, kv = c.hidden_size, c.num_key_value_heads * c.head_dim
    block = 2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size + 2 * h
    assert count.parameters == c.vocab_size * h + c.num_hidden_layers * block + h
    lora = count_model(job("smollm2-135m-instruct", lora={"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"]}))
    assert lora.trainable == c.num_hidden_layers * 16 * ((h + h) + 2 * (h + kv) + (h + h))  # A and B of each


def saved_bytes_of_one_block(config: TrainJobConfig, attention: str, autocast: bool, tokens: int,
                             half: bool = False) -> tuple[int, int]:
    """(bytes a block of training's own model keeps for backward, of which bf16 weight copies),
    each storage counted once; parameters, the block's input and the rotary tables left out.
    `half`: the weights themselves in bf16 (DeepSpeed's half model; FSDP's gathered weights)."""
    from dialogtune.loss import core_model
    from dialogtune.train.attention import use_segment_attention
    from dialogtune.train.model import load_model

    torch.manual_seed(0)
    model = load_model(config)
    if half:
        model.to(torch.bfloat16)
    core = core_model(model)
    if attention == "segments":
        assert use_segment_attention(core)
    else:
        core.set_attn_implementation(attention)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # Autocast's bf16 copies of the weights, transposed or not (no activation here has such a shape).
    weight_shapes = {shape for p in core.model.layers.parameters() if p.dim() == 2
                     for shape in (tuple(p.shape), tuple(p.shape[::-1]))}
    ids = torch.randint(0, core.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(tokens)[None]
    saved: dict[int, tuple[int, bool]] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        is_weight_copy = tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in weight_shapes
        saved[storage.data_ptr()] = (storage.nbytes(), is_weight_copy)
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = core.model.embed_tokens(ids).detach().requires_grad_()
        rotary = core.model.rotary_emb(hidden, positions)
        # The second block's input is the first block's output: run one to count one whole.
        hidden = core.model.layers[0](hidden, position_embeddings=rotary, position_ids=positions)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            core.model.layers[1](hidden, position_embeddings=rotary, position_ids=positions)
    left_out = params | {t.untyped_storage().data_ptr() for t in rotary}
    kept = [(size, copy) for pointer, (size, copy) in saved.items() if pointer not in left_out]
    return sum(size for size, _ in kept), sum(size for size, copy in kept if copy)


METHODS = {
    "full": {"method": "full"},
    "lora-qkvo-dropout": {"method": "lora", "lora": {"r": 4, "dropout": 0.05,
                                                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    "lora-all-linear": {"method": "lora", "lora": {"r": 4, "dropout": 0.0, "target_modules": "all-linear"}},
    "lora-mlp-dropout": {"method": "lora", "lora": {"r": 2, "dropout": 0.1, "target_modules": ["up_proj", "down_proj"]}},
}


@pytest.mark.parametrize(("attention", "autocast", "half"), [
    ("segments", False, False), ("sdpa", False, False), ("eager", False, False), ("segments", True, False),
    ("sdpa", True, False), ("segments", True, True), ("sdpa", True, True),
])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("tokens", [256, 300])
def test_activation_formula_equals_what_a_block_keeps(llama_dir, method, attention, autocast, half, tokens):
    config = job(llama_dir, **METHODS[method])
    count = count_model(config)
    measured, weight_copies = saved_bytes_of_one_block(config, attention, autocast, tokens, half)
    numerics = Numerics("half" if half else "autocast" if autocast else "fp32", device="cpu")
    formula = block_activation_bytes(count, tokens, tokens, numerics, attention)
    # Under autocast each linear weight's bf16 copy is kept too (2 bytes a parameter, adapters included).
    adapters = 0 if method == "full" else count.trainable
    assert weight_copies == (2 * (count.block_linear + adapters) // count.blocks if autocast and not half else 0)
    assert formula == measured - weight_copies


def weight_copies_held(config: TrainJobConfig, tokens: int = 128) -> tuple[int, int]:
    """Training's own model, checkpointed as Trainer does it, one step under CPU bf16 autocast:
    (bytes of the blocks' bf16 weight copies alive when the forward ends, the most alive at once
    in backward). Every cast of a block weight is followed by a weak reference to its storage."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    from dialogtune.loss import core_model
    from dialogtune.train.model import load_model

    torch.manual_seed(0)
    model = load_model(config)
    model.activation_checkpointing_enable()
    model.train()
    core = core_model(model)
    block_weights = {id(p) for p in core.model.layers.parameters()}

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.alive: list[tuple[StorageWeakRef, int]] = []
            self.most = 0

        def live(self) -> int:
            self.alive = [(ref, size) for ref, size in self.alive if not ref.expired()]
            return sum(size for _, size in self.alive)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and id(args[0]) in block_weights:
                storage = out.untyped_storage()
                self.alive.append((StorageWeakRef(storage), storage.nbytes()))
            self.most = max(self.most, self.live())
            return out

    ids = torch.randint(0, core.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    casts = Casts()
    with casts:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
            gc.collect()
            after_forward = casts.live()
        casts.most = 0
        loss.backward()
    return after_forward, casts.most


@pytest.mark.parametrize("method", ["full", "lora-qkvo-dropout", "lora-all-linear"])
def test_checkpointed_autocast_keeps_trained_weights_copies_and_one_blocks(llama_dir, method):
    config = job(llama_dir, **METHODS[method])
    count = count_model(config)
    after_forward, in_backward = weight_copies_held(config)
    trained = count.block_linear if method == "full" else count.trainable
    # Frozen weights' copies are not kept: only the trained ones' (autocast's cast cache) ...
    assert after_forward == 2 * trained
    # ... and in backward the recomputed block's, every weight of it.
    assert in_backward == 2 * (count.block_linear + (0 if method == "full" else count.trainable)) // count.blocks
    autocast = Numerics("autocast", device="cpu")
    assert weight_copy_bytes(count, autocast, checkpointing=True) == max(after_forward, in_backward)
    assert weight_copy_bytes(count, autocast, checkpointing=False) == \
        2 * (count.block_linear + (0 if method == "full" else count.trainable))
    assert weight_copy_bytes(count, Numerics("fp32"), checkpointing=True) == 0


def test_segment_attention_constants_match_training():
    from dialogtune.train import attention

    assert QUERY_BLOCK == attention.QUERY_BLOCK


def test_defaults_match_training(llama_dir, tmp_path):
    from dialogtune.train.run import training_arguments

    config = job(llama_dir)
    arguments = training_arguments(config, tmp_path, "fp32", has_validation=False)
    result = estimate(config, device="cpu")
    assert (result.batch_size, result.optimizer) == (arguments.per_device_train_batch_size, arguments.optim.value)
    assert result.batch_size == DEFAULT_BATCH_SIZE
    assert result.tokens_per_micro_batch == DEFAULT_BATCH_SIZE * 256


def test_gradient_checkpointing_keeps_block_inputs_and_one_block(llama_dir):
    plain = estimate(job(llama_dir, method="full"), device="cpu")
    checkpointed = estimate(job(llama_dir, method="full", train={"gradient_checkpointing": True}), device="cpu")
    count = count_model(job(llama_dir, method="full"))
    tokens = plain.tokens_per_micro_batch
    one_block = block_activation_bytes(count, tokens, 256, Numerics("fp32"))
    saved = plain.terms["activations"] - checkpointed.terms["activations"]
    assert saved == count.blocks * one_block - (count.blocks * count.hidden * 4 * tokens + one_block)
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing


def test_full_fine_tuning_weights_gradients_and_adamw(llama_dir):
    result = estimate(job(llama_dir, method="full"), device="cpu")
    p = result.parameters
    assert (result.terms["weights"], result.terms["gradients"], result.terms["optimizer state"]) == (4 * p, 4 * p, 8 * p)
    sgd = estimate(job(llama_dir, method="full", train={"optim": "adamw_8bit"}), device="cpu")
    assert sgd.terms["optimizer state"] == 2 * p


def test_lora_trains_only_the_adapter(llama_dir):
    result = estimate(job(llama_dir, lora={"r": 4}), device="cpu")
    assert result.terms["weights"] == 4 * result.parameters
    assert result.terms["gradients"] == 4 * result.trainable_parameters
    assert result.terms["optimizer state"] == 8 * result.trainable_parameters


def test_several_processes_compute_the_loss_through_the_forward(llama_dir):
    one = estimate(job(llama_dir), device="gpu")
    two = estimate(job(llama_dir), device="gpu", processes=2)
    count = count_model(job(llama_dir))
    # bf16 logits for every (trained) token, their fp32 upcast, the fp32 log-softmax.
    assert two.terms["logits and loss"] == two.tokens_per_micro_batch * count.vocab * (2 + 4 + 4)
    assert one.terms["logits and loss"] != two.terms["logits and loss"]


def _distributed(llama_dir, processes, precision="fp32", **section):
    return estimate(job(llama_dir, method="full", precision=precision, distributed=section), processes=processes,
                    device="gpu")


def test_ddp_replicates_and_adds_gradient_buckets(llama_dir):
    one, four = _distributed(llama_dir, 1), _distributed(llama_dir, 4, strategy="ddp")
    for term in ("weights", "gradients", "optimizer state"):
        assert four.terms[term] == one.terms[term]
    assert four.terms["DDP gradient buckets"] == four.terms["gradients"]
    assert "DDP gradient buckets" not in one.terms


def test_fsdp_and_zero3_divide_weights_gradients_and_optimizer_state(llama_dir):
    one = _distributed(llama_dir, 1)
    count = count_model(job(llama_dir, method="full"))
    for section in ({"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3}):
        four = _distributed(llama_dir, 4, **section)
        for term in ("weights", "gradients", "optimizer state"):
            assert four.terms[term] == one.terms[term] // 4, (section, term)
        assert four.terms["gathered blocks"] == 2 * count.largest_block * 4


def test_zero2_divides_gradients_and_optimizer_state_only(llama_dir):
    one, four = _distributed(llama_dir, 1), _distributed(llama_dir, 4, strategy="deepspeed", zero_stage=2)
    assert four.terms["weights"] == one.terms["weights"]
    assert four.terms["gradients"] == one.terms["gradients"] // 4
    assert four.terms["optimizer state"] == one.terms["optimizer state"] // 4
    assert "gathered blocks" not in four.terms


def test_deepspeed_half_precision_is_zeros_2_2_12_bytes(llama_dir):
    result = _distributed(llama_dir, 8, precision="bf16", strategy="deepspeed", zero_stage=3)
    p = result.parameters
    assert (result.terms["weights"], result.terms["gradients"], result.terms["optimizer state"]) == \
        (2 * p // 8, 2 * p // 8, 12 * p // 8)


def test_cpu_offload_moves_the_shards_to_the_host(llama_dir):
    plain = _distributed(llama_dir, 4, strategy="fsdp")
    offloaded = _distributed(llama_dir, 4, strategy="fsdp", cpu_offload=True)
    assert offloaded.terms["weights"] == offloaded.terms["gradients"] == offloaded.terms["optimizer state"] == 0
    assert offloaded.host_bytes == sum(plain.terms[t] for t in ("weights", "gradients", "optimizer state"))


def test_one_process_ignores_the_distributed_section(llama_dir):
    alone = _distributed(llama_dir, 1, strategy="fsdp")
    assert alone.terms == _distributed(llama_dir, 1).terms
    assert "distributed.strategy fsdp applies to several processes only" in alone.notes[0]


def test_qlora_quantizes_the_block_linears(llama_dir):
    count = count_model(job(llama_dir))
    four = estimate(job(llama_dir, method="qlora"), device="gpu")
    eight = estimate(job(llama_dir, method="qlora", quantization_bits=8), device="gpu")
    rest = 4 * (count.parameters - count.block_linear)
    assert four.terms["weights"] == int(count.block_linear * (0.5 + 1 / 64 + 4 / 16384) + rest)
    assert eight.terms["weights"] == count.block_linear + 4 * count.block_linear_rows + rest
    assert four.gradient_checkpointing  # training switches it on for QLoRA
    with pytest.raises(ConfigError, match="qlora loads the base model in 4/8-bit with bitsandbytes, which needs a CUDA"):
        estimate(job(llama_dir, method="qlora"), device="cpu")
    # Training runs QLoRA in fp32 on a GPU (pick_precision allows it): so does the estimate.
    fp32 = estimate(job(llama_dir, method="qlora", precision="fp32"), device="gpu")
    assert fp32.precision == "fp32" and fp32.terms["weights"] == four.terms["weights"]


def test_fsdp_gathers_in_the_compute_precision_and_keeps_its_output_unit_gathered(untied_llama_dir):
    from accelerate.utils import FullyShardedDataParallelPlugin

    config = job(untied_llama_dir, method="full", precision="bf16", distributed={"strategy": "fsdp"})
    result = estimate(config, processes=4, device="gpu")
    count = count_model(config)
    # Accelerate's FSDP2 policy for a bf16 run: parameters gathered (and gradients reduced) in bf16.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    gathered_bytes = plugin.mixed_precision_policy.param_dtype.itemsize
    assert plugin.mixed_precision_policy.reduce_dtype.itemsize == gathered_bytes == 2
    assert result.terms["gathered blocks"] == 2 * count.largest_block * gathered_bytes
    # The tail unit: the final norm and the output layer of the real model.
    model = _materialised(untied_llama_dir)
    tail = sum(p.numel() for m in (model.model.norm, model.lm_head) for p in m.parameters())
    assert result.terms["gathered output layer"] == tail * gathered_bytes
    assert result.terms["reduce-scatter buffer"] == count.largest_block * gathered_bytes
    # fp32 shards of master weights, gradients and AdamW state (not DeepSpeed's 2 + 2 + 12).
    p = count.parameters
    assert (result.terms["weights"], result.terms["gradients"], result.terms["optimizer state"]) == \
        (4 * p // 4, 4 * p // 4, 8 * p // 4)
    # Blocks compute on bf16 weights: no autocast copies; activations as for a half-precision model.
    tokens = result.tokens_per_micro_batch
    one = estimate(job(untied_llama_dir, method="full", precision="bf16"), device="gpu")
    assert one.terms["activations"] - result.terms["activations"] == (
        weight_copy_bytes(count, Numerics("autocast"), checkpointing=False)
        + count.blocks * (block_activation_bytes(count, tokens, 256, Numerics("autocast"))
                          - block_activation_bytes(count, tokens, 256, Numerics("half"))))
    fp32 = estimate(job(untied_llama_dir, method="full", precision="fp32", distributed={"strategy": "fsdp"}),
                    processes=4, device="gpu")
    assert fp32.terms["gathered blocks"] == 2 * count.largest_block * 4


def test_fsdp_keeps_4bit_weights_whole_on_every_process(llama_dir):
    count = count_model(job(llama_dir, method="qlora"))
    one = estimate(job(llama_dir, method="qlora"), device="gpu")
    four = estimate(job(llama_dir, method="qlora", distributed={"strategy": "fsdp"}), processes=4, device="gpu")
    quantized = int(count.block_linear * (0.5 + 1 / 64 + 4 / 16384))
    assert four.terms["weights"] == quantized + (one.terms["weights"] - quantized) // 4


def zero_section_filled_by_transformers(ds_config: dict, model) -> dict:
    """transformers' own filling of a DeepSpeed config's "auto" values (HfTrainerDeepSpeedConfig,
    whose base class needs the deepspeed package: its methods borrowed onto Accelerate's base, which does not)."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig as Hf

    class Filled(HfDeepSpeedConfig):
        is_auto, fill_match, fill_only = Hf.is_auto, Hf.fill_match, Hf.fill_only
        trainer_config_finalize = Hf.trainer_config_finalize

        def __init__(self, config: dict):
            super().__init__(config)
            self.mismatches = []

    filled = Filled(ds_config)
    filled.trainer_config_finalize(TrainingArguments(output_dir="unused", report_to=[]), model, 10)
    return filled.config["zero_optimization"]


@pytest.mark.parametrize(("stage", "precision"), [(2, "bf16"), (3, "bf16"), (3, "fp32")])
def test_deepspeed_buckets_are_those_training_configures(llama_dir, monkeypatch, stage, precision):
    import sys

    from dialogtune.config import DistributedConfig
    from dialogtune.train.distributed import deepspeed_config

    monkeypatch.setitem(sys.modules, "deepspeed", type(sys)("deepspeed"))  # the config needs only its presence
    zero = zero_section_filled_by_transformers(
        deepspeed_config(DistributedConfig(strategy="deepspeed", zero_stage=stage)), _materialised(llama_dir))
    result = _distributed(llama_dir, 4, precision, strategy="deepspeed", zero_stage=stage)
    element = 2 if precision == "bf16" else 4
    # overlap_comm: about 4.5 x the reduce and all-gather buckets (DeepSpeed's documented footprint).
    if stage == 2:
        expected = int(4.5 * element * (zero["reduce_bucket_size"] + zero["allgather_bucket_size"]))
    else:
        expected = int(4.5 * element * zero["reduce_bucket_size"]) + element * zero["stage3_prefetch_bucket_size"]
    assert result.terms["DeepSpeed buckets"] == expected
    assert result.terms["DeepSpeed buckets"] < 4.5 * element * 2 * 5e8 / 10  # far below DeepSpeed's defaults


def test_setups_training_refuses_are_refused_with_its_message(llama_dir, monkeypatch):
    from dialogtune.config import DistributedConfig
    from dialogtune.errors import RunError
    from dialogtune.train import distributed
    from dialogtune.train.model import add_lora

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    for strategy in ("fsdp", "deepspeed"):
        with pytest.raises(ConfigError) as trained:
            distributed.engine_arguments(DistributedConfig(strategy=strategy))
        with pytest.raises(ConfigError) as estimated:
            estimate(job(llama_dir, distributed={"strategy": strategy}), processes=4, device="cpu")
        assert str(estimated.value) == str(trained.value)
    assert estimate(job(llama_dir), processes=4, device="cpu").distribution.strategy == "ddp"
    monkeypatch.delenv("WORLD_SIZE")

    config = job(llama_dir, lora={"target_modules": ["q_projj", "v_proj"]})
    with pytest.raises(RunError) as trained:
        add_lora(_materialised(llama_dir), config)
    with pytest.raises(ConfigError) as estimated:
        estimate(config, device="cpu")
    assert str(estimated.value) == str(trained.value)
    assert "lora.target_modules: q_projj not in this model" in str(estimated.value)

    for key, value in (("per_device_train_batch_size", 0), ("gradient_accumulation_steps", -1),
                       ("per_device_train_batch_size", "4x")):
        with pytest.raises(ConfigError, match=f"train.{key}: expected a whole number >= 1, got {value!r}"):
            estimate(job(llama_dir, train={key: value}), device="cpu")


def test_cli_prints_the_table_and_json(llama_dir, tmp_path, capsys):
    from dialogtune.cli import main

    path = tmp_path / "job.yaml"
    path.write_text(f"data: {{path: unused.jsonl}}\nmodel: {{name: {llama_dir}}}\nmax_length: 256\n")
    assert main(["estimate", str(path), "--device", "cpu", "--json", "--set", "method=full"]) == 0
    shown = json.loads(capsys.readouterr().out)
    expected = estimate(job(llama_dir, method="full"), device="cpu")
    assert shown["total_bytes"] == expected.total_bytes == sum(shown["terms"].values())
    assert shown["parameters"] == expected.parameters
    assert main(["estimate", str(path), "--device", "cpu", "--set", "method=full"]) == 0
    table = capsys.readouterr().out
    assert f"parameters           {expected.parameters:,}" in table and "activations" in table and "total" in table


def test_a_bad_key_is_the_config_error(llama_dir, tmp_path, capsys):
    from dialogtune.cli import main

    path = tmp_path / "job.yaml"
    path.write_text(f"data: {{path: unused.jsonl}}\nmodel: {{name: {llama_dir}}}\n")
    assert main(["estimate", str(path), "--set", "trian.max_steps=3"]) == 2
    assert f"{path}: unknown key 'trian'; did you mean 'train'?" in capsys.readouterr().err
    assert main(["estimate", str(path), "--processes", "0"]) == 2
    assert "--processes: expected a whole number >= 1, got 0" in capsys.readouterr().err
    assert main(["estimate", str(path), "--set", "precision=bf16", "--device", "cpu"]) == 2
    assert "precision: bf16 needs a CUDA GPU" in capsys.readouterr().err


def test_a_missing_model_is_a_model_error(tmp_path):
    from dialogtune.errors import ModelError

    with pytest.raises(ModelError, match="cannot load the model config of"):
        count_model(job(str(tmp_path / "nowhere")))
