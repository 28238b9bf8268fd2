"""Continuous batching: concurrent chat replies from one causal LM, decoded together.

    engine = BatchEngine(chat, max_batch=16)
    future = engine.submit(prompt_ids, Sampling(temperature=0, max_new_tokens=64), chat.stops_for(None), on_text=print)
    reply = future.result()  # a dialogtune.infer.Reply, as Conversation.respond returns it

One worker thread runs a decoding loop over a batch that shares one key/value cache. Between two
decoding steps, waiting requests join (each prompt is read alone, then its cache is merged into the
batch's, left-padded to a common width) and finished rows leave (by an end token, a stop string,
their max_new_tokens, their time limit, or their cancel event). Each row keeps its own sampling
settings and its own random generator, and its text goes through the same `ReplyText` as the
one-at-a-time path (dialogtune.infer), so a reply is written and cut exactly as it would be there.

What fails, fails alone: a prompt that cannot be read, or a row whose `on_text` raises, fails that
request only; only an error in the shared decoding step fails the rows decoded in it. Work per
step does not grow with the context: a row's stop check reads the last few tokens it needs.

What is guaranteed: a greedy reply is the one `Conversation.respond` gives the same prompt alone,
token for token, up to floating-point rounding (a batched matrix product may round differently
from a single row's; exact on tiny models in tests/test_batching.py, and for SmolLM2-135M in all
62 greedy replies benchmarks/serve_load.py compared with the one-at-a-time server); a sampled reply
with a seed draws from its own generator, seeded as `respond` seeds torch, so it is the same reply
whatever else is in the batch (and the one-at-a-time path's reply, up to the same rounding).

Why not transformers' own continuous batching (`generate_batch`, `init_continuous_batching`,
5.x)? Its manager decides greedy or sampling once for every request, draws all requests'
tokens from one global generator (no per-request seed), and ends a request only at EOS, not at
the run's stop strings; the server needs all three per request.

Models whose cache is not one plain key/value tensor per layer (sliding-window or hybrid caches,
encoder-decoders) are not batched: `batchable` says which can be.
"""

from __future__ import annotations

import contextlib
import inspect
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from dialogtune.infer import ChatModel, ReplyText, Sampling
from dialogtune.loss import core_model


def batchable(chat: ChatModel) -> bool:
    """Whether the engine can batch this model: a decoder-only model whose cache holds one plain
    (full-attention) key/value tensor per layer, so rows can be padded, merged and dropped."""
    if chat.is_encoder_decoder:
        return False
    cache = DynamicCache(config=chat.model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def warpers_for(sampling: Sampling) -> LogitsProcessorList:
    """The logits warpers `generate` applies for these settings, in its order (greedy: none)."""
    if sampling.repetition_penalty != 1.0 or sampling.no_repeat_ngram_size:
        raise ValueError("the batching engine supports temperature, top_k, top_p, max_new_tokens and seed;"
                         f" not repetition_penalty={sampling.repetition_penalty} or"
                         f" no_repeat_ngram_size={sampling.no_repeat_ngram_size}")
    warpers = LogitsProcessorList()
    if sampling.temperature <= 0:
        return warpers
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
    return warpers


@dataclass
class Row:
    """One request: its prompt, how it is decoded and stopped, and what it has written so far."""

    prompt: list[int]
    sampling: Sampling
    stops: list[str]
    text: ReplyText
    warpers: LogitsProcessorList
    generator: torch.Generator | None  # None: greedy
    cancel: threading.Event
    max_time: float | None
    future: Future
    new: list[int] = field(default_factory=list)
    deadline: float = float("inf")
    stop_criteria: Callable | None = None  # set when it joins: built once per set of stops, in seconds
    stop_window: int | None = None  # the last tokens the stop check reads (None: all of them)

    def tail(self, n: int | None) -> torch.Tensor:
        """The last `n` tokens of prompt and reply (all when None), as generate's ids [1, n]: built
        from the tail alone, so each step costs the same however long the context is."""
        if n is None:
            return torch.tensor([self.prompt + self.new])
        if len(self.new) >= n:
            return torch.tensor([self.new[len(self.new) - n:]])
        return torch.tensor([self.prompt[max(0, len(self.prompt) - n + len(self.new)):] + self.new])

    def pick(self, logits: torch.Tensor, last: torch.Tensor) -> int:
        """The next token from this row's float32 logits [1, vocab], as `generate` picks it; `last`:
        its last token [1, 1], on the logits' device."""
        if self.generator is None:
            return int(torch.argmax(logits, dim=-1))
        # The warpers warpers_for allows (temperature, top-k, top-p) never read the ids: the last one will do.
        probs = torch.nn.functional.softmax(self.warpers(last, logits), dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))

    def accept(self, token: int, end_ids: set[int]) -> bool:
        """Take the token; True once the row is finished (checked after each token, as `generate` does)."""
        self.new.append(token)
        self.text.streamer.put(torch.tensor([token]))
        if token in end_ids or len(self.new) >= self.sampling.max_new_tokens:
            return True
        if self.cancel.is_set() or self.future.cancelled() or time.monotonic() > self.deadline:
            return True
        return bool(self.stop_criteria(self.tail(self.stop_window), None).any())

    def finish(self) -> None:
        """End the stream and hand the reply to whoever waits (unless they gave up on it)."""
        self.text.streamer.end()
        reply = self.text.reply(self.new, len(self.prompt), 0)
        with contextlib.suppress(InvalidStateError):  # the future was cancelled: nobody waits
            self.future.set_result(reply)

    def fail(self, err: Exception) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(err)


def window_of(criteria) -> int | None:
    """How many of the last tokens a list of stopping criteria reads: a StopStringCriteria reads
    only its `maximum_token_len` last ones (one token per character of its longest stop string);
    None (all) when a criterion does not say."""
    windows = [getattr(criterion, "maximum_token_len", None) for criterion in criteria]
    return None if None in windows else max(windows, default=1)


class BatchEngine:
    """A decoding loop on one worker thread over at most `max_batch` rows."""

    def __init__(self, chat: ChatModel, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not batchable(chat):
            raise ValueError(f"{chat.name} cannot be batched (an encoder-decoder or a sliding-window cache)")
        self.chat = chat
        self.max_batch = max_batch
        model = core_model(chat.model)
        eos = model.generation_config.eos_token_id  # what `generate` stops at
        self.end_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else chat.end_token_ids()
        # As `generate`: only the last position's logits (the rest are never read).
        self.keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.pending: deque[Row] = deque()
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache width]: 0 over each row's left padding
        self.wake = threading.Condition()
        self.closed = False
        self.steps = 0  # batched decoding steps so far
        self.stepped_rows = 0  # rows decoded over those steps (over steps: the mean batch size)
        self.joined = 0  # prompts read so far
        self.join_steps = 0  # distinct decoding steps at which prompts were read
        self._last_join_step = -1
        self.thread = threading.Thread(target=self._loop, name="batch-decode", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], sampling: Sampling, stops: list[str],
               on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
               max_time: float | None = None) -> Future:
        """Queue a reply to `prompt` (token ids); the future holds its `Reply`. `on_text` is called on
        the worker thread with each piece of shown text; setting `cancel` ends the reply at the next
        step; `max_time` (seconds, counted from when its prompt is read) ends it as generate's does."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        warpers = warpers_for(sampling)
        generator = None
        if sampling.temperature > 0:
            # Unseeded: a seed of its own, never drawn from torch's global generator (which others
            # reseed, and which would make a reseeded process repeat its "random" replies).
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.chat.model.device).manual_seed(seed)
        row = Row(prompt=list(prompt), sampling=sampling, stops=stops, text=ReplyText(self.chat, stops, on_text),
                  warpers=warpers, generator=generator,
                  cancel=cancel or threading.Event(), max_time=max_time, future=Future())
        with self.wake:
            if self.closed:
                raise RuntimeError("the batching engine is closed")
            self.pending.append(row)
            self.wake.notify()
        return row.future

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=30)

    # --- the worker thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.closed and not self.pending and not self.rows:
                    self.wake.wait()
                if self.closed:
                    break
                joining = [self.pending.popleft() for _ in range(min(len(self.pending), self.max_batch - len(self.rows)))]
            with torch.no_grad():
                for row in joining:
                    try:
                        self._join(row)
                    except Exception as err:  # noqa: BLE001  its prompt, or its on_text: that request alone
                        row.fail(err)
                if self.rows:
                    self._step()
        for row in [*self.pending, *self.rows]:
            row.fail(RuntimeError("the batching engine was closed"))

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        extra = {"logits_to_keep": 1} if self.keep_last_logits else {}
        output = self.chat.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=cache, use_cache=True, **extra)
        return output.logits[:, -1].to(copy=True, dtype=torch.float32)

    def _join(self, row: Row) -> None:
        """Read the row's prompt alone (as `generate` does), pick its first token, merge its cache."""
        if row.cancel.is_set() or row.future.cancelled():  # its client left while it waited
            row.finish()
            return
        device = self.chat.model.device
        row.stop_criteria = self.chat.stopping_criteria(row.stops)  # on this thread: the first scans the vocabulary
        row.stop_window = window_of(row.stop_criteria)
        self.joined += 1
        if self._last_join_step != self.steps:
            self.join_steps, self._last_join_step = self.join_steps + 1, self.steps
        if row.max_time is not None:
            row.deadline = time.monotonic() + row.max_time
        ids = torch.tensor([row.prompt], device=device)
        row.text.streamer.put(ids)  # the prompt: skipped, starts the first-token clock
        cache = DynamicCache(config=self.chat.model.config)
        positions = torch.arange(len(row.prompt), device=device)[None]
        logits = self._forward(ids, torch.ones_like(ids), positions, cache)
        if row.accept(row.pick(logits, ids[:, -1:]), self.end_ids):
            row.finish()
            return
        self._merge(row, cache)

    def _merge(self, row: Row, cache: DynamicCache) -> None:
        """Add the row's cache to the batch's; the batch changes only once all of it is built."""
        mask = torch.ones((1, len(row.prompt)), dtype=torch.long, device=cache.layers[0].keys.device)
        if self.cache is None:
            self.cache, self.mask, self.rows = cache, mask, [row]
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def left_pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - tensor.shape[dim]
            if not missing:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        merged = DynamicCache(ddp_cache_data=[
            (torch.cat([left_pad(k, 2), left_pad(k_new, 2)]), torch.cat([left_pad(v, 2), left_pad(v_new, 2)]))
            for (k, v, _), (k_new, v_new, _) in zip(self.cache, cache, strict=True)])
        merged_mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)])
        self.cache, self.mask, self.rows = merged, merged_mask, [*self.rows, row]

    def _step(self) -> None:
        """One token for every row; finished rows (and rows whose own handling failed) leave the
        batch. A failure of the shared forward pass fails every row in it: their cache is lost."""
        try:
            device = self.mask.device
            last = torch.tensor([[row.new[-1]] for row in self.rows], device=device)
            positions = self.mask.sum(dim=1, keepdim=True)  # each row's next position: its real tokens so far
            mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
            logits = self._forward(last, mask, positions, self.cache)
        except Exception as err:  # noqa: BLE001  a failed step fails its rows, never the engine
            self._fail_all(err)
            return
        self.mask = mask
        self.steps += 1
        self.stepped_rows += len(self.rows)
        greedy = logits.argmax(dim=-1).tolist()  # every greedy row's token, read from the device at once
        keep = []
        for i, row in enumerate(self.rows):
            try:
                token = greedy[i] if row.generator is None else row.pick(logits[i : i + 1], last[i : i + 1])
                if row.accept(token, self.end_ids):
                    row.finish()
                else:
                    keep.append(i)
            except Exception as err:  # noqa: BLE001  its on_text (or its sampling): this row alone
                row.fail(err)
        if len(keep) < len(self.rows):
            try:
                self._keep_rows(keep)
            except Exception as err:  # noqa: BLE001
                self._fail_all(err, [self.rows[i] for i in keep])

    def _fail_all(self, err: Exception, rows: list[Row] | None = None) -> None:
        for row in self.rows if rows is None else rows:
            row.fail(err)
        self.rows, self.cache, self.mask = [], None, None

    def _keep_rows(self, keep: list[int]) -> None:
        """Only rows `keep` stay; the batch changes only once all of it is built."""
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[index]
        # Columns that are padding in every row left with the longest rows: drop them.
        unused = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())
        cache = DynamicCache(ddp_cache_data=[(k[index, :, unused:], v[index, :, unused:]) for k, v, _ in self.cache])
        self.rows, self.mask, self.cache = [self.rows[i] for i in keep], mask[:, unused:], cache
