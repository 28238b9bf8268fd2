"""`dialogtune serve RUN_DIR`: an OpenAI-compatible chat server, and a chat page at `/`.

    dialogtune serve runs/sgd_respond --port 8000 [--api-key SECRET]
    dialogtune serve runs/sgd_understand --port 8000   # an understand run answers with tool calls

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="SECRET")
    client.chat.completions.create(model="sgd_respond", messages=[{"role": "user", "content": "Hi"}])

Endpoints: POST /v1/chat/completions (with `stream: true` as server-sent events, kept alive by
pings; a client that disconnects stops its generation), GET /v1/models, GET /health, GET / (the
chat page). A message's `content` is a string or a list of text parts. Prompts are rendered
with the run's training template. Chat replies from a causal LM are generated together, up to
`--max-batch` at a time (dialogtune.batching: requests join and leave the batch between decoding
steps); up to `--queue` more wait, beyond that a request gets a 503. `--max-batch 1` generates one
reply at a time, as encoder-decoders always do. With `stream_options: {"include_usage": true}` every
chunk carries `"usage": null` and a last one the token counts, as OpenAI's streams do (all of them:
chat, tool calls, memories); `stream_options` without `stream: true` is a 400, as there. Binds to
127.0.0.1 unless told otherwise. A run trained on the understand task is served as a
function-calling model: requests carry OpenAI `tools` and `tool_choice` and are answered with
`tool_calls` (dialogtune.serve_tools). A memory run (`task: memory`) keeps one memory per
request `user`, on disk under `--memory-dir` (dialogtune.serve_memory: which of a request's
messages are read, and when a new session starts). A plain chat model served with `--memory-dir`
keeps one summary memory per request `user` there (dialogtune.serve_summary). Function calling,
memory runs and summary memories answer one request at a time; with summary memories on, so does
every request (a batch beside them would share the model, its stop-string state and torch's
generator across two threads, and the queue would no longer bound theirs).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Literal

# At module level: FastAPI reads the handlers' annotations (`request: Request`) from here.
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse

from dialogtune.batching import BatchEngine, batchable
from dialogtune.errors import ConfigError, DialogtuneError
from dialogtune.infer import ChatModel, Conversation, Sampling
from dialogtune.memory.conversation import MemoryRun
from dialogtune.serve_memory import MemoryReplier, default_memory_dir, reply_room
from dialogtune.serve_summary import SummaryReplier
from dialogtune.serve_tools import (
    Cancelled,
    OpenAIMessage,
    ToolCaller,
    ToolCompletionRequest,
    ToolRequestError,
    message_of,
    stream_deltas,
)
from dialogtune.understand import Understander


class Message(OpenAIMessage):
    role: Literal["system", "user", "assistant"]
    content: str


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send more fields (n, logprobs, ...); they are ignored
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk carries the token counts (stream only)
    user: str | None = None  # a memory run (or a plain model served with --memory-dir) keeps one memory per user


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class Generator:
    """Generates chat replies in a continuous batch of up to `max_batch` (dialogtune.batching), or
    one at a time on a worker thread when `max_batch` is 1 or the model cannot be batched; the
    worker thread also runs what is never batched (tool calls, memories). Counts what waits."""

    def __init__(self, chat: ChatModel | None, queue_size: int, timeout: float, max_batch: int = 1):
        self.chat = chat
        self.queue_size = queue_size
        self.timeout = timeout
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.engine = BatchEngine(chat, max_batch) if chat is not None and max_batch > 1 and batchable(chat) else None
        self.slots = max_batch if self.engine else 1  # generated at once; `queue_size` more may wait
        self.waiting = 0
        self.lock = threading.Lock()

    def admit(self) -> None:
        with self.lock:
            if self.waiting >= self.queue_size + self.slots:
                raise ApiError(503, f"server busy: {self.waiting} requests ahead; retry later", "server_busy")
            self.waiting += 1

    def release(self) -> None:
        with self.lock:
            self.waiting -= 1

    def run(self, request: CompletionRequest, max_tokens: int, on_text=None,
            cancel: threading.Event | None = None) -> Any:
        conversation = conversation_of(self.chat, request)
        return conversation.respond(sampling_of(request, max_tokens), on_text, max_time=self.timeout, cancel=cancel)

    def start(self, request: CompletionRequest, max_tokens: int, on_text=None,
              cancel: threading.Event | None = None) -> Future:
        """Begin an admitted chat reply; the future holds its `Reply`, and its place is released
        when it ends (or is cancelled before it starts)."""
        try:
            if self.engine is None:
                future = self.executor.submit(self.run, request, max_tokens, on_text, cancel)
            else:  # the prompt as `respond` builds it, the oldest turns dropped until the reply fits
                conversation = conversation_of(self.chat, request)
                _, ids = conversation.prompt_ids(max_tokens)
                future = self.engine.submit(ids, sampling_of(request, max_tokens),
                                            self.chat.stops_for(conversation.user_name), on_text, cancel, self.timeout)
        except BaseException:
            self.release()
            raise
        future.add_done_callback(lambda _: self.release())
        return future


def counts(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def include_usage(stream: bool, options: Any) -> bool:
    """Whether a stream ends with a usage chunk (`stream_options: {"include_usage": true}`);
    `stream_options` without `stream: true` is refused, as OpenAI refuses it."""
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options")
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options: expected an object such as {{\"include_usage\": true}}, got {options!r}",
                       param="stream_options")
    return bool(options.get("include_usage"))


class Chunks:
    """A completion's stream chunks, as OpenAI writes them: with `include_usage`, every chunk
    carries `"usage": null` and a last chunk, without choices, the token counts."""

    def __init__(self, completion_id: str, created: int, model_id: str, usage: bool):
        self.head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id}
        self.usage = usage

    def delta(self, delta: dict, finish: str | None = None) -> str:
        tail = {"usage": None} if self.usage else {}
        return json.dumps({**self.head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **tail})

    def counted(self, prompt_tokens: int, completion_tokens: int) -> list[str]:
        """The usage chunk when it was asked for (else nothing)."""
        if not self.usage:
            return []
        return [json.dumps({**self.head, "choices": [], "usage": counts(prompt_tokens, completion_tokens)})]


def sampling_of(request: CompletionRequest, max_tokens: int) -> Sampling:
    return Sampling(temperature=request.temperature, top_k=0, top_p=request.top_p, max_new_tokens=max_tokens,
                    seed=request.seed)


def conversation_of(chat: ChatModel, request: CompletionRequest) -> Conversation:
    """The request as a conversation: its system messages joined (else the run's system prompt)."""
    system = "\n".join(m.content for m in request.messages if m.role == "system") or chat.system_prompt
    conversation = Conversation(chat, system_prompt=system, reuse_cache=False)
    conversation.messages.extend({"role": m.role, "content": m.content} for m in request.messages
                                 if m.role != "system")
    return conversation


DEFAULT_MAX_TOKENS = 256
PING_SECONDS = 15  # a comment line now and then keeps proxies from closing a stream that waits in the queue


def check_model(asked: str | None, model_id: str) -> None:
    if asked not in (None, model_id):
        raise ApiError(400, f"unknown model {asked!r}; this server has {model_id!r}", param="model")


def asked_of(request: CompletionRequest) -> tuple[int | None, str]:
    """The reply length a request asks for (None: unsaid) and the field it was given in."""
    if request.max_completion_tokens:
        return request.max_completion_tokens, "max_completion_tokens"
    return request.max_tokens, "max_tokens"


def asked_tokens(chat: ChatModel, request: CompletionRequest) -> tuple[int | None, str]:
    """The reply length the request asks for (None: unsaid) and the field it was given in,
    refused when the model cannot write that many tokens at all."""
    asked, flag = asked_of(request)
    if asked is not None:
        try:
            chat.check_reply_length(asked, flag)
        except ConfigError as err:
            raise ApiError(400, str(err), param=flag) from None
    return asked, flag


def check_request(chat: ChatModel, model_id: str, request: CompletionRequest) -> int:
    """Refuse what cannot be answered; returns the number of tokens the reply may have."""
    check_model(request.model, model_id)
    if request.messages[-1].role == "assistant":
        raise ApiError(400, "the last message must be from the user (or system)", param="messages")
    asked, _ = asked_tokens(chat, request)
    # Measured on the prompt generation will read (the run's system prompt included).
    prompt = chat.render(conversation_of(chat, request).chat_messages())
    length = len(chat.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    room = chat.reply_room(length)
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(400, f"the prompt has {length} tokens; with max_tokens={asked or 1} it exceeds the"
                            f" model's context of {chat.context_length}", param="messages")
    return asked or min(DEFAULT_MAX_TOKENS, room)


def check_memory_request(run: MemoryRun, model_id: str, request: CompletionRequest) -> int:
    """As check_request, for a memory run: the prompt is the memory and a fixed window, so only
    the reply's length can be too long."""
    check_model(request.model, model_id)
    if request.messages[-1].role != "user":
        raise ApiError(400, "the last message must be from the user", param="messages")
    asked, flag = asked_of(request)
    room = reply_room(run)
    if asked is not None and asked > room:
        raise ApiError(400, f"{flag}={asked} exceeds what this memory model can generate in one turn ({room})",
                       param=flag)
    return asked or min(DEFAULT_MAX_TOKENS, room)


def check_summary_request(chat: ChatModel, model_id: str, request: CompletionRequest) -> int:
    """As check_request, for a plain model keeping the user's summary memory: the prompt is the
    memory's, fitted to the context before the reply (a prompt that cannot fit is refused then)."""
    check_model(request.model, model_id)
    if request.messages[-1].role != "user":
        raise ApiError(400, "the last message must be from the user", param="messages")
    asked, flag = asked_tokens(chat, request)
    room = chat.reply_room(0)
    if asked is not None and asked >= room:
        raise ApiError(400, f"{flag}={asked} leaves no room for a prompt in the model's context of"
                            f" {chat.context_length}", param=flag)
    return asked or min(DEFAULT_MAX_TOKENS, room // 2)


def validated(kind: type[BaseModel], data: Any) -> Any:
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        said = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
        raise ApiError(400, f"{where}: {said}", param=where) from None


def create_app(model: ChatModel | Understander | MemoryRun, model_id: str, api_key: str | None = None,
               queue_size: int = 8, timeout: float = 120.0, memory_dir: Path | None = None, max_batch: int = 16):
    """`model`: a chat model, an understand run answering with tool calls, or a memory run
    keeping each user's memory in `memory_dir` (default RUN/memories). A chat model given a
    `memory_dir` keeps each user's summary memory there (dialogtune.serve_summary). A chat
    model's replies are batched, up to `max_batch` at a time (1: one at a time)."""
    app = FastAPI(title="dialogtune", docs_url=None, redoc_url=None)
    caller = ToolCaller(model) if isinstance(model, Understander) else None
    memory = MemoryReplier(model, memory_dir or default_memory_dir(model)) if isinstance(model, MemoryRun) else None
    chat = model.chat if isinstance(model, Understander) else None if memory else model
    summaries = SummaryReplier(chat, memory_dir) if memory_dir is not None and caller is None and memory is None else None
    # Tool calls, memories and summary memories run on the generator's one thread; a batch beside
    # them would run the same model on a second thread: with any of them, one reply at a time.
    batched = caller is None and memory is None and summaries is None
    generator = Generator(chat, queue_size, timeout, max_batch if batched else 1)
    page = resources.files("dialogtune.web").joinpath("index.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception):  # one bad request never takes the server down
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}: {err}", "server_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page.replace("{{MODEL}}", model_id).replace("{{NEEDS_KEY}}", "true" if api_key else "false")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "waiting": generator.waiting}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "dialogtune"}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        authorize(request)
        try:
            data = await request.json()
        except ValueError as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None
        if caller is not None:
            return await tool_completion(validated(ToolCompletionRequest, data))
        body = validated(CompletionRequest, data)
        usage = include_usage(body.stream, body.stream_options)  # refused before anything is generated
        if memory is not None:
            return await memory_completion(body)
        if summaries is not None and body.user:
            return await summary_completion(body)
        max_tokens = check_request(chat, model_id, body)
        generator.admit()
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        client_gone = threading.Event()
        if not body.stream:
            try:  # cancelled (the server shutting down): a waiting reply is dropped, a running one stops
                reply = await asyncio.wrap_future(generator.start(body, max_tokens, cancel=client_gone))
            finally:
                client_gone.set()
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                 "finish_reason": "stop" if reply.stopped else "length"}],
                    "usage": counts(reply.prompt_tokens, reply.new_tokens)}

        pieces: asyncio.Queue = asyncio.Queue()
        chunks = Chunks(completion_id, created, model_id, usage)

        def ended(future: Future) -> None:  # the reply, or its error: reported in the stream, never raised
            loop.call_soon_threadsafe(pieces.put_nowait, future.exception() or future.result())

        generator.start(body, max_tokens, lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text),
                        cancel=client_gone).add_done_callback(ended)

        async def events():
            try:
                yield chunks.delta({"role": "assistant", "content": ""})
                first = True
                while True:
                    item = await pieces.get()
                    if isinstance(item, str):
                        text = item.lstrip() if first else item
                        if text:
                            first = False
                            yield chunks.delta({"content": text})
                    elif isinstance(item, Exception):
                        yield json.dumps(ApiError(500, str(item), "server_error").body())
                        break
                    else:
                        yield chunks.delta({}, "stop" if item.stopped else "length")
                        for counted in chunks.counted(item.prompt_tokens, item.new_tokens):
                            yield counted
                        break
                yield "[DONE]"
            finally:  # also when sse-starlette cancels this on a disconnect: the reply is no longer wanted
                client_gone.set()

        return EventSourceResponse(events(), ping=PING_SECONDS)

    async def memory_completion(body: CompletionRequest):
        max_tokens = check_memory_request(memory.run, model_id, body)
        sampling = sampling_of(body, max_tokens)  # its seed goes to `answer`: generate_kwargs leaves it out
        messages = [(m.role, m.content) for m in body.messages if m.role != "system"]
        return await remembered(body, lambda: memory.answer(
            messages, body.user, {**sampling.generate_kwargs(), "max_time": timeout}, seed=body.seed))

    async def summary_completion(body: CompletionRequest):
        max_tokens = check_summary_request(chat, model_id, body)
        sampling = sampling_of(body, max_tokens)
        messages = [(m.role, m.content) for m in body.messages if m.role != "system"]
        system = "\n".join(m.content for m in body.messages if m.role == "system") or chat.system_prompt
        return await remembered(body, lambda: summaries.answer(messages, body.user, system, sampling, timeout),
                                refused=ConfigError)

    async def remembered(body: CompletionRequest, answer, refused: type[Exception] | tuple = ()):
        """A reply from a user's memory (`answer()`, run on the generator's thread), as a completion."""
        generator.admit()
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def work():
            try:
                return answer()
            finally:
                generator.release()

        # shielded: a request cancelled while it waits must still run `work`, which releases its place
        try:
            reply = await asyncio.shield(asyncio.get_running_loop().run_in_executor(generator.executor, work))
        except refused as err:  # a prompt that cannot fit the context
            raise ApiError(400, str(err), param="messages") from None
        except DialogtuneError as err:  # a user's memory file this run cannot load (another run wrote it)
            raise ApiError(500, str(err), "server_error") from None
        if not body.stream:
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                 "finish_reason": reply.finish}],
                    "usage": counts(reply.prompt_tokens, reply.completion_tokens)}
        chunks = Chunks(completion_id, created, model_id, include_usage(body.stream, body.stream_options))

        async def events():  # generated whole: streamed as one piece
            for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": reply.text}, None),
                                  ({}, reply.finish)):
                yield chunks.delta(delta, finish)
            for counted in chunks.counted(reply.prompt_tokens, reply.completion_tokens):
                yield counted
            yield "[DONE]"

        return EventSourceResponse(events(), ping=PING_SECONDS)

    async def tool_completion(body: ToolCompletionRequest):
        check_model(body.model, model_id)
        usage = include_usage(body.stream, (body.model_extra or {}).get("stream_options"))
        try:
            plan = caller.plan(body)
        except ToolRequestError as err:
            raise ApiError(400, str(err), param=err.param) from None
        generator.admit()
        completion_id, call_id = f"chatcmpl-{uuid.uuid4().hex[:24]}", f"call_{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        client_gone = threading.Event()

        def work():
            try:
                return caller.answer(plan, client_gone, timeout)
            finally:
                generator.release()

        # shielded: a request cancelled while it waits must still run `work`, which releases its place
        answered = asyncio.shield(asyncio.get_running_loop().run_in_executor(generator.executor, work))
        if not body.stream:
            try:
                answer = await answered
            except TimeoutError as err:
                raise ApiError(504, str(err), "timeout") from None
            message, finish = message_of(answer, call_id)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": counts(answer.prompt_tokens, answer.completion_tokens)}
        chunks = Chunks(completion_id, created, model_id, usage)

        async def events():
            try:
                try:
                    answer = await answered
                except Cancelled:
                    return
                except Exception as err:  # noqa: BLE001  reported in the stream, never raised into the server
                    kind = "timeout" if isinstance(err, TimeoutError) else "server_error"
                    yield json.dumps(ApiError(504 if kind == "timeout" else 500, str(err), kind).body())
                else:
                    for delta, finish in stream_deltas(answer, call_id):
                        yield chunks.delta(delta, finish)
                    for counted in chunks.counted(answer.prompt_tokens, answer.completion_tokens):
                        yield counted
                yield "[DONE]"
            finally:  # also when sse-starlette cancels this on a disconnect: the answer is no longer wanted
                client_gone.set()

        return EventSourceResponse(events(), ping=PING_SECONDS)

    return app


def is_understand_run(model: str) -> bool:
    from dialogtune.records import RunInfo, find_run_info

    final = find_run_info(Path(model)) if Path(model).exists() else None
    return final is not None and RunInfo.load(final).understand is not None


def run_serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              model_id: str | None = None, queue_size: int = 8, timeout: float = 120.0, index: str | None = None,
              memory_dir: str | None = None, max_batch: int = 16) -> int:
    """`index`: an understand run's retrieval index (default: the one it was trained with);
    `memory_dir`: where a memory run keeps its users' memories (default RUN/memories), or a plain
    chat model its users' summary memories (only when given)."""
    import uvicorn

    from dialogtune.infer import load_chat_model
    from dialogtune.memory.conversation import is_memory_run, load_memory_run
    from dialogtune.understand import load_understander

    if max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1 (1: one reply at a time), got {max_batch}")
    understands, remembers = is_understand_run(model), is_memory_run(model)
    if index is not None and not understands:
        raise ConfigError(f"--index is for understand runs; {model} is not one")
    if memory_dir is not None and understands:
        raise ConfigError(f"--memory-dir is for chat models and memory runs; {model} is an understand run (its"
                          " conversation is the request's): serve it without --memory-dir")
    if understands:
        loaded = load_understander(model, index)
    else:
        loaded = load_memory_run(model) if remembers else load_chat_model(model)
    model_id = model_id or Path(model.rstrip("/")).name
    directory = Path(memory_dir) if memory_dir else default_memory_dir(loaded) if remembers else None
    app = create_app(loaded, model_id, api_key=api_key, queue_size=queue_size, timeout=timeout, memory_dir=directory,
                     max_batch=max_batch)
    what = "function calling: tools in, tool_calls out" if understands else "chat page at /"
    if remembers:
        what = f"one memory per request `user`, kept in {directory}; chat page at /"
    elif directory is not None:
        what = f"one summary memory per request `user`, kept in {directory}; chat page at /"
    print(f"serving {model} as {model_id!r} on http://{host}:{port}  ({what}, OpenAI API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
