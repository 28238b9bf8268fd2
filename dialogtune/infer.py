"""Inference that matches training: load a run (or any model), render prompts with the exact
template, roles and stop strings recorded in final/dialogtune.json, and generate replies.

`Conversation` keeps the key/value cache of what the model has already read, so each turn of
a chat only processes the new tokens (time to first token does not grow with the history).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dialogtune.errors import ModelError, TemplateError
from dialogtune.models import load_tokenizer, resolve
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

    @classmethod
    def from_args(cls, args) -> Sampling:
        """From the sampling flags the chat, generate and eval commands share."""
        return cls(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                   max_new_tokens=args.max_new_tokens, seed=args.seed)

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

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for the next reply: the conversation plus the assistant's turn header."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True, assistant_name=self.assistant_name)

    def stops_for(self, user_name: str | None) -> list[str]:
        stops = list(self.stop_strings)
        if self.template_name == "transcript" and user_name:
            stops.append(f"\n{user_name}:")
        return [s for s in dict.fromkeys(stops) if s]

    def stopping_criteria(self, stops: list[str]):
        """Built once per set of stop strings: it scans the whole vocabulary."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        key = tuple(stops)
        if key not in self._criteria:
            self._criteria[key] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stops))])
        return self._criteria[key]


def load_chat_model(name: str, *, load_in_8bit: bool = False, load_in_4bit: bool = False) -> ChatModel:
    """A run directory, its final/ or merged/ directory, or any causal LM (its own chat template)."""
    from transformers import AutoModelForCausalLM

    quantization = {}
    if load_in_8bit or load_in_4bit:
        if not torch.cuda.is_available():
            raise ModelError("--load-in-8bit/--load-in-4bit need a CUDA GPU (bitsandbytes); none is visible here")
        from transformers import BitsAndBytesConfig

        quantization["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    final = find_run_info(Path(name)) if Path(name).exists() else None
    info = RunInfo.load(final) if final else None
    location = str(final) if final else resolve(name)
    tokenizer = load_tokenizer(location)
    if final and (final / "adapter_config.json").exists():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(info.base_model_path, **quantization)
        model = PeftModel.from_pretrained(base, location)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(location, **quantization)
        except OSError as err:
            raise ModelError(f"cannot load a model from {location!r}: {err}") from err
    model.eval()
    return chat_model(model, tokenizer, info, name=name, location=location)


def chat_model(model, tokenizer, info: RunInfo | None, *, name: str, location: str) -> ChatModel:
    """The one way to pair a loaded model with how it must be prompted: the run's recorded
    template, roles and stop strings, or for a plain model its own chat template."""
    template = tokenizer.chat_template
    if not template:
        raise TemplateError(f"{name!r} has no chat template; train a run with dialogtune or pick a chat model")
    end_of_turn = info.end_of_turn if info else detect_end_of_turn(tokenizer, template)
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    return ChatModel(
        model=model, tokenizer=tokenizer, template=template, template_name=info.template if info else "model",
        end_of_turn=end_of_turn, stop_strings=info.stop_strings if info else [end_of_turn],
        speakers_as=info.speakers_as if info else ["assistant"], system_prompt=info.system_prompt if info else None,
        context_length=int(context), name=name, location=location, info=info,
    )


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
    extends the last one and only the new turn is processed."""

    chat: ChatModel
    system_prompt: str | None = None
    user_name: str = "User"
    messages: list[dict[str, str]] = field(default_factory=list)
    reuse_cache: bool = True
    _cache: Any = None
    _cached_ids: list[int] = field(default_factory=list)  # what the cache holds
    _known_ids: list[int] = field(default_factory=list)  # tokens of _known_text, as the model saw them
    _known_text: str = ""

    def reset(self) -> None:
        self.messages.clear()
        self._cache, self._cached_ids, self._known_ids, self._known_text = None, [], [], ""

    def _chat_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages

    def _tokenize(self, text: str) -> list[int]:
        return self.chat.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, max_new_tokens: int) -> tuple[str, list[int]]:
        """The prompt, dropping the oldest turns (by tokens) until it and the reply fit."""
        while True:
            text = self.chat.render(self._chat_messages())
            known = self.reuse_cache and self._known_text and text.startswith(self._known_text)
            ids = (self._known_ids + self._tokenize(text[len(self._known_text):])) if known else self._tokenize(text)
            if len(ids) + max_new_tokens <= self.chat.context_length or len(self.messages) <= 1:
                return text, ids
            # The oldest exchange goes (the history still opens with the user); the system prompt stays.
            del self.messages[0]
            while len(self.messages) > 1 and self.messages[0]["role"] == "assistant":
                del self.messages[0]

    def say(self, text: str, sampling: Sampling, on_text: Callable[[str], None] | None = None) -> Reply:
        self.messages.append({"role": "user", "content": text, "name": self.user_name})
        reply = self.respond(sampling, on_text)
        self.messages.append({"role": "assistant", "content": reply.raw, "name": self.chat.assistant_name})
        return reply

    def respond(self, sampling: Sampling, on_text: Callable[[str], None] | None = None,
                max_time: float | None = None) -> Reply:
        import time

        from transformers import DynamicCache

        text, ids = self.prompt_ids(sampling.max_new_tokens)
        reused = 0
        if self.reuse_cache and self._cache is not None:
            reused = min(common_prefix(self._cached_ids, ids), len(ids) - 1)  # the last token must be fed
            self._cache.crop(reused - self._cache.get_seq_length())
        else:
            self._cache = DynamicCache(config=self.chat.model.config)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        stops = self.chat.stops_for(self.user_name)
        filter_ = StopFilter(stops)
        shown: list[str] = []
        started = time.perf_counter()
        first: list[float] = []

        def emit(piece: str) -> None:
            if not first:
                first.append(time.perf_counter() - started)
            visible = filter_.feed(piece)
            if visible:
                shown.append(visible)
                if on_text:
                    on_text(visible)

        streamer = _PieceStreamer(self.chat.tokenizer, emit)
        input_ids = torch.tensor([ids], device=self.chat.model.device)
        with torch.no_grad():
            output = self.chat.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=self._cache,
                streamer=streamer, stopping_criteria=self.chat.stopping_criteria(stops), max_time=max_time,
                pad_token_id=self.chat.tokenizer.pad_token_id or self.chat.tokenizer.eos_token_id,
                **sampling.generate_kwargs())
        tail = filter_.flush()
        if tail:
            shown.append(tail)
            if on_text:
                on_text(tail)
        new = output[0, len(ids):].tolist()
        self._cached_ids = (ids + new)[: self._cache.get_seq_length()]
        eos = self.chat.tokenizer.eos_token_id
        stopped = filter_.stopped or (bool(new) and new[-1] == eos) or len(new) < sampling.max_new_tokens
        raw = "".join(shown)
        if self.chat.tokenizer.eos_token:
            raw = raw.split(self.chat.tokenizer.eos_token)[0]
        # The longest run of generated tokens whose text the history keeps verbatim.
        decode = self.chat.tokenizer.decode
        keep = next((k for k in range(len(new), -1, -1) if raw.startswith(decode(new[:k]))), 0)
        self._known_ids = ids + new[:keep]
        self._known_text = text + decode(new[:keep])
        return Reply(raw.strip(), raw, stopped, len(new), len(ids), reused, first[0] if first else 0.0)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _PieceStreamer:
    """A transformers streamer that hands decoded text pieces to a callback as they arrive
    (the prompt is skipped). Decoding the whole reply each time keeps multi-byte characters whole."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.callback = callback
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.callback(text[self.printed :])
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if len(text) > self.printed:
            self.callback(text[self.printed :])
        self.printed = len(text)

