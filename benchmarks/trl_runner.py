"""Measure TRL's SFTTrainer (LoRA) on a dialogue fine-tuning job: one measurement per process.

    python benchmarks/trl_runner.py --data TRAIN.jsonl --model MODEL_DIR --mode {whole,pairs} --packing {none,bfd}
        --max-length 512 --batch 4 --lr 2e-4 --lora-r 16 --trained-tokens N [--max-steps M]
        --out RESULT.json --adapter-out DIR [--seed 0]
    python benchmarks/trl_runner.py --prepare-only ...   (data preparation only, no training)

TRAIN.jsonl holds one {"messages": [{"role": "user"|"assistant", "content": str}, ...]} per line.

Modes
  whole  whole conversations, `assistant_only_loss=True`. TRL needs `{% generation %}` markers in the chat template
         and has no training template for SmolLM2's ChatML, so the stock template is tried first (its error is
         recorded as `stock_template_error`), then a patched template is used that renders byte-identically but wraps
         each assistant message's content + `<|im_end|>` in generation markers (verified at start).
  pairs  the out-of-the-box fallback: one conversational prompt/completion example per assistant turn (prompt = all
         messages before it, completion = [that assistant message]); TRL's default completion-only loss.
Packing
  bfd    `packing=True, packing_strategy="bfd"` (padding-free: one flattened row per batch, position_ids restart per
         sequence).
  none   no packing, padding per batch (attention_mask).

How TRL 1.16 marks trained positions (read from trl/trainer/sft_trainer.py): `_prepare_dataset` tokenizes each example
(`assistant_masks` from the template's generation markers for `whole`, `completion_mask` for prompt/completion), then
folds these masks into a `labels` column (-100 where not trained) and drops the masks. The collator pads labels with
-100 and, when padding-free, also sets -100 at every sequence start (position_ids == 0). The loss (TRL's fused LM head)
is on the shifted labels, i.e. on `labels[..., 1:] != -100` (the same count Trainer passes as `num_items_in_batch`).
So `trained_tokens` here counts `labels[..., 1:] != -100` of each training batch.

Timing
  prepare  reading the JSONL and building the raw `datasets.Dataset` (plus the pair expansion for `pairs`), then TRL's
           own dataset preparation (`SFTTrainer._prepare_dataset`, timed by wrapping it; it runs inside the trainer's
           constructor). Model loading, LoRA wrapping and the rest of the constructor are reported apart.
  train    wall time of `trainer.train()`; per-step times are the intervals between consecutive `on_step_end`
           events (the first measured from `on_train_begin`), so the steady rates leave out step 1 (warm-up).
Training stops at the end of the first optimizer step where the cumulative trained tokens reach --trained-tokens (or at
--max-steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

T_START = time.perf_counter()

import datasets
import peft
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

IMPORT_SECONDS = time.perf_counter() - T_START

# SmolLM2-Instruct's ChatML emits every message with this one expression. The patched template emits the assistant
# messages with the same bytes, with content + <|im_end|> inside {% generation %} (the trailing "\n" is not a
# token the model has to predict for its turn, so it stays outside, like in TRL's own ChatML training templates).
CHATML_MESSAGE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
CHATML_MESSAGE_PATCHED = (
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}" + CHATML_MESSAGE + "{% endif %}"
)


class Captured(logging.Handler):
    """Records the warnings TRL / transformers / peft log (they are still printed as usual)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--mode", choices=["whole", "pairs"], required=True)
    p.add_argument("--packing", choices=["none", "bfd"], required=True)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=None, help="default: 2 * lora-r")
    p.add_argument("--trained-tokens", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--adapter-out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--attn-implementation", default=None, help="passed to from_pretrained (default: the model's)")
    p.add_argument("--cuda-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="base weights dtype when CUDA is available (training uses bf16=True there)")
    args = p.parse_args(argv)
    if not args.prepare_only:
        if args.trained_tokens is None and args.max_steps is None:
            p.error("--trained-tokens or --max-steps is required for training")
        if args.adapter_out is None:
            p.error("--adapter-out is required for training")
    return args


def read_jsonl(path: str) -> list[list[dict]]:
    dialogues = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                dialogues.append(json.loads(line)["messages"])
    return dialogues


def to_pairs(dialogues: list[list[dict]]) -> list[dict]:
    rows = []
    for messages in dialogues:
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and i > 0:
                rows.append({"prompt": messages[:i], "completion": [message]})
    return rows


def patched_template(tokenizer, first_dialogue: list[dict]) -> str:
    original = tokenizer.chat_template
    if not isinstance(original, str) or CHATML_MESSAGE not in original:
        raise RuntimeError("the model's chat template is not the SmolLM2 ChatML this script knows how to patch:\n"
                           f"{original!r}")
    patched = original.replace(CHATML_MESSAGE, CHATML_MESSAGE_PATCHED)
    a = tokenizer.apply_chat_template(first_dialogue, tokenize=False)
    b = tokenizer.apply_chat_template(first_dialogue, tokenize=False, chat_template=patched)
    if a != b:
        raise RuntimeError(f"patched template renders differently from the original:\n{a!r}\n---\n{b!r}")
    return patched


def spans(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """Decoded contiguous runs of positions with label != -100."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    if cur:
        out.append(tokenizer.decode(cur))
    return out


class MeasuredSFTTrainer(SFTTrainer):
    """SFTTrainer that times its own dataset preparation and counts the tokens of each training batch."""

    def __init__(self, *a, **kw):
        self.prepare_dataset_seconds = 0.0
        self._time_prepare = True
        self.batch_stats: list[tuple[int, int, int, int]] = []  # per micro-batch: trained, real, padded, trl_items
        super().__init__(*a, **kw)

    def _prepare_dataset(self, dataset, *a, **kw):
        t = time.perf_counter()
        out = super()._prepare_dataset(dataset, *a, **kw)
        if self._time_prepare:
            self.prepare_dataset_seconds += time.perf_counter() - t
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            labels = inputs["labels"]
            # trained = label positions the (shifted) loss uses; TRL puts -100 on untrained, padding and (padding-free)
            # sequence-start positions; labels[:, 0] is never a target.
            trained = int((labels[..., 1:] != -100).sum())
            input_ids = inputs["input_ids"]
            padded = input_ids.numel()
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else padded
            items = int(num_items_in_batch) if num_items_in_batch is not None else -1
            self.batch_stats.append((trained, real, padded, items))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class Meter(TrainerCallback):
    def __init__(self, trainer_ref, budget: int | None, cuda: bool):
        self.trainer_ref = trainer_ref
        self.budget = budget
        self.cuda = cuda
        self.last = None
        self.step_seconds: list[float] = []
        self.step_stats: list[tuple[int, int, int, int]] = []
        self.trained_total = 0
        self.losses: list[float] = []
        self.logs: list[dict] = []
        self.stop_reason = None
        self._seen = 0

    def on_train_begin(self, args, state, control, **kw):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last = now
        new = self.trainer_ref().batch_stats[self._seen:]
        self._seen += len(new)
        step = tuple(sum(col) for col in zip(*new)) if new else (0, 0, 0, 0)
        self.step_stats.append(step)
        self.trained_total += step[0]
        if self.budget is not None and self.trained_total >= self.budget:
            control.should_training_stop = True
            self.stop_reason = "trained_tokens"
        elif state.global_step >= state.max_steps:
            self.stop_reason = "max_steps"

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.logs.append({k: v for k, v in logs.items() if isinstance(v, (int, float))})


def main(argv=None):
    full_argv = [sys.executable, *sys.argv] if argv is None else ["benchmarks/trl_runner.py", *argv]
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    captured = Captured()
    for name in ("trl", "transformers", "peft", "accelerate", "datasets"):
        logging.getLogger(name).addHandler(captured)
    py_warnings: list[str] = []
    _show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message}"
        if text not in py_warnings:
            py_warnings.append(text)
        _show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning

    cuda = torch.cuda.is_available()
    result: dict = {
        "runner": "trl",
        "argv": full_argv,
        "mode": args.mode,
        "packing": args.packing,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "peft": peft.__version__, "datasets": datasets.__version__},
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "import_seconds": round(IMPORT_SECONDS, 3),
    }

    # ---- data preparation, part 1: tokenizer + JSONL -> raw Dataset
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer_seconds = time.perf_counter() - t
    t = time.perf_counter()
    dialogues = read_jsonl(args.data)
    if args.mode == "whole":
        raw = Dataset.from_list([{"messages": m} for m in dialogues])
    else:
        raw = Dataset.from_list(to_pairs(dialogues))
    read_seconds = time.perf_counter() - t

    # ---- template (whole): stock first, record TRL's refusal, then the patched one
    template = "stock"
    if args.mode == "whole":
        probe_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                # No peft_config, so nothing is wrapped before TRL's template check; 1-example dataset.
                SFTTrainer(model=probe_model, processing_class=tokenizer, train_dataset=raw.select([0]),
                           args=SFTConfig(output_dir=tmp, assistant_only_loss=True, max_length=args.max_length,
                                          bf16=False, report_to=[], gradient_checkpointing=False,
                                          activation_checkpointing=False))
                result["stock_template_error"] = None
            except Exception as e:  # noqa: BLE001 - recorded as is
                result["stock_template_error"] = f"{type(e).__name__}: {e}"
        del probe_model
        if result["stock_template_error"] is not None:
            tokenizer.chat_template = patched_template(tokenizer, dialogues[0])
            template = "patched-generation-markers"
    result["template"] = template

    # ---- model
    t = time.perf_counter()
    dtype = getattr(torch, args.cuda_dtype) if cuda else torch.float32
    model_kwargs = {"dtype": dtype}
    if args.attn_implementation:
        model_kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(args.model, **model_kwargs)
    model_load_seconds = time.perf_counter() - t
    result["model_dtype"] = str(dtype).removeprefix("torch.")
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)

    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    budget = args.trained_tokens
    # Each step trains >= 1 token, so `budget` steps always reach the budget; the callback stops earlier.
    max_steps = args.max_steps if args.max_steps is not None else max(1, budget or 1)
    out_dir = tempfile.TemporaryDirectory()
    config = SFTConfig(
        output_dir=out_dir.name,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=max_steps,
        max_length=args.max_length,
        packing=args.packing == "bfd",
        packing_strategy="bfd",
        assistant_only_loss=args.mode == "whole",
        # completion_only_loss left at its default (None -> True for prompt/completion data)
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
        # TRL's config defaults gradient_checkpointing to True; transformers 5.23 renamed it activation_checkpointing
        # (the old name is a deprecated alias, mirrored from the new one when both are given)
        gradient_checkpointing=False,
        activation_checkpointing=False,
        bf16=cuda,  # SFTConfig defaults bf16 to True; fp32 on CPU
        fp16=False,
        dataset_num_proc=None,
    )

    assert config.gradient_checkpointing is False and config.activation_checkpointing is False

    # ---- trainer construction (runs TRL's dataset preparation)
    trainer_ref = None
    meter = Meter(lambda: trainer_ref, budget, cuda)
    t = time.perf_counter()
    trainer = MeasuredSFTTrainer(model=model, args=config, train_dataset=raw, processing_class=tokenizer,
                                 peft_config=lora, callbacks=[meter])
    trainer_init_seconds = time.perf_counter() - t
    trainer_ref = trainer
    trainer._time_prepare = False

    prepared = trainer.train_dataset
    table = prepared.with_format("arrow")[:]
    lengths = table.column("input_ids").combine_chunks().value_lengths()
    prep_tokens = int(sum(lengths.to_pylist()))
    prep_labels = table.column("labels").combine_chunks().flatten().to_numpy()
    prep_trained = int((prep_labels != -100).sum())
    prepare_seconds = read_seconds + trainer.prepare_dataset_seconds
    result.update({
        "dialogues": len(dialogues),
        "examples": len(raw),
        "prepared_rows": len(prepared),
        "prepared_tokens": prep_tokens,
        "prepared_trained_tokens": prep_trained,
        "prepare_seconds": round(prepare_seconds, 4),
        "prepare_read_seconds": round(read_seconds, 4),
        "prepare_trl_seconds": round(trainer.prepare_dataset_seconds, 4),
        "prepare_seconds_with_tokenizer_load": round(prepare_seconds + tokenizer_seconds, 4),
        "prepare_dialogues_per_s": round(len(dialogues) / prepare_seconds, 2),
        "prepare_tokens_per_s": round(prep_tokens / prepare_seconds, 1),
        "tokenizer_load_seconds": round(tokenizer_seconds, 4),
        "model_load_seconds": round(model_load_seconds, 4),
        "trainer_init_seconds_excluding_prepare": round(trainer_init_seconds - trainer.prepare_dataset_seconds, 4),
    })

    # ---- label check through TRL's own preparation (no packing, so one row = one example), on the first example
    # that fits in max_length untruncated (for `whole`: the first such dialogue)
    check_index = 0
    for i in range(min(len(raw), 200)):
        ids = tokenizer.apply_chat_template(raw[i]["messages"] if args.mode == "whole"
                                            else raw[i]["prompt"] + raw[i]["completion"], tokenize=True,
                                            return_dict=True)["input_ids"]
        if len(ids) <= args.max_length:
            check_index = i
            break
    row = trainer._prepare_dataset(raw.select([check_index]), tokenizer, trainer.args, False, None, "check")[0]
    got = spans(row["input_ids"], row["labels"], tokenizer)
    if args.mode == "whole":
        want = [m["content"] + tokenizer.eos_token for m in raw[check_index]["messages"] if m["role"] == "assistant"]
    else:
        want = [raw[check_index]["completion"][0]["content"] + tokenizer.eos_token + "\n"]
    result["label_check"] = {"ok": got == want, "example_index": check_index, "n_spans": len(got),
                             "expected_spans": len(want), "trained_spans_first3": got[:3],
                             "trained_tokens": sum(1 for x in row["labels"] if x != -100),
                             "tokens": len(row["input_ids"])}
    if args.mode == "whole" and not result["label_check"]["ok"]:
        raise RuntimeError(f"trained positions are not the assistant contents + eos:\n{got}\nvs\n{want}")

    if args.prepare_only:
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        result["warnings"] = captured.messages + py_warnings
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"TRL prepare {args.mode}/{args.packing}: {len(dialogues)} dialogues, {prep_tokens} tokens in "
              f"{prepare_seconds:.3f}s ({len(dialogues) / prepare_seconds:.0f} dialogues/s, "
              f"{prep_tokens / prepare_seconds:.0f} tokens/s)")
        return result

    # ---- training
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    train_output = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t
    trainer.model.save_pretrained(args.adapter_out)

    steps = len(meter.step_seconds)
    trained = [s[0] for s in meter.step_stats]
    real = [s[1] for s in meter.step_stats]
    padded = [s[2] for s in meter.step_stats]
    items = [s[3] for s in meter.step_stats]
    tot_trained, tot_real, tot_padded = sum(trained), sum(real), sum(padded)
    steady_s = sum(meter.step_seconds[1:])
    result.update({
        "train_seconds": round(train_seconds, 4),
        "steps": steps,
        "epochs": trainer.state.epoch,
        "stop_reason": meter.stop_reason,
        "trained_tokens_budget": budget,
        "tokens": tot_real,
        "padded_tokens": tot_padded,
        "trained_tokens": tot_trained,
        "trl_num_items_in_batch_total": sum(items) if all(i >= 0 for i in items) else None,
        "trl_num_tokens_logged": (meter.logs[-1].get("num_tokens") if meter.logs else None),
        "tokens_per_s": round(tot_real / train_seconds, 2),
        "trained_tokens_per_s": round(tot_trained / train_seconds, 2),
        "steady_seconds": round(steady_s, 4) if steps > 1 else None,
        "steady_tokens_per_s": round(sum(real[1:]) / steady_s, 2) if steps > 1 else None,
        "steady_trained_tokens_per_s": round(sum(trained[1:]) / steady_s, 2) if steps > 1 else None,
        "padding_fraction": round(1 - tot_real / tot_padded, 4) if tot_padded else None,
        "train_loss_last": meter.losses[-1] if meter.losses else None,
        "train_loss_mean": train_output.training_loss,
        "train_losses": meter.losses,
        "step_seconds": [round(s, 4) for s in meter.step_seconds],
        "step_trained_tokens": trained,
        "step_tokens": real,
        "step_padded_tokens": padded,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "adapter_out": str(args.adapter_out),
        "warnings": captured.messages + py_warnings,
    })
    if cuda:
        result["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    from compare_trl import matmul_peak  # after the memory peaks are read: the machine's speed now

    result["matmul_peak_after_gflops"] = matmul_peak()["matmul_peak_gflops"]
    out_dir.cleanup()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    steady = result["steady_trained_tokens_per_s"]
    print(f"TRL {args.mode}/{args.packing}: {steps} steps, {tot_trained} trained / {tot_real} real / {tot_padded} "
          f"padded tokens in {train_seconds:.2f}s ({tot_trained / train_seconds:.0f} trained tok/s, steady "
          f"{steady if steady is not None else '-'}), loss {result['train_loss_last']}, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB")
    return result


if __name__ == "__main__":
    main()
