"""SummaryMemory: a plain model's conversation across sessions, its oldest sessions summarised when
the whole no longer fits the context."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dialogtune.dialogue import Dialogue, Turn
from dialogtune.errors import ConfigError, ModelError, RunError
from dialogtune.infer import load_chat_model
from dialogtune.memory.summary import FORMAT, ModelSummarizer, SummaryMemory, load_summarizer
from dialogtune.tasks.summarize import summarize

REPLY = 16  # tokens of room every fit below keeps for the reply


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    """The tiny random model with its ChatML template; tests shrink its context with `within`."""
    return load_chat_model(str(tiny_model_dir))


def within(chat, context: int):
    return dataclasses.replace(chat, context_length=context)


class RecordingSummarizer:
    """A deterministic summarizer: "summary N" for its Nth call, each request kept."""

    def __init__(self):
        self.requests: list[str] = []

    def __call__(self, request: str) -> str:
        self.requests.append(request)
        return f" summary {len(self.requests)} "


SESSIONS = [
    [("user", "My sister just had twins, a boy and a girl."), ("assistant", "Congratulations to her! Names?"),
     ("user", "Maya and Leo. They never sleep."), ("assistant", "Sleepless nights are normal at first.")],
    [("user", "I started baking bread this week."), ("assistant", "Lovely. Sourdough or yeast?"),
     ("user", "Sourdough, with a starter from a neighbour.")],
    [("user", "Any idea for the twins' first birthday?"), ("assistant", "A small party with family?")],
]


def long_memory() -> SummaryMemory:
    memory = SummaryMemory(model="tiny")
    for number, session in enumerate(SESSIONS):
        if number:
            assert memory.new_session()
        for role, content in session:
            memory.add(role, content, "Alice" if role == "user" else "Assistant")
    return memory


def tokens_of(chat, messages) -> int:
    return len(chat.tokenizer(chat.render(messages), add_special_tokens=False)["input_ids"])


def test_nothing_is_summarised_while_the_prompt_fits(chat):
    memory, summarizer = long_memory(), RecordingSummarizer()
    before = dataclasses.replace(memory, sessions=[list(s) for s in memory.sessions])
    made = memory.fit(within(chat, 512), "Be kind.", REPLY, summarizer)
    full = tokens_of(chat, [{"role": "system", "content": "Be kind."}, *before.messages()])
    assert (made.sessions_summarised, made.messages_dropped, made.prompt_tokens) == (0, 0, full)
    assert made.notes() == [] and summarizer.requests == [] and memory == before
    assert full + REPLY <= 512


def test_the_oldest_sessions_are_folded_into_a_summary_once_the_prompt_no_longer_fits(chat):
    memory, summarizer = long_memory(), RecordingSummarizer()
    system = "Be kind."
    everything = memory.prompt_tokens(chat, system)
    # The context that just holds the last session under the second summary: two sessions must go.
    last_only = SummaryMemory("tiny", [memory.sessions[2]], "summary 2").prompt_tokens(chat, system)
    small = within(chat, last_only + REPLY)
    assert everything + REPLY > small.context_length
    made = memory.fit(small, system, REPLY, summarizer)

    assert (made.sessions_summarised, made.messages_dropped) == (2, 0)
    assert made.prompt_tokens == last_only and made.prompt_tokens + REPLY <= small.context_length
    first, second = summarizer.requests
    assert first == ("Summarize the following dialogue:\n"
                     "Alice: My sister just had twins, a boy and a girl.\n"
                     "Assistant: Congratulations to her! Names?\n"
                     "Alice: Maya and Leo. They never sleep.\n"
                     "Assistant: Sleepless nights are normal at first.")
    assert second == ("Summarize the following dialogue:\n"
                      "Earlier conversations, summarised: summary 1\n"  # what was summarised before carries on
                      "Alice: I started baking bread this week.\n"
                      "Assistant: Lovely. Sourdough or yeast?\n"
                      "Alice: Sourdough, with a starter from a neighbour.")
    # Exactly the user message the summarize task trains a summary model on.
    (example,) = summarize(Dialogue("x", [Turn(m["name"], m["content"]) for m in long_memory().sessions[0]],
                                    meta={"summary": "s"}))
    assert first == example.messages[0]["content"]

    assert memory.summary == "summary 2" and len(memory.sessions) == 1
    prompt = memory.prompt_messages(system)
    assert prompt[0] == {"role": "system", "content": "Be kind.\n\nEarlier conversations, summarised: summary 2"}
    assert [(m["role"], m["content"]) for m in prompt[1:]] == SESSIONS[2]  # the current session verbatim
    assert tokens_of(chat, prompt) == last_only
    assert made.notes() == ["(2 earlier session(s) replaced by a summary to make room)"]


def test_the_current_session_is_never_summarised(chat):
    memory, summarizer = long_memory(), RecordingSummarizer()
    memory.sessions = memory.sessions[2:]
    made = memory.fit(within(chat, memory.prompt_tokens(chat, None) + REPLY - 1), None, REPLY, summarizer)
    assert summarizer.requests == [] and made.sessions_summarised == 0 and memory.summary is None


def test_a_current_session_too_long_alone_loses_its_oldest_messages_counted(chat):
    memory, summarizer = SummaryMemory("tiny"), RecordingSummarizer()
    for role, content in SESSIONS[0] + SESSIONS[1][:1]:  # u a u a u
        memory.add(role, content)
    kept = memory.current[2:]  # the first exchange goes; the session still opens with the user
    room = within(chat, tokens_of(chat, kept) + REPLY)
    made = memory.fit(room, None, REPLY, summarizer)
    assert (made.sessions_summarised, made.messages_dropped) == (0, 2) and summarizer.requests == []
    assert memory.current == kept and made.prompt_tokens + REPLY <= room.context_length
    assert made.notes() == [("(2 oldest message(s) of this session dropped: the session alone no longer fits the"
                             " context)")]


def test_a_failing_summarizer_loses_no_session(chat):
    memory = long_memory()

    def fail(request: str) -> str:
        raise ModelError("the summary model is gone")

    with pytest.raises(ModelError, match="gone"):
        memory.fit(within(chat, 100), None, REPLY, fail)
    assert memory == long_memory()


def test_a_last_message_longer_than_the_context_is_an_error(chat):
    memory = SummaryMemory("tiny")
    memory.add("user", "word " * 200)
    with pytest.raises(ConfigError, match=r"the next prompt takes \d+ tokens .* over the 64-token context"):
        memory.fit(within(chat, 64), None, REPLY, RecordingSummarizer())


def test_a_new_session_is_never_empty():
    memory = SummaryMemory("tiny")
    assert not memory.new_session() and memory.sessions == [[]]
    memory.add("user", "Hi", "Alice")
    assert memory.new_session() and memory.sessions == [[{"role": "user", "content": "Hi", "name": "Alice"}], []]
    assert not memory.new_session() and len(memory.sessions) == 2
    assert memory.describe() == "2 sessions, 1 messages, no summary yet"


def test_save_and_load_round_trip(tmp_path):
    memory = long_memory()
    memory.summary = "Alice's sister had twins."
    path = tmp_path / "deep" / "alice.json"
    memory.save(path)
    assert SummaryMemory.load(path) == memory
    data = json.loads(path.read_text(encoding="utf-8"))
    assert (data["format"], data["model"], data["summary"]) == (FORMAT, "tiny", "Alice's sister had twins.")
    assert data["sessions"][2][1] == {"role": "assistant", "content": "A small party with family?", "name": "Assistant"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["alice.json"]  # written through a staged file


def test_files_of_another_kind_are_refused_with_what_to_do(tmp_path):
    import torch
    from safetensors.torch import save_file

    memory_run_file = tmp_path / "alice.mem"
    save_file({"memory": torch.zeros(1, 2)}, str(memory_run_file), metadata={"format": "dialogtune-memory/1"})
    with pytest.raises(RunError, match=rf"{memory_run_file}: a memory run's memory file \(dialogtune-memory/1\).*"
                                       "give --memory another file"):
        SummaryMemory.load(memory_run_file)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "dialogtune-summary', encoding="utf-8")
    with pytest.raises(RunError, match=rf"{broken}: not a dialogtune summary memory \(malformed JSON"):
        SummaryMemory.load(broken)
    saved_conversation = tmp_path / "conversation.json"  # what /save writes in a chat without --memory
    saved_conversation.write_text(json.dumps({"system": None, "messages": []}), encoding="utf-8")
    with pytest.raises(RunError, match=r"format None, expected 'dialogtune-summary-memory/1'"):
        SummaryMemory.load(saved_conversation)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({"format": FORMAT, "model": "m", "summary": None, "sessions": [[{"role": "user"}]]}))
    with pytest.raises(RunError, match=rf"{damaged}: a damaged summary memory"):
        SummaryMemory.load(damaged)


def test_a_summary_request_too_long_for_the_summary_model_loses_its_oldest_lines(chat):
    memory = long_memory()
    memory.summary = "Alice's sister had twins."
    request = memory.request_for(memory.sessions[0])
    summarizer = ModelSummarizer(within(chat, 140))
    summarizer.sampling.max_new_tokens = 8
    cut = summarizer.within_context(request)
    head = "Summarize the following dialogue:\nEarlier conversations, summarised: Alice's sister had twins.\n"
    assert cut.startswith(head) and request.endswith(cut[len(head):])  # the newest lines, whole
    assert summarizer.lines_cut == request.count("\n") - cut.count("\n") > 0
    assert tokens_of(chat, [{"role": "user", "content": cut}]) + 8 <= 140
    with pytest.raises(ModelError, match="cannot hold a summary request .* name a summary model with a longer"):
        ModelSummarizer(within(chat, 30)).within_context(request)


def test_the_summarizer_is_prompted_as_the_summarize_task(chat, tiny_job_dir):
    assert load_summarizer(None, chat).instruction == "Summarize the following dialogue:"
    assert load_summarizer(None, within(chat, 200)).sampling.max_new_tokens == 50  # a quarter of the context
    run = load_chat_model(str(tiny_job_dir / "run"))
    summary_run = dataclasses.replace(run, info=dataclasses.replace(run.info, task="summarize", instruction="TL;DR:"))
    summarizer = load_summarizer(None, summary_run)
    assert (summarizer.instruction, summarizer.sampling.temperature, summarizer.sampling.max_new_tokens) == (
        "TL;DR:", 0, 128)
    named = load_summarizer(str(tiny_job_dir / "run"), chat)  # a model the user names, loaded for the job
    assert named.chat is not chat and named.chat.name == str(tiny_job_dir / "run")


def test_a_real_model_writes_the_summary_and_the_prompt_fits(tiny_job_dir):
    chat = within(load_chat_model(str(tiny_job_dir / "run")), 256)
    summarizer = load_summarizer(None, chat)
    written: list[str] = []

    def summarize_and_keep(request: str) -> str:
        written.append(summarizer(request))
        return written[-1]

    memory = long_memory()
    made = memory.fit(chat, None, REPLY, summarize_and_keep)
    assert made.sessions_summarised == len(written) >= 1 and isinstance(memory.summary, str)
    assert memory.summary == written[-1].strip()
    assert made.prompt_tokens == memory.prompt_tokens(chat, None) and made.prompt_tokens + REPLY <= 256
    assert memory.current == long_memory().current
