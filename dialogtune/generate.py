"""`dialogtune generate RUN --input FILE --output FILE`: replies for a file of conversations.

    dialogtune generate runs/sgd_respond --input chats.jsonl --output replies.jsonl

Input: JSONL with OpenAI-style `messages` (the conversation so far; roles system, user and
assistant; `content` a string or a list of text parts), or a prepared dataset
directory (its validation split: one sample per trained turn, its context everything before
it, the turn itself as `reference`). Batches are sorted by length and padded (an encoder-decoder
reads the prompt with its encoder and writes the reply with its decoder); decoding is greedy
unless sampling flags say otherwise. Every input field is kept and `reply` (and `stopped`) added.
A progress bar on the terminal shows samples done, samples/s and the time left.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dialogtune.errors import ConfigError, DataError
from dialogtune.files import write_jsonl
from dialogtune.infer import ChatModel, Sampling, load_chat_model
from dialogtune.readers._io import iter_jsonl
from dialogtune.readers.messages import OPENAI_ROLES, content_text
from dialogtune.tokenize import trained_runs


def prompts_from_jsonl(chat: ChatModel, path: Path) -> tuple[list[dict], list[list[int]]]:
    records, prompts = [], []
    for number, record, error in iter_jsonl(path):
        if error:
            raise DataError(f"{path}:{number}: {error}")
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{path}:{number}: expected a non-empty list field 'messages'")
        messages = [checked_message(message, f"{path}:{number}: messages[{i}]") for i, message in enumerate(messages)]
        if chat.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": chat.system_prompt}, *messages]
        text = chat.render(messages)
        records.append(record)
        prompts.append(chat.tokenizer(text, add_special_tokens=False)["input_ids"])
    return records, prompts


def checked_message(message: object, where: str) -> dict:
    """A message as the templates read it: a known role and its content as text (OpenAI's list of
    text parts joined); `name`, if given, a string or null. Anything else is a DataError naming `where`."""
    if not isinstance(message, dict):
        raise DataError(f"{where}: expected an object with 'role' and 'content', got {type(message).__name__}")
    role = OPENAI_ROLES.get(message["role"]) if isinstance(message.get("role"), str) else None
    if role is None:
        said = f"{message['role']!r}" if "role" in message else "none"
        raise DataError(f"{where}: role {said}: expected one of {', '.join(dict.fromkeys(OPENAI_ROLES.values()))}")
    if "content" not in message:
        raise DataError(f"{where}: no 'content'")
    try:
        content = content_text(message["content"])
    except ValueError as err:
        raise DataError(f"{where}: content: {err}") from None
    if message.get("name") is not None and not isinstance(message["name"], str):
        raise DataError(f"{where}: name: expected a string, got {type(message['name']).__name__}")
    return {**message, "role": role, "content": content}


def prompts_from_prepared(chat: ChatModel, directory: Path, split: str) -> tuple[list[dict], list[list[int]]]:
    import datasets

    path = directory / split
    if not path.exists():
        raise DataError(f"{directory}: no {split} split to generate for")
    records, prompts = [], []
    for row in datasets.load_from_disk(str(path)).with_format("numpy"):
        starts = [*np.flatnonzero(row["position_ids"] == 0).tolist(), len(row["position_ids"])]  # packed examples
        for start, end in pairwise(starts):
            ids = row["input_ids"][start:end].tolist()
            # Every trained turn is a sample: its context is everything before it.
            for turn_start, turn_end in trained_runs(row["labels"][start:end]):
                reference = chat.tokenizer.decode(ids[turn_start:turn_end], skip_special_tokens=False)
                records.append({"context": chat.tokenizer.decode(ids[:turn_start], skip_special_tokens=False),
                                "reference": reference.split(chat.end_of_turn)[0].strip()})
                prompts.append(ids[:turn_start])
    return records, prompts


def cut_at_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def pad_prompts(prompts: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts and its attention mask. A decoder-only model continues its prompt, so
    prompts are left-padded to end where generation starts; an encoder reads its input from
    position 0 as in training (Seq2SeqCollator), so encoder inputs are right-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        place = slice(width - len(prompt), width) if left else slice(0, len(prompt))
        ids[row, place] = torch.tensor(prompt)
        mask[row, place] = 1
    return ids, mask


def check_room(chat: ChatModel, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse prompts that leave a decoder-only model no room for the reply: past its context,
    positions it never learned give nonsense, or an IndexError with learned position embeddings."""
    crowded = [i for i, prompt in enumerate(prompts) if chat.reply_room(len(prompt)) < max_new_tokens]
    if crowded:
        first = crowded[0]
        raise ConfigError(f"{len(crowded)} of {len(prompts)} prompts leave no room for --max-new-tokens"
                          f" {max_new_tokens} in the model's context of {chat.context_length} tokens (the first:"
                          f" number {first + 1}, {len(prompts[first])} tokens); shorten those conversations or"
                          " lower --max-new-tokens")


def generate_replies(chat: ChatModel, prompts: list[list[int]], sampling: Sampling,
                     batch_size: int = 8, quiet: bool = False) -> list[tuple[str, bool]]:
    """A reply (cut at the first stop) and whether it stopped by itself, for each prompt, in order."""
    chat.check_reply_length(sampling.max_new_tokens)
    check_room(chat, prompts, sampling.max_new_tokens)
    tokenizer = chat.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = chat.stops_for(None)
    eos = chat.end_token_ids()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[tuple[str, bool]] = [("", False)] * len(prompts)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    bar = tqdm(total=len(prompts), desc="generate", unit=" samples", disable=quiet or None)
    for begin in range(0, len(order), batch_size):
        batch = order[begin : begin + batch_size]
        ids, mask = pad_prompts([prompts[i] for i in batch], pad, left=not chat.is_encoder_decoder)
        with torch.no_grad():
            output = chat.model.generate(input_ids=ids.to(chat.model.device), attention_mask=mask.to(chat.model.device),
                                         pad_token_id=pad, stopping_criteria=chat.stopping_criteria(stops),
                                         **sampling.generate_kwargs())
        for row, index in zip(chat.reply_tokens(output, ids.shape[1]).tolist(), batch, strict=True):
            new = [t for t in row if t != pad or pad == tokenizer.eos_token_id]
            text = tokenizer.decode(new, skip_special_tokens=False)
            text, stopped = cut_at_stops(text, stops)
            if tokenizer.eos_token and tokenizer.eos_token in text:
                text, stopped = text.split(tokenizer.eos_token)[0], True
            # A row ends at a stop string or an end token (then generate pads it to the batch's width);
            # a pad token sampled mid-reply (an untrained model does) is no end: not `len(new) < max`.
            results[index] = (text.strip(), stopped or not eos.isdisjoint(row))
        bar.update(len(batch))
    bar.close()
    return results


def run_generate(model: str, source: Path, output: Path, *, sampling: Sampling, split: str = "validation",
                 batch_size: int = 8) -> int:
    """Replies for a JSONL of conversations, or for a prepared dataset's `split`, written to `output`."""
    chat = load_chat_model(model)
    if source.is_dir():
        records, prompts = prompts_from_prepared(chat, source, split)
    elif source.exists():
        records, prompts = prompts_from_jsonl(chat, source)
    else:
        raise DataError(f"{source}: no such file or directory")
    replies = generate_replies(chat, prompts, sampling, batch_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(output, ({**record, "reply": reply, "stopped": stopped}
                         for record, (reply, stopped) in zip(records, replies, strict=True)))
    stopped = sum(1 for _, s in replies if s)
    print(f"{len(replies)} replies -> {output} ({stopped} stopped by themselves)")
    return 0
