"""Inference that matches training: load a run (or any model), render prompts with the exact
template, roles and stop strings recorded in final/dialogtune.json, and generate replies.

Decoder-only models read the rendered prompt and continue it. Encoder-decoder models (BART,
T5) read the same rendered prompt with the encoder, up to and including the assistant's header,
and the decoder writes the reply: exactly the split Seq2SeqCollator trains on.

`Conversation` keeps the key/value cache of what a decoder-only model has already read, so each
turn of a chat only processes the new tokens (time to first token does not grow with the history).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from dialogtune.errors import ConfigError, ModelError, TemplateError
from dialogtune.models import load_tokenizer, quiet_peft, resolve
from dialogtune.records import RunInfo, find_run_info
from dialogtune.templates import detect_end_of_turn


@dataclass
class Sampling:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 128
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            kwargs: dict[str, Any] = {"do_sample": False}
        else:
            kwargs = {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return {**kwargs, "max_new_tokens": self.max_new_tokens}


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    template: str  # Jinja source, the one used in training
    template_name: str
    end_of_turn: str
    stop_strings: list[str]
    speakers_as: list[str]
    system_prompt: str | None
    context_length: int
    name: str
    location: str  # where the tokenizer (with the training template) and model were loaded from
    info: RunInfo | None = None  # the run's dialogtune.json; None for a plain model
    _criteria: dict = field(default_factory=dict)

    @property
    def assistant_name(self) -> str:
        return self.speakers_as[0] if self.speakers_as and self.speakers_as[0] not in ("*", "assistant") else "Assistant"

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for the next reply: the conversation plus the assistant's turn header."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True, assistant_name=self.assistant_name)

    def reply_room(self, prompt_tokens: int) -> int:
        """How many tokens a reply to a prompt this long may have. An encoder-decoder reads the prompt
        and writes the reply in separate position ranges, each as long as the context."""
        if self.is_encoder_decoder:
            return self.context_length if prompt_tokens <= self.context_length else 0
        return self.context_length - prompt_tokens

    def end_token_ids(self) -> set[int]:
        """The tokens that end a reply: the tokenizer's EOS and the model's generation EOS ids."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        configured = model.generation_config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured]
        return {i for i in [*ids, self.tokenizer.eos_token_id] if i is not None}

    def check_reply_length(self, max_new_tokens: int, flag: str = "--max-new-tokens") -> None:
        """Refuse a reply longer than an encoder-decoder's decoder has positions for (torch would
        fail with an IndexError at the first position past them). A decoder-only model's room
        depends on the prompt: see reply_room."""
        if self.is_encoder_decoder and max_new_tokens > self.context_length:
            raise ConfigError(f"{flag} {max_new_tokens} is more than this encoder-decoder can write: its decoder"
                              f" has {self.context_length} positions, so a reply has at most {self.context_length}"
                              " tokens")

    def reply_tokens(self, output: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The generated tokens of `generate`'s output: a decoder-only model's output repeats the
        (padded) prompt; an encoder-decoder's is the decoder's, which opens with its start token."""
        return output[:, 1:] if self.is_encoder_decoder else output[:, prompt_width:]

    def stops_for(self, user_name: str | None) -> list[str]:
        stops = list(self.stop_strings)
        if self.template_name == "transcript" and user_name:
            stops.append(f"\n{user_name}:")
        return [s for s in dict.fromkeys(stops) if s]

    def stopping_criteria(self, stops: list[str]):
        """Built once per set of stop strings: it scans the whole vocabulary."""
        from transformers import StopStringCriteria

        key = tuple(stops)
        if key not in self._criteria:
            self._criteria[key] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stops))])
        return self._criteria[key]


@dataclass
class Prompting:
    """How a model is prompted, read without loading its weights: the run's recorded template,
    roles and stop strings (or a plain model's own chat template) and the model's context length.
    Enough to prepare evaluation samples or check a prompt's room before any weights load."""

    name: str
    location: str  # the tokenizer (with the training template); the weights too, unless an adapter
    weights: str  # what from_pretrained loads: the base model under a LoRA adapter, else `location`
    adapter: bool
    tokenizer: Any
    info: RunInfo | None  # the run's dialogtune.json; None for a plain model
    end_of_turn: str
    context_length: int
    is_encoder_decoder: bool

    @property
    def speakers_as(self) -> list[str]:
        return self.info.speakers_as if self.info else ["assistant"]


def load_prompting(name: str) -> Prompting:
    """A run directory, its final/ or merged/ directory, or any causal or encoder-decoder LM."""
    from transformers import AutoConfig

    final = find_run_info(Path(name)) if Path(name).exists() else None
    info = RunInfo.load(final) if final else None
    if info is not None and info.memory:  # its adapter alone, without the memory, is another model
        raise ModelError(f"{name} is a memory run (task: memory): each turn is read with its memory, which"
                         " `generate` and `eval` do not keep. Talk to it with `dialogtune chat"
                         f" {name} --memory FILE` or `dialogtune serve {name}`; its validation perplexity per"
                         " session is in summary.json (and benchmarks/memory_msc.py compares it)")
    location = str(final) if final else resolve(name)
    tokenizer = load_tokenizer(location)
    if not tokenizer.chat_template:
        raise TemplateError(f"{name!r} has no chat template; train a run with dialogtune or pick a chat model")
    adapter = final is not None and (final / "adapter_config.json").exists()
    weights = info.base_model_path if adapter else location
    try:
        config = AutoConfig.from_pretrained(weights)
    except OSError as err:
        raise ModelError(f"cannot load a model from {weights!r}: {err}") from err
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    end_of_turn = info.end_of_turn if info else detect_end_of_turn(tokenizer, tokenizer.chat_template)
    return Prompting(name=name, location=location, weights=weights, adapter=adapter, tokenizer=tokenizer, info=info,
                     end_of_turn=end_of_turn, context_length=int(context),
                     is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)))


def load_chat_model(name: str | Prompting, *, load_in_8bit: bool = False, load_in_4bit: bool = False) -> ChatModel:
    """A run directory, its final/ or merged/ directory, or any causal or encoder-decoder LM (with
    its own chat template). A LoRA run loads its base model with the adapter on top (PEFT).
    Given a `Prompting` already read (eval reads it first), only the weights are loaded."""
    quantization = {}
    if load_in_8bit or load_in_4bit:
        if not torch.cuda.is_available():
            raise ModelError("--load-in-8bit/--load-in-4bit need a CUDA GPU (bitsandbytes); none is visible here")
        from transformers import BitsAndBytesConfig

        quantization["quantization_config"] = BitsAndBytesConfig(**quantization_options(load_in_8bit, load_in_4bit))
    prompting = name if isinstance(name, Prompting) else load_prompting(name)
    model = load_model(prompting.weights, prompting.is_encoder_decoder, **quantization)
    if prompting.adapter:
        from peft import PeftModel

        with quiet_peft():
            model = PeftModel.from_pretrained(model, prompting.location)
    model.eval()
    return chat_model(model, prompting)


def quantization_options(load_in_8bit: bool, load_in_4bit: bool) -> dict[str, Any]:
    """BitsAndBytesConfig's arguments. 4-bit is NF4 with double quantization and bf16 compute,
    as QLoRA training quantizes the base (dialogtune.train.model): an adapter is used on the
    base it was trained on."""
    if load_in_4bit:
        return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": torch.bfloat16}
    return {"load_in_8bit": load_in_8bit}


def device_for(quantized: bool, cuda_available: bool) -> str | None:
    """Where a loaded model is moved: the GPU when there is one, unless bitsandbytes quantized it
    (it places the weights itself); None leaves it where from_pretrained put it (the CPU)."""
    return "cuda" if cuda_available and not quantized else None


def load_model(location: str, encoder_decoder: bool, **kwargs):
    """The model at `location` with its generation head: seq2seq for encoder-decoders, else causal;
    on the GPU when one is visible."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    was_shown = hf_logging.is_progress_bar_enabled()
    if Path(location).is_dir():  # loading local weights takes a blink: its bar is noise before a chat
        hf_logging.disable_progress_bar()  # (a hub download keeps its bar)
    try:
        loader = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
        model = loader.from_pretrained(location, **kwargs)
    except OSError as err:
        raise ModelError(f"cannot load a model from {location!r}: {err}") from err
    finally:
        if was_shown:
            hf_logging.enable_progress_bar()
    device = device_for("quantization_config" in kwargs, torch.cuda.is_available())
    return model.to(device) if device else model


def chat_model(model, prompting: Prompting) -> ChatModel:
    """The one way to pair a loaded model with how it must be prompted."""
    info = prompting.info
    decode_by_sampling_only(model)
    return ChatModel(
        model=model, tokenizer=prompting.tokenizer, template=prompting.tokenizer.chat_template,
        template_name=info.template if info else "model", end_of_turn=prompting.end_of_turn,
        stop_strings=info.stop_strings if info else [prompting.end_of_turn], speakers_as=prompting.speakers_as,
        system_prompt=info.system_prompt if info else None, context_length=prompting.context_length,
        name=prompting.name, location=prompting.location, info=info,
    )


def decode_by_sampling_only(model) -> None:
    """Keep only the token ids of the model's generation defaults, so `Sampling` alone decides how
    replies are decoded. Checkpoints ship defaults for other jobs (bart-base: 4 beams, no repeated
    3-grams, a forced <s> first and </s> last), which training never saw and beams cannot stream."""
    from transformers import GenerationConfig

    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT adapter
    own = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id,
        decoder_start_token_id=own.decoder_start_token_id)


class StopFilter:
    """Turns a stream of text pieces into what may be shown: text that could still become a
    stop string is held back until it cannot, and the stop string itself is never shown."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)[0]], ""
            return out
        keep = max((len(s) - 1 for s in self.stops), default=0)
        # Hold back the longest tail that is a prefix of some stop string.
        hold = 0
        for size in range(min(keep, len(self.pending)), 0, -1):
            tail = self.pending[-size:]
            if any(s.startswith(tail) for s in self.stops):
                hold = size
                break
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class ReplyStreamer(TextStreamer):
    """The reply's text, handed to a callback as transformers' TextStreamer finalises it: the
    prompt skipped, special tokens kept (the stop filter must see the end-of-turn marker), and a
    half-decoded multi-byte character held until it is whole. Also times the first new token.

    TextStreamer re-decodes only the current line, so its cost per token stays flat: measured with
    SmolLM2's tokenizer, 11/18/13 us a token for 128/512/2048-token replies, against 21/62/207 us
    for re-decoding the whole reply at every token (the hand-written streamer it replaced)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.on_text = on_text
        self.started = time.perf_counter()
        self.first_token_seconds = 0.0

    def put(self, value) -> None:
        if not self.next_tokens_are_prompt and not self.first_token_seconds:
            self.first_token_seconds = time.perf_counter() - self.started
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


class StopWhenSet(StoppingCriteria):
    """Ends generation once an event is set (a streaming client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ReplyText:
    """A reply's text as its tokens come: streamed to `on_text` without stop strings, and the
    `Reply` once generation ends. One place for what `Conversation.respond` and the batching
    engine (dialogtune.batching) show, so both write the same reply from the same tokens."""

    def __init__(self, chat: ChatModel, stops: list[str], on_text: Callable[[str], None] | None = None):
        self.chat = chat
        self.filter = StopFilter(stops)
        self.shown: list[str] = []
        self.on_text = on_text
        self.streamer = ReplyStreamer(chat.tokenizer, self.show)

    def show(self, piece: str) -> None:
        visible = self.filter.feed(piece)
        if visible:
            self.shown.append(visible)
            if self.on_text:
                self.on_text(visible)

    def reply(self, new: list[int], prompt_tokens: int, reused_tokens: int) -> Reply:
        """Called after the streamer has ended: `new` are the tokens generated."""
        self.show(self.filter.flush())
        # Ended by itself: a stop string or an end token; not max_new_tokens, max_time or cancel.
        stopped = self.filter.stopped or (bool(new) and new[-1] in self.chat.end_token_ids())
        raw = "".join(self.shown)
        if self.chat.tokenizer.eos_token:
            raw = raw.split(self.chat.tokenizer.eos_token)[0]
        return Reply(raw.strip(), raw, stopped, len(new), prompt_tokens, reused_tokens,
                     self.streamer.first_token_seconds)


@dataclass
class Reply:
    text: str  # as shown (trimmed)
    raw: str  # exactly what the model wrote before the stop: kept in the history verbatim
    stopped: bool  # ended by itself (end of turn, EOS or a stop string), not by max_new_tokens
    new_tokens: int
    prompt_tokens: int
    reused_tokens: int  # prompt tokens served from the key/value cache
    first_token_seconds: float


@dataclass
class Conversation:
    """A chat with one model: messages, the user's name, and the key/value cache.

    The prompt text is always the template's rendering of the whole conversation. Its tokens are
    the tokens the model already read and wrote (the cache) plus the new text tokenized; the
    model's reply is kept in the history as exactly the text it generated, so the next prompt
    extends the last one and only the new turn is processed.

    An encoder-decoder keeps no cache between turns: its decoder's cache attends to the encoder's
    reading of the whole prompt, which changes with every turn, so each turn re-encodes the
    conversation (tokenized afresh, as in training) and the decoder starts anew."""

    chat: ChatModel
    system_prompt: str | None = None
    user_name: str = "User"
    messages: list[dict[str, str]] = field(default_factory=list)
    reuse_cache: bool = True
    _cache: Any = None
    _cached_ids: list[int] = field(default_factory=list)  # what the cache holds
    _known_ids: list[int] = field(default_factory=list)  # tokens of _known_text, as the model saw them
    _known_text: str = ""

    @property
    def keeps_cache(self) -> bool:
        return self.reuse_cache and not self.chat.is_encoder_decoder

    def reset(self) -> None:
        self.messages.clear()
        self._cache, self._cached_ids, self._known_ids, self._known_text = None, [], [], ""

    def chat_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages

    def _tokenize(self, text: str) -> list[int]:
        return self.chat.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, max_new_tokens: int) -> tuple[str, list[int]]:
        """The prompt, dropping the oldest turns (by tokens) until it and the reply fit."""
        self.chat.check_reply_length(max_new_tokens)  # no history could make room for it
        while True:
            text = self.chat.render(self.chat_messages())
            known = self.keeps_cache and self._known_text and text.startswith(self._known_text)
            ids = (self._known_ids + self._tokenize(text[len(self._known_text):])) if known else self._tokenize(text)
            if self.chat.reply_room(len(ids)) >= max_new_tokens or len(self.messages) <= 1:
                return text, ids
            # The oldest exchange goes (the history still opens with the user); the system prompt stays.
            del self.messages[0]
            while len(self.messages) > 1 and self.messages[0]["role"] == "assistant":
                del self.messages[0]

    def say(self, text: str, sampling: Sampling, on_text: Callable[[str], None] | None = None) -> Reply:
        self.messages.append({"role": "user", "content": text, "name": self.user_name})
        try:
            reply = self.respond(sampling, on_text)
        except BaseException:
            self.messages.pop()  # unanswered: the user may change a setting and say it again
            raise
        self.messages.append({"role": "assistant", "content": reply.raw, "name": self.chat.assistant_name})
        return reply

    def _cache_for(self, ids: list[int]) -> tuple[int, dict[str, Any]]:
        """How many prompt tokens the kept cache serves, and the cache argument for generate."""
        from transformers import DynamicCache

        if self.chat.is_encoder_decoder:
            return 0, {}  # generate builds the encoder-decoder cache for this turn
        if self.reuse_cache and self._cache is not None:
            reused = min(common_prefix(self._cached_ids, ids), len(ids) - 1)  # the last token must be fed
            self._cache.crop(reused - self._cache.get_seq_length())
            return reused, {"cache": self._cache}
        self._cache = DynamicCache(config=self.chat.model.config)
        return 0, {"cache": self._cache}

    def respond(self, sampling: Sampling, on_text: Callable[[str], None] | None = None,
                max_time: float | None = None, cancel: threading.Event | None = None) -> Reply:
        """The model's next reply, streamed to `on_text` without stop strings. Generation ends at a
        stop, after `max_time` seconds, or once `cancel` is set."""
        text, ids = self.prompt_ids(sampling.max_new_tokens)
        reused, cache = self._cache_for(ids)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        stops = self.chat.stops_for(self.user_name)
        text_of = ReplyText(self.chat, stops, on_text)
        criteria = self.chat.stopping_criteria(stops)
        if cancel is not None:
            criteria = StoppingCriteriaList([*criteria, StopWhenSet(cancel)])
        input_ids = torch.tensor([ids], device=self.chat.model.device)
        with torch.no_grad():
            output = self.chat.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=text_of.streamer,
                stopping_criteria=criteria, max_time=max_time,
                pad_token_id=self.chat.tokenizer.pad_token_id or self.chat.tokenizer.eos_token_id,
                **cache, **sampling.generate_kwargs())
        new = self.chat.reply_tokens(output, len(ids))[0].tolist()
        reply = text_of.reply(new, len(ids), reused)
        if self.keeps_cache:
            self._remember(text, ids, new, reply.raw)
        return reply

    def _remember(self, text: str, ids: list[int], new: list[int], raw: str) -> None:
        """What the cache holds, and the longest run of generated tokens whose text the history keeps
        verbatim: the next prompt's tokens start with them."""
        self._cached_ids = (ids + new)[: self._cache.get_seq_length()]
        decode = self.chat.tokenizer.decode
        keep = next((k for k in range(len(new), -1, -1) if raw.startswith(decode(new[:k]))), 0)
        self._known_ids = ids + new[:keep]
        self._known_text = text + decode(new[:keep])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
