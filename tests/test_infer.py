"""Inference that matches training: stop strings never shown, multi-byte characters streamed
whole, the key/value cache reused across turns without changing a single reply, history kept
within the context by tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from dialogtune.infer import Conversation, ReplyStreamer, Sampling, StopFilter, common_prefix, load_chat_model

GREEDY = Sampling(temperature=0, max_new_tokens=12)


def test_stop_filter_holds_back_partial_stop_strings_and_hides_the_stop():
    f = StopFilter(["<|im_end|>", "\nAlice:"])
    shown = [f.feed(p) for p in ["Hello", " there<|im", "_end|>ignored"]]
    assert shown == ["Hello", " there", ""] and f.stopped
    g = StopFilter(["\nAlice:"])
    assert g.feed("Fine.\nAl") == "Fine."  # "\nAl" might become "\nAlice:"
    assert g.feed("bert says hi") == "\nAlbert says hi"  # it did not
    assert g.feed("\nAlice: more") == "" and g.stopped
    assert g.flush() == ""


def test_reply_streamer_skips_the_prompt_and_keeps_multi_byte_characters_whole(byte_tokenizer):
    text = "Café ☕ at 東京, naïve 😀 done.<|im_end|>"
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) - len("<|im_end|>")  # the accents, kanji and emoji are split into byte tokens
    pieces: list[str] = []
    streamer = ReplyStreamer(byte_tokenizer, pieces.append)
    streamer.put(torch.tensor([[5, 6, 7]]))  # the prompt
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == text and len(pieces) > 4
    assert not any("\ufffd" in piece for piece in pieces)
    assert streamer.first_token_seconds > 0


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


@pytest.fixture(scope="module")
def tiny_run(tiny_job_dir):
    return tiny_job_dir / "run"


def test_a_run_loads_with_its_training_template_and_stops(tiny_run):
    chat = load_chat_model(str(tiny_run))
    assert chat.template_name == "chatml" and chat.end_of_turn == "<|im_end|>"
    assert chat.render([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
    assert "<|im_end|>" in chat.stops_for("User")


def test_cache_reuse_changes_no_reply_and_reads_only_new_tokens(tiny_run):
    chat = load_chat_model(str(tiny_run))
    cached, fresh = Conversation(chat), Conversation(chat, reuse_cache=False)
    lines = ["Where is the station?", "What time is it?", "Can you book a table?"]
    replies = [(cached.say(line, GREEDY), fresh.say(line, GREEDY)) for line in lines]
    for with_cache, without in replies:
        assert with_cache.text == without.text
    assert replies[0][0].reused_tokens == 0
    for turn in range(1, len(lines)):
        before, now = replies[turn - 1][0], replies[turn][0]
        # Everything the model read and wrote last turn comes from the cache (all but the last
        # generated token, which was never fed back); only the new turn is processed.
        assert now.reused_tokens == before.prompt_tokens + before.new_tokens - 1, turn
        assert replies[turn][1].reused_tokens == 0


def test_streamed_pieces_make_up_the_reply(tiny_run):
    chat = load_chat_model(str(tiny_run))
    pieces: list[str] = []
    reply = Conversation(chat).say("Where is the station?", Sampling(temperature=0, max_new_tokens=16),
                                   on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces).strip() == reply.text
    assert "<|im_end|>" not in "".join(pieces)


def test_history_is_trimmed_by_tokens_keeping_the_system_prompt(tiny_run):
    chat = load_chat_model(str(tiny_run))
    chat.context_length = 80
    conversation = Conversation(chat, system_prompt="Be brief.")
    for i in range(6):
        conversation.say(f"Question number {i} about the station?", GREEDY)
    conversation.messages.append({"role": "user", "content": "Question number 5 again?"})
    _, ids = conversation.prompt_ids(GREEDY.max_new_tokens)
    assert len(ids) + GREEDY.max_new_tokens <= 80
    text = chat.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.") and "Question number 5" in text
    assert "Question number 0" not in text and len(conversation.messages) < 13
    assert conversation.messages[0]["role"] == "user"


def test_a_set_cancel_event_ends_generation(tiny_run):
    chat = load_chat_model(str(tiny_run))
    cancel = threading.Event()
    conversation = Conversation(chat, messages=[{"role": "user", "content": "Where is the station?"}])
    reply = conversation.respond(Sampling(temperature=0, max_new_tokens=60), on_text=lambda _: cancel.set(),
                                 cancel=cancel)
    assert 0 < reply.new_tokens < 10
    assert reply.stopped is False  # cut short, not ended by the model: serve reports finish_reason "length"


def test_loading_a_local_run_draws_no_progress_bar_and_keeps_the_setting(tiny_run, capfd):
    from transformers.utils import logging as hf_logging

    load_chat_model(str(tiny_run))
    assert "Loading weights" not in capfd.readouterr().err  # only the conversation on screen
    assert hf_logging.is_progress_bar_enabled()  # hub downloads elsewhere keep their bars


def test_a_model_goes_to_the_gpu_unless_bitsandbytes_placed_it():
    from dialogtune.infer import device_for

    assert device_for(quantized=False, cuda_available=True) == "cuda"
    assert device_for(quantized=True, cuda_available=True) is None  # bitsandbytes put it on the GPU
    assert device_for(quantized=False, cuda_available=False) is None


def test_four_bit_loading_quantizes_as_qlora_training_did():
    from dialogtune.infer import quantization_options

    assert quantization_options(load_in_8bit=False, load_in_4bit=True) == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16}
    assert quantization_options(load_in_8bit=True, load_in_4bit=False) == {"load_in_8bit": True}


def test_a_memory_run_is_not_loaded_as_a_plain_model(memory_run_dir):
    from dialogtune.errors import ModelError
    from dialogtune.infer import load_chat_model

    with pytest.raises(ModelError, match=r"is a memory run \(task: memory\).*--memory FILE"):
        load_chat_model(str(memory_run_dir))
