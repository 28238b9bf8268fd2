"""Encoder-decoder runs in use: chat, generate, serve and export on a tiny BART LoRA run.

Every reply is checked against `generate` called directly with transformers and PEFT: the chat
template's prompt (up to the assistant's header) to the encoder, the reply from the decoder, cut
at the first stop string."""

from __future__ import annotations

import json
import warnings

import httpx
import openai
import pytest
import torch
from helpers import load_without_dialogtune
from test_serve import start_server

from dialogtune.chat import command
from dialogtune.cli import main
from dialogtune.errors import ConfigError
from dialogtune.generate import generate_replies, pad_prompts
from dialogtune.infer import Conversation, Sampling, chat_model, load_chat_model, load_prompting
from dialogtune.serve import create_app

QUESTIONS = ["Where is the station?", "What time is it? Is it late already?", "Hi",
             "Can you book a table for two people tonight, please?", "Is it raining?"]
SEEDED = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}  # what --temperature 1 --top-k 0 --top-p 1 ask


@pytest.fixture(scope="module")
def run(tiny_bart_run):
    return tiny_bart_run / "run"


@pytest.fixture(scope="module")
def plain(run):
    """The run loaded without dialogtune: base model plus adapter, tokenizer with the training template."""
    from transformers import AutoModelForSeq2SeqLM

    return load_without_dialogtune(run, AutoModelForSeq2SeqLM)


def direct_reply(model, tokenizer, messages: list[dict], max_new_tokens: int, stops=("<|im_end|>", "</s>"),
                 seed: int | None = None, **sampling) -> tuple[str, bool]:
    """What `model.generate` writes for the rendered conversation (ending at a stop, as dialogtune
    does, so sampling draws as many numbers), as text cut at the first stop, and whether a stop came
    within max_new_tokens. Works for decoder-only and encoder-decoder models."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, stop_strings=list(stops), tokenizer=tokenizer,
                                **({"do_sample": False} | sampling))
    new = output[0, 1:] if model.config.is_encoder_decoder else output[0, ids.shape[1]:]
    reply = tokenizer.decode(new, skip_special_tokens=False)
    cuts = [reply.find(s) for s in stops if s in reply]
    return (reply[: min(cuts)], True) if cuts else (reply, False)


def seeded_stop(plain, messages: list[dict], max_new_tokens: int) -> tuple[int, str, str]:
    """A seed whose sampled reply has two ASCII letters after its first character: a stop string
    to cut it at. Returns the seed, the reply before the stop, and the stop. (The tiny model's
    replies change with any change to training, so the seed is searched, not fixed.)"""
    for seed in range(50):
        raw, _ = direct_reply(*plain, messages, max_new_tokens, seed=seed, **SEEDED)
        at = next((i for i in range(1, len(raw) - 1) if raw[i : i + 2].isascii() and raw[i : i + 2].isalpha()), None)
        if at is not None:
            return seed, raw[:at], raw[at : at + 2]
    raise AssertionError("no seed gives a reply with two letters in it")


def test_a_run_loads_as_encoder_decoder_with_its_adapter(run):
    chat = load_chat_model(str(run))
    assert chat.is_encoder_decoder and type(chat.model).__name__ == "PeftModelForSeq2SeqLM"
    assert (chat.template_name, chat.end_of_turn, chat.context_length) == ("chatml", "<|im_end|>", 256)
    assert chat.reply_room(200) == 256 and chat.reply_room(257) == 0  # encoder and decoder each have 256 positions


def test_chat_play_replies_equal_direct_generation(run, plain, capsys):
    lines = ["Hello! Can you help me find a restaurant for tonight?", "Something Italian, near the center."]
    seed = seeded_stop(plain, [{"role": "user", "content": lines[0]}], 12)[0]  # a seed with a reply to show
    flags = ["--temperature", "1", "--top-k", "0", "--top-p", "1", "--seed", str(seed), "--max-new-tokens", "12"]
    expected = [f"chatting with {run} as Assistant (template chatml); /help for commands"]
    history = []
    for line in lines:
        history.append({"role": "user", "content": line})
        raw, stopped = direct_reply(*plain, history, 12, seed=seed, **SEEDED)
        history.append({"role": "assistant", "content": raw})
        expected += [f"User> {line}", f"Assistant: {raw}" + ("" if stopped else " […]")]
    for cache in ([], ["--no-cache"]):  # an encoder-decoder re-encodes every turn either way
        assert main(["chat", str(run), "--play", "2", *flags, *cache]) == 0
        assert capsys.readouterr().out == "\n".join(expected) + "\n"


def test_a_chat_turn_emits_no_warnings(run, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["chat", str(run), "--play", "1", "--max-new-tokens", "4"]) == 0
    assert "Assistant: " in capsys.readouterr().out


def test_streamed_text_never_shows_a_stop_string(run, plain):
    chat = load_chat_model(str(run))
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    seed, before_stop, stop = seeded_stop(plain, messages, 24)
    chat.stop_strings = [*chat.stop_strings, stop]
    pieces: list[str] = []
    conversation = Conversation(chat, messages=list(messages))
    reply = conversation.respond(Sampling(temperature=1, top_k=0, top_p=1, max_new_tokens=24, seed=seed), pieces.append)
    assert "".join(pieces) == reply.raw == before_stop and reply.stopped


def test_generation_defaults_of_the_checkpoint_do_not_apply(run, plain):
    """bart-base ships 4 beams, no repeated 3-grams and a forced <s>: training used none of them,
    and beam search cannot stream."""
    chat = load_chat_model(str(run))
    base = chat.model.get_base_model()
    base.generation_config.num_beams, base.generation_config.no_repeat_ngram_size = 4, 3
    base.generation_config.forced_bos_token_id = 0
    chat = chat_model(chat.model, load_prompting(str(run)))
    config = chat.model.get_base_model().generation_config
    assert (config.num_beams, config.no_repeat_ngram_size, config.forced_bos_token_id) == (None, None, None)
    assert (config.decoder_start_token_id, config.eos_token_id) == (1, 1)
    reply = Conversation(chat).say(QUESTIONS[0], Sampling(temperature=0, max_new_tokens=4))
    assert (reply.raw, reply.stopped) == direct_reply(*plain, [{"role": "user", "content": QUESTIONS[0]}], 4)


def encoder_prompts(chat) -> list[list[int]]:
    return [chat.tokenizer(chat.render([{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
            for q in QUESTIONS]


def test_padded_encoder_inputs_read_like_single_ones(run):
    chat = load_chat_model(str(run))
    prompts = encoder_prompts(chat)
    ids, mask = pad_prompts(prompts, chat.tokenizer.pad_token_id, left=False)
    encoder = chat.model.get_encoder()
    with torch.no_grad():
        batch = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, prompt in enumerate(prompts):
            alone = encoder(input_ids=torch.tensor([prompt])).last_hidden_state[0]
            assert torch.allclose(batch[row, : len(prompt)], alone, atol=1e-5)


def write_questions(path):
    rows = [{"id": i, "messages": [{"role": "user", "content": q}]} for i, q in enumerate(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_on_jsonl_equals_direct_generation_at_any_batch_size(run, plain, tmp_path, capsys):
    rows = write_questions(tmp_path / "in.jsonl")
    for size in (1, 3):
        assert main(["generate", str(run), "--input", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / f"out{size}.jsonl"), "--batch-size", str(size), "--max-new-tokens", "8"]) == 0
        assert f"5 replies -> {tmp_path / f'out{size}.jsonl'}" in capsys.readouterr().out
        written = read(tmp_path / f"out{size}.jsonl")
        assert [r["id"] for r in written] == [r["id"] for r in rows]
        for record, row in zip(written, rows, strict=True):
            raw, stopped = direct_reply(*plain, row["messages"], 8)
            assert (record["reply"], record["stopped"]) == (raw.strip(), stopped)


def test_sampled_replies_equal_direct_generation_in_length_order(run, plain):
    chat = load_chat_model(str(run))
    prompts = encoder_prompts(chat)
    replies = generate_replies(chat, prompts, Sampling(temperature=1, top_k=0, top_p=1, max_new_tokens=16, seed=0),
                               batch_size=1, quiet=True)
    torch.manual_seed(0)  # generate seeds once, then answers the shortest prompts first
    expected = {}
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        raw, stopped = direct_reply(*plain, [{"role": "user", "content": QUESTIONS[i]}], 16, **SEEDED)
        expected[i] = (raw.strip(), stopped)
    assert replies == [expected[i] for i in range(len(prompts))]
    assert any(text for text, _ in replies)


def direct_batch(model, tokenizer, questions: list[str], max_new_tokens: int, seed: int,
                 stops=("<|im_end|>",), **sampling) -> list[tuple[str, bool]]:
    """What one `model.generate` call writes for a right-padded batch of questions (transformers'
    own padding and mask), each reply cut at the first stop, and whether it stopped."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                stop_strings=list(stops), tokenizer=tokenizer, **sampling)
    replies = []
    for row in output[:, 1:].tolist():
        text = tokenizer.decode([t for t in row if t != tokenizer.pad_token_id], skip_special_tokens=False)
        cuts = [text.find(s) for s in (*stops, tokenizer.eos_token) if s in text]
        replies.append((text[: min(cuts)].strip(), True) if cuts else (text.strip(), False))
    return replies


def test_batched_encoder_inputs_are_right_padded_and_masked(run, plain):
    chat = load_chat_model(str(run))
    prompts = encoder_prompts(chat)
    calls: list[dict] = []
    real = chat.model.generate
    chat.model.generate = lambda **kwargs: calls.append(kwargs) or real(**kwargs)
    replies = generate_replies(chat, prompts, Sampling(temperature=1, top_k=0, top_p=1, max_new_tokens=24, seed=0),
                               batch_size=5, quiet=True)
    ids, mask = calls[0]["input_ids"], calls[0]["attention_mask"]
    for row, prompt in enumerate(sorted(prompts, key=len)):
        assert ids[row, : len(prompt)].tolist() == prompt and mask[row].tolist() == [1] * len(prompt) + [0] * (
            ids.shape[1] - len(prompt))
    # One batch, answered shortest prompt first: the same draws as one direct call on that batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    direct = direct_batch(*plain, [QUESTIONS[i] for i in order], 24, seed=0, **SEEDED)
    assert replies == [direct[order.index(i)] for i in range(len(prompts))]
    assert any(stopped for _, stopped in replies) and not all(stopped for _, stopped in replies)
    assert not any(marker in text for text, _ in replies for marker in ("<|im_end|>", "</s>", "<pad>"))
    greedy = Sampling(temperature=0, max_new_tokens=24)
    assert generate_replies(chat, prompts, greedy, batch_size=5, quiet=True) == [
        (raw.strip(), stopped) for raw, stopped in
        (direct_reply(*plain, [{"role": "user", "content": q}], 24) for q in QUESTIONS)]


def chats_of(rows) -> list[tuple[str, str]]:
    """The question and answer of each prepared row, from the chats the fixture wrote (`c{i}`:
    QUESTIONS[i % 6], ANSWERS[i % 6] of test_train_run): known without decoding anything."""
    from test_train_run import ANSWERS
    from test_train_run import QUESTIONS as ASKED

    return [(ASKED[int(d[1:]) % 6], ANSWERS[int(d[1:]) % 6]) for [d] in rows["dialogue_ids"]]


def test_generate_over_the_prepared_split_feeds_the_context_to_the_encoder(tiny_bart_run, plain, tmp_path):
    import datasets

    assert main(["generate", str(tiny_bart_run / "run"), "--input", str(tiny_bart_run / "prepared"),
                 "--output", str(tmp_path / "val.jsonl"), "--max-new-tokens", "6"]) == 0
    records = read(tmp_path / "val.jsonl")
    rows = datasets.load_from_disk(str(tiny_bart_run / "prepared" / "validation"))
    expected = [(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", answer)
                for question, answer in chats_of(rows)]
    assert len(expected) == 6  # 24 conversations, a quarter held out, one assistant turn each
    assert [(r["context"], r["reference"]) for r in records] == expected
    model, tokenizer = plain
    for record in records:
        ids = tokenizer(record["context"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                    do_sample=False)
        assert record["reply"] == tokenizer.decode(output[0, 1:]).split("<|im_end|>")[0].split("</s>")[0].strip()


def too_long(flag: str, asked: int) -> str:
    return (f"{flag} {asked} is more than this encoder-decoder can write: its decoder has 256 positions, so a reply"
            " has at most 256 tokens")


def test_a_reply_longer_than_the_decoder_is_refused_before_generating(run, tmp_path, capsys):
    chat = load_chat_model(str(run))
    prompt = encoder_prompts(chat)[:1]
    with pytest.raises(ConfigError) as refused:
        generate_replies(chat, prompt, Sampling(max_new_tokens=257), quiet=True)
    assert str(refused.value) == too_long("--max-new-tokens", 257)
    history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "At the end."}]
    conversation = Conversation(chat, messages=list(history))
    with pytest.raises(ConfigError) as refused:
        conversation.say(QUESTIONS[1], Sampling(max_new_tokens=257))
    assert str(refused.value) == too_long("--max-new-tokens", 257)
    assert conversation.messages == history  # nothing dropped to make room, the unanswered line taken back
    sampling = Sampling(max_new_tokens=12)
    assert command("/set max_new_tokens 300", conversation, sampling) == (
        too_long("max_new_tokens", 300) + "; max_new_tokens stays 12")
    assert sampling.max_new_tokens == 12
    assert command("/set max_new_tokens 256", conversation, sampling) == "max_new_tokens = 256"
    # The limit is exact: the decoder writes 256 tokens, and fails at the 257th.
    ids = torch.tensor(prompt)
    with torch.no_grad():
        assert chat.model.generate(input_ids=ids, max_new_tokens=256, min_new_tokens=256).shape == (1, 257)
        with pytest.raises(IndexError):
            chat.model.generate(input_ids=ids, max_new_tokens=257, min_new_tokens=257)
    write_questions(tmp_path / "in.jsonl")
    assert main(["generate", str(run), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "257"]) == 2
    assert capsys.readouterr().err == f"dialogtune generate: error: {too_long('--max-new-tokens', 257)}\n"
    assert main(["chat", str(run), "--play", "1", "--max-new-tokens", "400"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"dialogtune chat: error: {too_long('--max-new-tokens', 400)}\n")


@pytest.fixture(scope="module")
def stop_case(plain):
    """A seeded request and a stop string its reply contains (added to the server's stops)."""
    messages = [{"role": "user", "content": QUESTIONS[3]}]
    return messages, *seeded_stop(plain, messages, 16)


@pytest.fixture(scope="module")
def server(run, stop_case):
    chat = load_chat_model(str(run))
    chat.stop_strings = [*chat.stop_strings, stop_case[3]]
    url, handle, thread = start_server(create_app(chat, "bart", timeout=30))
    yield url
    handle.should_exit = True
    thread.join(timeout=10)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_serve_plain_and_streaming_equal_direct_generation(server, plain):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    raw, stopped = direct_reply(*plain, messages, 10, seed=1, **SEEDED)
    ask = {"model": "bart", "messages": messages, "max_tokens": 10, "temperature": 1.0, "top_p": 1.0, "seed": 1}
    answer = client(server).chat.completions.create(**ask)
    assert answer.choices[0].message.content == raw.strip()
    assert answer.choices[0].finish_reason == ("stop" if stopped else "length")
    chunks = list(client(server).chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == raw.strip()
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_serve_cuts_at_a_stop_string_and_never_streams_it(server, stop_case):
    messages, seed, before_stop, stop = stop_case
    ask = {"model": "bart", "messages": messages, "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "seed": seed}
    answer = client(server).chat.completions.create(**ask)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (before_stop.strip(), "stop")
    streamed = [c.choices[0].delta.content or "" for c in client(server).chat.completions.create(**ask, stream=True)]
    assert "".join(streamed).strip() == before_stop.strip() and stop not in "".join(streamed)


def test_serve_accepts_text_parts_and_names_other_parts(server):
    ask = {"model": "bart", "max_tokens": 6, "temperature": 0}
    whole = client(server).chat.completions.create(messages=[{"role": "user", "content": QUESTIONS[3]}], **ask)
    parts = [{"type": "text", "text": "Can you book a table for two people"}, {"type": "text", "text": " tonight, please?"}]
    joined = client(server).chat.completions.create(messages=[{"role": "user", "content": parts}], **ask)
    assert joined.choices[0].message.content == whole.choices[0].message.content
    assert joined.usage.prompt_tokens == whole.usage.prompt_tokens
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as refused:
        client(server).chat.completions.create(messages=[{"role": "user", "content": [parts[0], image]}], **ask)
    assert refused.value.status_code == 400
    assert refused.value.body["message"] == ("messages.0.content: part type(s) image_url not supported"
                                             " (only text parts are)")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_serve_refuses_a_reply_longer_than_the_decoder(server, field):
    response = httpx.post(f"{server}/v1/chat/completions", timeout=30, json={
        "model": "bart", "messages": [{"role": "user", "content": "Hi"}], field: 300})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": too_long(field, 300), "type": "invalid_request_error",
                                        "param": field, "code": None}


def test_serve_stream_is_server_sent_events(server):
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=30, json={
            "model": "bart", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_merged_export_loads_as_a_plain_seq2seq_model(run, plain, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    assert main(["export", str(run), "--merge", "-o", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    model, tokenizer = plain
    ids = tokenizer(QUESTIONS[0], return_tensors="pt")["input_ids"]
    start = torch.tensor([[merged.config.decoder_start_token_id, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids, decoder_input_ids=start).logits,
                              model(input_ids=ids, decoder_input_ids=start).logits, atol=1e-5)
    chat = load_chat_model(str(tmp_path / "merged"))
    assert chat.is_encoder_decoder and chat.template_name == "chatml"
    messages = [{"role": "user", "content": QUESTIONS[4]}]
    raw, _ = direct_reply(*plain, messages, 12, seed=2, **SEEDED)
    reply = Conversation(chat).say(QUESTIONS[4], Sampling(temperature=1, top_k=0, top_p=1, max_new_tokens=12, seed=2))
    assert reply.raw == raw


def test_a_plain_encoder_decoder_with_a_chat_template_chats(run):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    base = json.loads((run / "final" / "dialogtune.json").read_text())["base_model_path"]
    chat = load_chat_model(base)
    assert chat.is_encoder_decoder and (chat.template_name, chat.end_of_turn) == ("model", "<|im_end|>")
    reply = Conversation(chat).say(QUESTIONS[0], Sampling(temperature=1, top_k=0, top_p=1, max_new_tokens=8, seed=4))
    model = AutoModelForSeq2SeqLM.from_pretrained(base).eval()
    expected = direct_reply(model, AutoTokenizer.from_pretrained(base), [{"role": "user", "content": QUESTIONS[0]}],
                            8, seed=4, **SEEDED)
    assert (reply.raw, reply.stopped) == expected and reply.reused_tokens == 0


def test_dialogtune_train_ends_with_samples_equal_to_direct_generation(tiny_bart_dir, tmp_path, capsys):
    """`dialogtune train` on a YAML config: training, then the command layer's samples from the
    saved run (train_summary through generate), printed and in summary.json."""
    import datasets
    import yaml
    from test_train_run import write_chats
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from dialogtune.train_summary import SAMPLE_NEW_TOKENS

    config = {
        "data": {"path": str(write_chats(tmp_path / "chats.jsonl"))}, "task": {"as": "assistant"},
        "split": {"validation": 0.25, "seed": 0}, "model": {"name": str(tiny_bart_dir)},
        "template": {"name": "chatml"}, "max_length": 128, "pack": False, "output": str(tmp_path / "prepared"),
        "method": "full",  # learns enough in 24 steps to write words before its end of turn
        "train": {"max_steps": 24, "learning_rate": 0.01, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "warmup_steps": 0, "lr_scheduler_type": "constant", "report_to": []},
        "eval": {"every": None}, "run_dir": str(tmp_path / "run"), "samples": 2,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "job.yaml")]) == 0
    printed = capsys.readouterr().out

    final = tmp_path / "run" / "final"
    model = AutoModelForSeq2SeqLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    rows = datasets.load_from_disk(str(tmp_path / "prepared" / "validation"))
    expected = []
    for question, answer in chats_of(rows)[:2]:
        raw, _ = direct_reply(model, tokenizer, [{"role": "user", "content": question}], SAMPLE_NEW_TOKENS)
        expected.append({"context": question, "reply": raw.strip(), "reference": answer})
    assert all(sample["reply"] for sample in expected)  # words, not an empty reply
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples"] == expected and summary["steps"] == 24
    shown = [f"  user: {s['context']}\n  model: {s['reply']}\n  (reference: {s['reference']})" for s in expected]
    assert printed.endswith(f"run: {tmp_path / 'run'}   model: {final}   plot: {tmp_path / 'run' / 'loss.png'}\n"
                            + "\n".join(shown) + "\n")
