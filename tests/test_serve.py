"""The OpenAI-compatible server, tested with the official `openai` client on loopback, and its
chat page in headless Chromium."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from dialogtune.infer import Conversation, Sampling, load_chat_model
from dialogtune.serve import create_app


@pytest.fixture(scope="module")
def tiny_run(tiny_job_dir):
    return tiny_job_dir / "run"


def start_server(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def server(tiny_run):
    chat = load_chat_model(str(tiny_run))
    chat.context_length = 256  # small, so an over-long prompt is easy to send
    url, handle, thread = start_server(create_app(chat, "tiny", queue_size=2, timeout=30))
    yield url
    handle.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def one_at_a_time_server(tiny_run):
    """As `server`, with --max-batch 1: today's one-reply-at-a-time path."""
    chat = load_chat_model(str(tiny_run))
    url, handle, thread = start_server(create_app(chat, "tiny", queue_size=2, timeout=30, max_batch=1))
    yield url
    handle.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def keyed_server(tiny_run):
    url, handle, thread = start_server(create_app(load_chat_model(str(tiny_run)), "tiny", api_key="s3cret"))
    yield url
    handle.should_exit = True
    thread.join(timeout=10)


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


HELLO = [{"role": "user", "content": "Where is the station?"}]


def test_openai_client_plain_and_streaming_agree(server):
    plain = client(server).chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=8)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > 5
    stream = client(server).chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=8,
                                                    stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.strip() == choice.message.content
    assert "<|im_end|>" not in streamed
    counted = list(client(server).chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=8,
                                                          stream=True, stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage == plain.usage  # the last chunk counts the tokens


def sse_chunks(response: httpx.Response) -> list[dict]:
    """A stream's JSON chunks, as sent (the openai client reads a missing `usage` as None too)."""
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def assert_usage_as_openai(url: str, body: dict) -> dict:
    """Streamed with include_usage: every chunk carries "usage": null but the last, which has no
    choices and the counts; without it no chunk has the key. Returns the usage."""
    counted = sse_chunks(httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        **body, "stream": True, "stream_options": {"include_usage": True}}))
    assert all("usage" in c and c["usage"] is None and c["choices"] for c in counted[:-1])
    assert counted[-1]["choices"] == [] and counted[-1]["usage"]["completion_tokens"] > 0
    uncounted = sse_chunks(httpx.post(f"{url}/v1/chat/completions", timeout=60, json={**body, "stream": True}))
    assert all("usage" not in c for c in uncounted) and len(uncounted) == len(counted) - 1
    refused = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                         json={**body, "stream_options": {"include_usage": True}})
    assert refused.status_code == 400 and refused.json()["error"] == {
        "message": "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        "type": "invalid_request_error", "param": "stream_options", "code": None}
    return counted[-1]["usage"]


def test_streamed_usage_is_null_on_every_chunk_but_the_last_as_openai(server):
    body = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 8}
    usage = assert_usage_as_openai(server, body)
    plain = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    assert usage == plain["usage"]


def test_a_developer_message_is_the_system_prompt(server):
    def prompt_tokens(messages: list[dict]) -> int:
        answer = client(server).chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=2)
        return answer.usage.prompt_tokens

    system = prompt_tokens([{"role": "system", "content": "Answer briefly."}, *HELLO])
    assert prompt_tokens([{"role": "developer", "content": "Answer briefly."}, *HELLO]) == system
    assert system > prompt_tokens(HELLO)  # the instruction is in the prompt, as a system message


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list()] == ["tiny"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "model": "tiny", "waiting": 0}


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "gpt-4", "messages": HELLO}, "unknown model 'gpt-4'; this server has 'tiny'"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": -5}, "max_tokens: Input should be greater than 0"),
    ({"model": "tiny", "messages": []}, "messages: List should have at least 1 item"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "station " * 400}]}, "exceeds the model's context"),
    ({"model": "tiny", "messages": [*HELLO, {"role": "assistant", "content": "ok"}]}, "last message must be"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {
        "type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "messages.0.content: part type(s) input_audio not supported (only text parts are)"),
])
def test_bad_requests_get_a_clear_400(server, body, message):
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_invalid_json_is_a_400(server):
    response = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_api_key_is_required_when_set(keyed_server):
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        client(keyed_server, "wrong").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert httpx.get(f"{keyed_server}/v1/models").status_code == 401
    reply = client(keyed_server, "s3cret").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert reply.choices[0].message.role == "assistant"


def test_one_at_a_time_twenty_concurrent_clients_are_answered_or_cleanly_refused(one_at_a_time_server):
    server = one_at_a_time_server

    def ask(i: int) -> int:
        response = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": [{"role": "user", "content": f"Question {i}?"}], "max_tokens": 6,
            "stream": i % 2 == 0})
        if response.status_code == 503:
            assert "server busy" in response.json()["error"]["message"]
        elif response.status_code == 200 and i % 2 == 0:
            assert response.text.rstrip().endswith("data: [DONE]")
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        codes = list(pool.map(ask, range(20)))
    assert set(codes) <= {200, 503} and codes.count(200) >= 3 and codes.count(503) >= 1
    assert httpx.get(f"{server}/health").json()["waiting"] == 0
    after = client(server).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert after.choices[0].message.role == "assistant"


@pytest.mark.parametrize("batched", [True, False])
def test_a_client_that_disconnects_stops_its_generation(server, one_at_a_time_server, monkeypatch, batched):
    from dialogtune.batching import Row

    written = []
    respond, finish = Conversation.respond, Row.finish

    def recorded(*args, **kwargs):
        written.append(respond(*args, **kwargs).new_tokens)
        return written[-1]

    def recorded_row(row):
        written.append(len(row.new))
        finish(row)

    monkeypatch.setattr(Conversation, "respond", recorded)
    monkeypatch.setattr(Row, "finish", recorded_row)
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 200, "temperature": 1.5, "seed": 3, "stream": True}
    url = server if batched else one_at_a_time_server
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        next(line for line in response.iter_lines() if '"content"' in line and '"content": ""' not in line)
    deadline = time.monotonic() + 30
    while not written:
        assert time.monotonic() < deadline, "the generation did not end"
        time.sleep(0.02)
    assert written[0] < 20  # not the 200 asked for


# --- continuous batching: concurrent chat requests generated together ---------------------------

@contextlib.contextmanager
def slow_server(tiny_model_dir, max_batch: int, queue_size: int, seconds_per_step: float = 0.02,
                memory_dir=None):
    """A server for the untrained tiny model (its greedy replies run to max_tokens), each forward
    pass made `seconds_per_step` slower, so replies are still running when the next request comes."""
    chat = load_chat_model(str(tiny_model_dir))
    forward = chat.model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds_per_step)
        return forward(*args, **kwargs)

    chat.model.forward = slow  # `generate` and the batching engine both call the model through it
    url, handle, thread = start_server(create_app(chat, "slow", queue_size=queue_size, timeout=60,
                                                  max_batch=max_batch, memory_dir=memory_dir))
    try:
        yield url
    finally:
        handle.should_exit = True
        thread.join(timeout=10)


def streamed_text(response) -> str:
    text = ""
    for line in response.iter_lines():
        if line.startswith("data: {"):
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text


def test_concurrent_requests_are_all_answered_each_as_if_alone(server, tiny_run):
    """Eight requests at once (the limit: 16 generated together, 2 waiting), streamed and not,
    sampled with seeds and greedy: each reply is the one the request gets by itself."""
    questions = [f"Question number {i}: where is the {'big ' * i}station?" for i in range(8)]
    options = [{"temperature": 1.0, "seed": i, "max_tokens": 4 + 2 * i} if i % 3 else
               {"temperature": 0, "max_tokens": 6} for i in range(8)]

    def ask(i: int, stream: bool) -> tuple[int, str]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": questions[i]}], **options[i],
                "stream": stream}
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as response:
            if stream:
                return response.status_code, streamed_text(response).strip()
            response.read()
            return response.status_code, response.json()["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(ask, [*range(8), *range(8)], [False] * 8 + [True] * 8))
    chat = load_chat_model(str(tiny_run))
    alone = []
    for question, option in zip(questions, options, strict=True):
        talk = Conversation(chat, reuse_cache=False, messages=[{"role": "user", "content": question}])
        sampling = Sampling(temperature=option["temperature"], top_k=0, top_p=1.0,
                            max_new_tokens=option["max_tokens"], seed=option.get("seed"))
        alone.append(talk.respond(sampling).text)
    assert [code for code, _ in answers] == [200] * 16
    assert [text for _, text in answers] == alone * 2  # streamed deltas join to the plain reply, too
    assert any(alone) and httpx.get(f"{server}/health").json()["waiting"] == 0


@pytest.mark.parametrize("max_batch", [1, 3])
def test_no_503_up_to_the_limit_and_a_503_beyond_it(tiny_model_dir, max_batch):
    """The limit is the batch plus the queue (`--max-batch 1`: one running, as before batching)."""
    limit = max_batch + 2
    body = {"model": "slow", "messages": HELLO, "temperature": 0, "max_tokens": 150, "stream": True}
    with slow_server(tiny_model_dir, max_batch=max_batch, queue_size=2) as url, contextlib.ExitStack() as held:
        for _ in range(limit):  # each admitted once its response starts; all still generating
            response = held.enter_context(httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60))
            assert response.status_code == 200
        refused = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == f"server busy: {limit} requests ahead; retry later"
        assert httpx.get(f"{url}/health").json()["waiting"] == limit
        held.close()  # the clients leave: their generations stop, their places free
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["waiting"]:
            assert time.monotonic() < deadline, "the places were not freed"
            time.sleep(0.05)
        answer = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_a_cancelled_stream_frees_its_slot_for_the_next_request(tiny_model_dir):
    body = {"model": "slow", "messages": HELLO, "temperature": 0, "max_tokens": 400, "stream": True}
    with slow_server(tiny_model_dir, max_batch=2, queue_size=0) as url, \
            httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as kept, \
            httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as left:
        assert (kept.status_code, left.status_code) == (200, 200)
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 503
        next(line for line in left.iter_lines() if '"content"' in line and '"content": ""' not in line)
        left.close()  # 400 tokens at 20 ms a step would hold the place for 8 s
        started = time.monotonic()
        while httpx.get(f"{url}/health").json()["waiting"] > 1:
            assert time.monotonic() - started < 3, "the cancelled stream kept its place"
            time.sleep(0.02)
        short = {**body, "stream": False, "max_tokens": 5}
        answer = httpx.post(f"{url}/v1/chat/completions", json=short, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
        assert not kept.is_stream_consumed  # the other stream is still being written


def test_with_summary_memories_every_request_is_answered_one_at_a_time(tiny_model_dir, tmp_path):
    """Summary memories run on the one generating thread: plain requests are not batched beside
    them, and the queue bounds both (`--max-batch 3 --queue 0`: one at a time, nothing waits)."""
    body = {"model": "slow", "messages": HELLO, "temperature": 0, "max_tokens": 150, "stream": True}
    with slow_server(tiny_model_dir, max_batch=3, queue_size=0, memory_dir=tmp_path / "memories") as url, \
            httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as running:
        assert running.status_code == 200
        for user in ({}, {"user": "alice"}):  # a plain request, a summary-memory one: neither joins it
            refused = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, **user}, timeout=60)
            assert refused.status_code == 503
            assert refused.json()["error"]["message"] == "server busy: 1 requests ahead; retry later"


def test_the_max_batch_option_reaches_the_server(tiny_run, monkeypatch):
    from dialogtune import cli, serve
    from dialogtune.errors import ConfigError

    served: list[dict] = []
    monkeypatch.setattr(serve, "run_serve", lambda model, **options: served.append({"model": model, **options}) or 0)
    assert cli.main(["serve", str(tiny_run), "--max-batch", "5", "--queue", "3"]) == 0
    assert cli.main(["serve", str(tiny_run)]) == 0
    assert [(s["model"], s["max_batch"], s["queue_size"]) for s in served] == [(str(tiny_run), 5, 3),
                                                                             (str(tiny_run), 16, 8)]
    monkeypatch.undo()  # the real one refuses a batch of none, before loading anything
    with pytest.raises(ConfigError, match=r"--max-batch must be at least 1 \(1: one reply at a time\), got 0"):
        serve.run_serve(**{**served[0], "max_batch": 0})


def test_chat_page_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")  # installed by `make test` (a set-up step, not the test's job)
    if executable is None:
        pytest.skip("Debian's chromium is not installed: `make test` installs it where apt-get and root are available")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        page.goto(server)
        assert page.title() == "dialogtune · tiny"
        page.fill("#input", "Where is the station?")
        page.click("#send")
        page.wait_for_function("document.querySelector('.msg.assistant') && "
                               "document.querySelector('.msg.assistant').textContent.length > 0", timeout=60_000)
        assert page.inner_text(".msg.user") == "Where is the station?"
        page.screenshot(path=str(tmp_path / "chat.png"))
        page.click("#reset")
        assert page.locator(".msg").count() == 0
        browser.close()


def test_the_room_for_a_reply_counts_the_runs_own_system_prompt(tiny_run):
    from dialogtune.serve import ApiError, CompletionRequest, check_request

    chat = load_chat_model(str(tiny_run))
    request = CompletionRequest.model_validate({"model": "tiny", "max_tokens": 8, "messages": HELLO})
    assert check_request(chat, "tiny", request) == 8
    chat.system_prompt = "station " * 400  # what generation will prepend: the prompt no longer fits
    with pytest.raises(ApiError, match=r"the prompt has \d+ tokens; with max_tokens=8 it exceeds the model's"
                                       r" context of 512"):
        check_request(chat, "tiny", request)


# --- function calling: an understand run answers `tools` requests with `tool_calls` ------------

BOOK = [{"role": "user", "content": "Book a table for two at Sushi Ran in San Francisco at 7 pm."}]
WEATHER = "Weather_1__GetWeather"


@pytest.fixture(scope="module")
def understander(tiny_understand_run):
    from dialogtune.understand import load_understander

    return load_understander(str(tiny_understand_run / "run"))


@pytest.fixture(scope="module")
def tool_server(understander):
    url, handle, thread = start_server(create_app(understander, "tiny-understand", queue_size=1, timeout=60))
    yield url
    handle.should_exit = True
    thread.join(timeout=10)


def sgd_tools(understander, *names: str) -> list[dict]:
    """The run's own functions as OpenAI tools (all, or those named)."""
    from dialogtune.retrieval.schemas import tools_json

    return tools_json([f for f in understander.prompts.index.functions if not names or f.name in names])


def ask(url: str, messages: list[dict], **options):
    return client(url).chat.completions.create(model="tiny-understand", messages=messages, **options)


def test_a_required_tool_call_is_parsed_by_the_openai_client(tool_server, understander):
    tools = sgd_tools(understander)
    reply = ask(tool_server, BOOK, tools=tools, tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and len(choice.message.tool_calls) == 1
    assert call.function.name in {t["function"]["name"] for t in tools}
    arguments = json.loads(call.function.arguments)
    assert set(arguments) <= {p.name for p in understander.prompts.index.by_name[call.function.name].parameters}
    assert all(isinstance(value, str) for value in arguments.values())  # SGD's parameters are strings
    usage = reply.usage
    assert usage.prompt_tokens > 10 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("choice", ["required", "auto", {"type": "function", "function": {"name": WEATHER}}])
def test_a_streamed_answer_reassembles_to_the_plain_one(tool_server, understander, choice):
    request = {"model": "tiny-understand", "messages": BOOK, "tools": sgd_tools(understander), "tool_choice": choice}
    plain = client(tool_server).chat.completions.create(**request).choices[0]
    with client(tool_server).chat.completions.stream(**request) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == plain.finish_reason
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and chunks[-1].choices[0].finish_reason == plain.finish_reason
    if plain.message.tool_calls:
        assert plain.finish_reason == "tool_calls"
        call, again = plain.message.tool_calls[0].function, streamed.message.tool_calls[0].function
        assert (again.name, json.loads(again.arguments)) == (call.name, json.loads(call.arguments))
        assert again.arguments == call.arguments
        assert first.tool_calls[0].id.startswith("call_") and first.tool_calls[0].function.name == call.name
    else:  # `auto` may answer none: a message without a call
        assert plain.finish_reason == "stop" and not streamed.message.tool_calls
        assert streamed.message.content == plain.message.content == ""
    raw = httpx.post(f"{tool_server}/v1/chat/completions", json={**request, "stream": True}, timeout=60)
    assert raw.status_code == 200 and raw.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("name", ["Restaurants_1__ReserveRestaurant", WEATHER, "Music_1__PlaySong"])
def test_tool_choice_naming_a_function_calls_it(tool_server, understander, name):
    choice = ask(tool_server, BOOK, tools=sgd_tools(understander),
                 tool_choice={"type": "function", "function": {"name": name}}).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == name
    assert set(json.loads(choice.message.tool_calls[0].function.arguments)) <= {
        p.name for p in understander.prompts.index.by_name[name].parameters}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_none_never_calls(tool_server, understander, stream):
    request = {"model": "tiny-understand", "messages": BOOK, "tools": sgd_tools(understander), "tool_choice": "none"}
    if stream:
        with client(tool_server).chat.completions.stream(**request) as events:
            choice = events.get_final_completion().choices[0]
    else:
        choice = client(tool_server).chat.completions.create(**request).choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls and choice.message.content == ""


def test_a_single_tool_offered_is_the_only_one_ever_called(tool_server, understander):
    tools = sgd_tools(understander, WEATHER)
    for text in ["Book a table for two at Sushi Ran.", "Play Shape of You.", "Will it rain in Paris tomorrow?",
                 "I need a cab to the airport for three people."]:
        messages = [{"role": "user", "content": text}]
        auto = ask(tool_server, messages, tools=tools).choices[0].message.tool_calls
        assert auto is None or [c.function.name for c in auto] == [WEATHER]
        required = ask(tool_server, messages, tools=tools, tool_choice="required").choices[0].message.tool_calls
        assert [c.function.name for c in required] == [WEATHER]


def test_without_tools_the_runs_own_functions_are_offered(tool_server, understander):
    call = ask(tool_server, BOOK, tool_choice="required").choices[0].message.tool_calls[0]
    assert call.function.name in understander.prompts.index.by_name


def test_a_tool_the_run_never_saw_is_offered_by_its_description(tool_server, understander):
    stock = {"type": "function", "function": {
        "name": "get_stock_price", "description": "Get the current price of a company's stock.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["ticker"], "properties": {
            "ticker": {"type": "string", "description": "The stock's ticker symbol"},
            "exchange": {"type": "string", "enum": ["NYSE", "NASDAQ"], "description": "Where it trades"}}}}}
    tools = [*sgd_tools(understander, WEATHER), stock]
    messages = [{"role": "user", "content": "How much is an Apple share on NASDAQ right now?"}]
    required = ask(tool_server, messages, tools=tools, tool_choice="required").choices[0].message.tool_calls[0]
    assert required.function.name in (WEATHER, "get_stock_price")
    forced = ask(tool_server, messages, tools=tools,
                 tool_choice={"type": "function", "function": {"name": "get_stock_price"}}).choices[0]
    arguments = json.loads(forced.message.tool_calls[0].function.arguments)
    assert set(arguments) <= {"ticker", "exchange"}
    assert arguments.get("exchange", "NYSE") in ("NYSE", "NASDAQ", "dontcare")  # categorical: a valid value


def test_a_tool_generated_from_a_pydantic_model_is_accepted(tool_server):
    from pydantic import BaseModel

    class GetForecast(BaseModel):
        """Get the weather forecast for a city."""
        city: str
        days: int = 1

    tool = openai.pydantic_function_tool(GetForecast)  # strict, with titles and additionalProperties: false
    reply = ask(tool_server, [{"role": "user", "content": "Will it rain in Paris in the next 3 days?"}], tools=[tool],
                tool_choice="required")
    call = reply.choices[0].message.tool_calls[0].function
    assert call.name == "GetForecast" and set(json.loads(call.arguments)) <= {"city", "days"}


def test_an_agent_loop_with_tool_calls_and_results_is_understood(tool_server, understander):
    from dialogtune.understand import Conversation

    first = ask(tool_server, BOOK, tool_choice={"type": "function", "function": {
        "name": "Restaurants_1__ReserveRestaurant"}}).choices[0].message
    call = first.tool_calls[0]
    loop = [*BOOK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"status": "booked"}'}]
    # the agent has acted on the turn: `auto` answers no call, and the loop ends
    done = ask(tool_server, loop).choices[0]
    assert done.finish_reason == "stop" and not done.message.tool_calls
    later = [*loop, {"role": "assistant", "content": "Your table is booked."},
             {"role": "user", "content": "What will the weather be like there tomorrow?"}]
    answer = ask(tool_server, later, tool_choice="required").choices[0].message.tool_calls[0]
    # the same as understanding the conversation directly: the first turn as the call it got
    conversation = Conversation()
    understander.turn(conversation, BOOK[0]["content"], forced="Restaurants_1__ReserveRestaurant")
    conversation.turns.append(("SYSTEM", "Your table is booked."))
    direct = understander.turn(conversation, later[-1]["content"], required=True)
    assert (answer.function.name, json.loads(answer.function.arguments)) == (direct.function,
                                                                            direct.call.arguments)


def test_replay_is_cached_per_turn_and_answers_never_depend_on_the_cache(understander, monkeypatch):
    from dialogtune.serve_tools import Cancelled, ToolCaller, ToolCompletionRequest

    turns = []
    turn = understander.turn

    def counted(conversation, utterance, *args, **kwargs):
        turns.append(utterance)
        return turn(conversation, utterance, *args, **kwargs)

    monkeypatch.setattr(understander, "turn", counted)
    messages = [{"role": "system", "content": "You are a booking agent."},
                {"role": "user", "content": "Find me an Italian place in San Jose."},
                {"role": "assistant", "content": "There is Sushi Sam. Shall I book it?"},
                {"role": "user", "content": "Yes, for 4 people."},
                {"role": "assistant", "content": "Done. Anything else?"},
                {"role": "user", "content": "Get me a ride there."}]

    def answer(caller: ToolCaller, upto: int, choice: str = "auto", tools: list[dict] | None = None):
        request = ToolCompletionRequest.model_validate({"messages": messages[:upto], "tool_choice": choice,
                                                        "tools": tools or sgd_tools(understander)})
        return caller.answer(caller.plan(request))

    caller = ToolCaller(understander)
    answer(caller, 4)
    assert len(turns) == 2  # the earlier turn replayed, then the last one
    turns.clear()
    full = answer(caller, 6)
    assert turns == ["Get me a ride there."]  # both earlier turns came from the cache
    turns.clear()
    assert answer(ToolCaller(understander), 6) == full and len(turns) == 3  # an empty cache: the same answer
    forced = answer(caller, 6, "required")
    assert forced == answer(ToolCaller(understander), 6, "required")
    assert not caller.indexes  # the run's own functions as tools: its own index serves them
    gone = threading.Event()
    gone.set()  # the client went away while its request waited: nothing is computed
    with pytest.raises(Cancelled):
        caller.answer(caller.plan(ToolCompletionRequest.model_validate({"messages": messages})), gone)
    two = sgd_tools(understander, WEATHER, "RideSharing_2__GetRide")
    assert answer(caller, 6, tools=two).function in (None, WEATHER, "RideSharing_2__GetRide")
    assert len(caller.indexes) == 1


@pytest.mark.parametrize(("body", "message"), [
    ({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "strng"}}}}}]},
     "tools[0] function 'get_weather' parameter 'city': type 'strng' is not supported"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]: expected a str field 'name'"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0]: function name 'get weather' is not a valid tools name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {}, "required": ["city"]}}}]},
     "tools[0] function 'f': required parameter 'city' is not among the properties"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "cities": {"type": "array", "items": {"type": "string"}}}}}}]},
     "tools[0] function 'f' parameter 'cities': nested arrays are not supported"),
    ({"tools": [{"type": "code_interpreter"}]}, 'tools[0]: expected {"type": "function", "function": {...}}'),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools[1]: function name 'f' is given twice"),
    ({"tools": []}, "tools: give at least one tool"),
    ({"tool_choice": {"type": "function", "function": {"name": "book_flight"}}},
     "tool_choice: function 'book_flight' is not among the tools offered"),
    ({"tool_choice": "sometimes"}, 'tool_choice: expected "auto", "none", "required"'),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content: a user message needs content"),
    ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "{}"}]}, "no user message to understand"),
    ({"messages": [*BOOK, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": WEATHER, "arguments": "{}"}}]}]},
     "the assistant's tool calls await their results"),
    ({"messages": [*BOOK, {"role": "assistant", "content": "ok"}]}, "the last message must be from the user"),
    ({"model": "gpt-4"}, "unknown model 'gpt-4'; this server has 'tiny-understand'"),
])
def test_bad_tool_requests_get_a_400_naming_the_field(tool_server, body, message):
    response = httpx.post(f"{tool_server}/v1/chat/completions", json={"messages": BOOK, **body}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"]
    assert error["param"] == next(iter(body))


def test_the_openai_client_reports_a_bad_tool_schema(tool_server):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "when": {"type": "string", "format": "date-time"}}}}}]
    with pytest.raises(openai.BadRequestError, match="tools\\[0\\] function 'f' parameter 'when': JSON Schema keyword "
                                                     "'format' is not supported"):
        ask(tool_server, BOOK, tools=bad)


def test_an_understand_run_keeps_the_api_key_the_timeout_and_the_queue(understander, tool_server):
    url, handle, thread = start_server(create_app(understander, "tiny-understand", api_key="s3cret", timeout=1e-6))
    try:
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            client(url, "wrong").chat.completions.create(model="tiny-understand", messages=BOOK)
        slow = [*BOOK, {"role": "assistant", "content": "Which day?"}, {"role": "user", "content": "Tomorrow."}]
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": slow}, timeout=60,
                              headers={"Authorization": "Bearer s3cret"})
        assert response.status_code == 504 and "longer than the server's timeout" in response.json()["error"]["message"]
        with pytest.raises(openai.APIError, match="longer than the server's timeout"):
            list(client(url, "s3cret").chat.completions.create(model="tiny-understand", messages=slow, stream=True))
    finally:
        handle.should_exit = True
        thread.join(timeout=10)

    def request(i: int) -> int:  # each a new conversation: nothing is cached
        response = httpx.post(f"{tool_server}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": f"Find restaurants in city number {i}."}],
            "tool_choice": "required", "stream": i % 2 == 0})
        if response.status_code == 503:
            assert "server busy" in response.json()["error"]["message"]
        elif i % 2 == 0:
            assert response.text.rstrip().endswith("data: [DONE]") and '"finish_reason": "tool_calls"' in response.text
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(pool.map(request, range(12)))
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1
    assert httpx.get(f"{tool_server}/health").json()["waiting"] == 0


def test_a_tool_stream_counts_its_usage_as_openai(tool_server, understander):
    body = {"model": "tiny-understand", "messages": BOOK, "tools": sgd_tools(understander), "tool_choice": "required"}
    usage = assert_usage_as_openai(tool_server, body)
    assert usage == httpx.post(f"{tool_server}/v1/chat/completions", json=body, timeout=60).json()["usage"]


def test_serve_tells_an_understand_run_from_a_chat_run(tiny_understand_run, tiny_run):
    from dialogtune.errors import ConfigError
    from dialogtune.serve import is_understand_run, run_serve

    assert is_understand_run(str(tiny_understand_run / "run")) and not is_understand_run(str(tiny_run))
    assert not is_understand_run("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub name: a chat model
    with pytest.raises(ConfigError, match="--index is for understand runs"):
        run_serve(str(tiny_run), index=str(tiny_understand_run / "index"))


@pytest.mark.parametrize(("kind", "text", "value"), [
    ("integer", "4", 4), ("integer", "four", "four"), ("number", "2.5", 2.5), ("number", "3", 3),
    ("number", "nan", "nan"), ("boolean", "True", True), ("boolean", "false", False), ("boolean", "dontcare", "dontcare"),
    ("string", "7", "7"),
])
def test_answers_take_their_parameters_json_type_where_they_read_as_one(kind, text, value):
    from dialogtune.retrieval.schemas import Parameter
    from dialogtune.serve_tools import argument_pieces, typed_value

    typed = typed_value(Parameter("x", "", kind), text)
    assert typed == value and type(typed) is type(value)
    arguments = {"city": "São Paulo", "x": typed}
    assert "".join(argument_pieces(arguments)) == json.dumps(arguments, ensure_ascii=False)
    assert argument_pieces({}) == ["{}"]


# --- memory runs: one memory per `user`, kept on disk across requests and restarts ---------------


@pytest.fixture(scope="module")
def memory_run(memory_run_dir):
    from dialogtune.memory.conversation import load_memory_run

    return load_memory_run(memory_run_dir)


@contextlib.contextmanager
def memory_server(model, directory, model_id: str = "mem"):
    """A live server keeping per-user memories of `model` (a memory run, or a plain chat model's
    summary memories) in `directory`; yields its URL."""
    url, handle, thread = start_server(create_app(model, model_id, memory_dir=directory))
    try:
        yield url
    finally:
        handle.should_exit = True
        thread.join(timeout=10)


SAMPLED = {"model": "mem", "temperature": 1.0, "seed": 0, "max_tokens": 4}  # greedy replies of the tiny run are empty
ALICE = ["My bees made honey today.", "The lavender ones taste best.", "Shall I send you a jar?"]
BOB = ["My night bus broke down.", "The depot fixed it by dawn."]


def talk(url: str, user: str | None, lines: list[str], history: list | None = None) -> list:
    """Each line as the next user message of a growing conversation (as an OpenAI client sends it)."""
    messages = list(history or [])
    for line in lines:
        messages.append({"role": "user", "content": line})
        reply = client(url).chat.completions.create(messages=messages, **SAMPLED, **({"user": user} if user else {}))
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    return messages


def as_served(conversation, messages: list[dict]):
    """What the server does with `messages` (A speaks for the user, B replies), in process."""
    for message in messages:
        if message["role"] == "user":
            conversation.read("A", message["content"])
        else:
            torch.manual_seed(0)
            assert conversation.reply("B", do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                      max_new_tokens=4) == message["content"]
    return conversation


def test_each_user_keeps_their_own_memory_across_a_restart(memory_run, tmp_path):
    from dialogtune.memory.conversation import MemoryConversation
    from dialogtune.memory.users import UserMemories

    store = UserMemories(memory_run, tmp_path / "memories")
    with memory_server(memory_run, store.directory) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        alice, bob = pool.map(lambda who: talk(url, *who), [("alice", ALICE[:2]), ("bob", BOB)])
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(
        store.path_for(user).name for user in ("alice", "bob"))
    saved = {user: MemoryConversation.load(memory_run, store.path_for(user)) for user in ("alice", "bob")}
    for user, messages in (("alice", alice), ("bob", bob)):
        expected = as_served(MemoryConversation(memory_run), messages)  # alone, in process
        assert all(m["content"] for m in messages)
        assert (saved[user].turns_read, saved[user].session, saved[user].notes["messages"]) == (4, 1, 3)
        assert saved[user].turns == expected.turns
        assert torch.allclose(saved[user].memory, expected.memory, atol=1e-6)
    window = {user: memory_run.tokenizer.decode([i for t in saved[user].turns for i in t["text_ids"]])
              for user in saved}
    assert "lavender" in window["alice"] and "depot" not in window["alice"]
    assert "depot" in window["bob"] and "lavender" not in window["bob"]
    assert not torch.allclose(saved["alice"].memory, saved["bob"].memory)

    with memory_server(memory_run, store.directory) as url:  # a new server over the same directory
        alice = talk(url, "alice", ALICE[2:], history=alice)
        renewed = talk(url, "alice", ["Hello again!"])  # a new conversation: a new session, the memory kept
    after = MemoryConversation.load(memory_run, store.path_for("alice"))
    expected = as_served(saved["alice"], alice[4:])  # the stored memory, taken on in process
    expected.new_session()
    as_served(expected, renewed)
    assert (after.turns_read, after.session, after.notes["messages"]) == (8, 2, 1)
    assert after.turns == expected.turns and torch.allclose(after.memory, expected.memory, atol=1e-6)
    assert MemoryConversation.load(memory_run, store.path_for("bob")).turns_read == 4  # untouched


def test_a_request_without_user_gets_a_fresh_memory_and_leaves_no_file(memory_run, tmp_path):
    from dialogtune.memory.conversation import MemoryConversation

    with memory_server(memory_run, tmp_path / "memories") as url:
        messages = talk(url, None, BOB[:1])
        again = talk(url, None, BOB[:1])
        streamed = list(client(url).chat.completions.create(messages=messages[:1], stream=True, **SAMPLED))
        with pytest.raises(openai.BadRequestError, match="max_tokens=100000 exceeds what this memory model"):
            client(url).chat.completions.create(model="mem", messages=HELLO, max_tokens=100_000)
        with pytest.raises(openai.BadRequestError, match="the last message must be from the user"):
            client(url).chat.completions.create(model="mem", messages=messages)
    assert not (tmp_path / "memories").exists()
    assert again == messages  # nothing carried from one request to the next
    as_served(MemoryConversation(memory_run), messages)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == messages[1]["content"]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_memory_file_another_run_wrote_is_refused_by_name(memory_run, tmp_path):
    from dialogtune.memory.conversation import MemoryConversation
    from dialogtune.memory.users import UserMemories

    store = UserMemories(memory_run, tmp_path)
    MemoryConversation(dataclasses.replace(memory_run, identity="0" * 24)).save(store.path_for("carol"))
    with memory_server(memory_run, tmp_path) as url:
        with pytest.raises(openai.InternalServerError, match="this memory was written by another model"):
            client(url).chat.completions.create(user="carol", messages=HELLO, **SAMPLED)
        assert talk(url, "dave", ALICE[:1])[1]["content"]  # other users are served


def test_memory_dir_is_refused_for_an_understand_run(tiny_understand_run, tmp_path):
    from dialogtune.errors import ConfigError
    from dialogtune.serve import run_serve

    # (a plain chat model keeps summary memories there: tests/test_serve_summary.py)
    with pytest.raises(ConfigError, match="--memory-dir is for chat models and memory runs; .* serve it without"):
        run_serve(str(tiny_understand_run / "run"), memory_dir=str(tmp_path))


def test_a_memory_stream_counts_its_usage_as_openai(memory_run, tmp_path):
    with memory_server(memory_run, tmp_path / "memories") as url:
        body = {**SAMPLED, "messages": [{"role": "user", "content": BOB[0]}]}
        usage = assert_usage_as_openai(url, body)
        assert usage == httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["usage"]
