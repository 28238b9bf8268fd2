"""Check dialogtune's ids and labels against a slow, independent reference on real dialogues.

    .venv/bin/python benchmarks/check_labels_exact.py [--data ../shared/data] [--tokenizer smollm2-135m-instruct]

The sample: 910 dialogues (the first 300 of SGD dev, 300 of SAMSum validation, the 10 MSC
samples, the first 300 of PersonaChat validation), each made into examples the ways users make
them (see `examples_of`), with every shipped template and the tokenizer's own, at max_length
4096, 192 and 64; and the first 100 of SGD dev again as tool-calling conversations
(`task.tool_calls`), with the templates that write calls. For every piece dialogtune yields,
the reference shares none of its code:
- ids: `tokenizer.apply_chat_template` over the piece's messages;
- labels: each trained message found by rendering the conversation up to it with
  `apply_chat_template`, once as it is and once with the message emptied (the two renders differ
  exactly by its content), or, for a call without content, where the conversation before it
  rendered with the generation prompt ends; its span runs on through the template's end-of-turn
  marker, and a
  token is trained when its offsets overlap a span (the rule of transformers'
  `return_assistant_tokens_mask`); the first token never is;
- fitting: every piece within max_length, holding the system prompt, a contiguous run of the
  example's messages and the turn its first trained message answers; each trained message
  trained in exactly one piece or reported as too long;
- locating tokens by byte lengths against locating them by offsets: the same pieces, counts
  and rejects.
Prints a table, and exits 1 on any mismatch. tests/test_tokenize.py runs the same check on the
fixtures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import numpy as np
from transformers.utils.chat_template_utils import _compile_jinja_template

from dialogtune.dialogue import Dialogue
from dialogtune.readers import read_dialogues
from dialogtune.tasks import Example
from dialogtune.tasks.respond import ALL_SPEAKERS, respond
from dialogtune.tasks.summarize import summarize
from dialogtune.templates import MODEL_TEMPLATE, SHIPPED, ChatTemplate, renders_tool_calls, resolve_template
from dialogtune.tokenize import IGNORE_INDEX, ExampleEncoder, Tokenized, TokenizeStats

ROOT = Path(__file__).resolve().parents[1]
# name: (path under the data folder, format, how many dialogues)
SOURCES = {
    "sgd": ("sgd/dev", "sgd", 300),
    "samsum": ("samsum/validation.json", "rows", 300),
    "msc": ("msc/msc_dialog_samples.json", "msc", 10),
    "personachat": ("personachat/valid_both_original_no_cands.txt", "parlai", 300),
    "sgd_tools": ("sgd/dev", "sgd", 100),
}
TOOL_SOURCES = {"sgd_tools"}  # made into tool-calling conversations: only templates that write calls
MAX_LENGTHS = (4096, 192, 64)
SYSTEM_PROMPT = "You are taking part in a conversation."
_TOO_LONG = re.compile(r"trained turn (\d+) \(.*\) does not fit in max_length")
SHOWN = 5  # problems printed per table row


def examples_of(dialogue: Dialogue, tools: bool = False) -> list[Example]:
    """The shapes of real use: one speaker answered with the whole context (and a system prompt,
    with persona lines where there are any), every named speaker at once (consecutive turns by
    one speaker, narration as untrained user text), one speaker with 2 rounds of context, and
    the summary where there is one. Each example gets its own id, which its pieces keep. With
    `tools`: the answerer's calls, their results and replies, whole and with 2 rounds."""
    answerer = next((t.speaker for t in dialogue.turns[1:] if t.speaker), None)
    made = []
    if tools:
        made.append(("tools", respond(dialogue, {answerer}, None, SYSTEM_PROMPT, tool_calls=True)))
        rounds = respond(dialogue, {answerer}, 2, tool_calls=True)
        made.append(("tools_rounds2", rounds[:3] if isinstance(rounds, list) else rounds))
        answerer = None  # the other shapes are the plain sources' already
    if answerer is not None:
        made.append(("full", respond(dialogue, {answerer}, None, SYSTEM_PROMPT, persona=True)))
        rounds = respond(dialogue, {answerer}, 2)  # the first windows: short context, earlier turns of the answerer
        made.append(("rounds2", rounds[:3] if isinstance(rounds, list) else rounds))
    made.append(("everyone", respond(dialogue, {ALL_SPEAKERS})))
    if dialogue.meta.get("summary") and not tools:
        made.append(("summary", summarize(dialogue)))
    return [replace(example, dialogue_id=f"{dialogue.id}/{task}/{n}")
            for task, examples in made if isinstance(examples, list) for n, example in enumerate(examples)]


def read_sample(data: Path) -> dict[str, list[Dialogue]]:
    sample = {}
    for name, (path, fmt, count) in SOURCES.items():
        items = read_dialogues(data / path, fmt)
        sample[name] = list(islice((d for d in items if isinstance(d, Dialogue)), count))
    return sample


# -- the slow reference ---------------------------------------------------------------------
def reference(tokenizer, template: ChatTemplate, example: Example) -> tuple[list[int], list[int]]:
    """Ids and labels of an example as it is, from apply_chat_template and offsets alone."""
    chat = example.chat()
    # What apply_chat_template renders with, without its copying of the messages for every prefix.
    compiled = _compile_jinja_template(template.source)

    def render(messages: list[dict]) -> str:
        return compiled.render(messages=messages, add_generation_prompt=False, **tokenizer.special_tokens_map)

    encoding = tokenizer.apply_chat_template(chat, chat_template=template.source, tokenize=True, return_dict=True,
                                             tokenizer_kwargs={"return_offsets_mapping": True})
    ids = encoding["input_ids"]
    text = tokenizer.apply_chat_template(chat, chat_template=template.source, tokenize=False)
    spans = []
    for index, message in enumerate(example.messages):
        if not message["train"]:
            continue
        content = chat[index]["content"]
        through = render(chat[: index + 1])
        emptied = render(chat[:index] + [{**chat[index], "content": ""}])
        if not text.startswith(through):
            raise ValueError(f"the render up to message {index} is not where the whole render starts")
        if message.get("tool_calls") and not content:  # a call's text is the template's: after its prompt
            prompt = compiled.render(messages=chat[:index], add_generation_prompt=True, **tokenizer.special_tokens_map)
            if not through.startswith(prompt):
                raise ValueError(f"the prompt for call message {index} is not where its render starts")
            start = len(prompt)
        else:
            start = content_start(through, emptied, content)
        marker = text.find(template.end_of_turn, start + len(content))
        if marker < 0:
            raise ValueError(f"no end-of-turn marker after message {index}")
        spans.append((start, marker + len(template.end_of_turn)))
    labels = [token if any(a < end and b > start for start, end in spans) else IGNORE_INDEX
              for token, (a, b) in zip(ids, encoding["offset_mapping"], strict=True)]
    labels[0] = IGNORE_INDEX
    return ids, labels


def content_start(through: str, emptied: str, content: str) -> int:
    """Where `content` sits in `through`, the render that `emptied` is without it. Where the
    two renders stop agreeing is not enough: content starting as the template's next text does
    ('<file_photo>' before '<|im_end|>') agrees with it for a while."""
    prefix, suffix = _common_prefix(through, emptied), _common_prefix(through[::-1], emptied[::-1])
    starts = [s for s in range(max(0, len(emptied) - suffix), prefix + 1) if through[s : s + len(content)] == content]
    if len(starts) != 1:
        raise ValueError(f"cannot tell where {content[:40]!r} starts (at {starts})")
    return starts[0]


def _common_prefix(a: str, b: str) -> int:
    low, high = 0, min(len(a), len(b))  # binary search: slices compare in C
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def fit_problems(example: Example, pieces: list[Tokenized], too_long: list[int], max_length: int) -> list[str]:
    """What is wrong with how an example was cut into pieces (nothing, for one that fits)."""
    messages = example.messages
    if len(pieces) == 1 and pieces[0].example.messages == messages and not too_long:
        return [] if len(pieces[0].input_ids) <= max_length else ["longer than max_length"]
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    trained = [i for i in range(n_system, len(messages)) if messages[i]["train"]]
    said = [(m["role"], m.get("name"), m["content"]) for m in messages]
    problems, covered = [], []
    for number, piece in enumerate(pieces):
        got = piece.example.messages
        if len(piece.input_ids) > max_length:
            problems.append(f"piece {number} has {len(piece.input_ids)} tokens")
        if [(m["role"], m.get("name"), m["content"]) for m in got[:n_system]] != said[:n_system]:
            problems.append(f"piece {number} lacks the system prompt")
        body = [(m["role"], m.get("name"), m["content"]) for m in got[n_system:]]
        flags = [m["train"] for m in got[n_system:]]
        # Where the piece sits in the example: after the turns earlier pieces trained (a short
        # run of messages may occur more than once).
        placed = None
        for begin in range(n_system, len(messages) - len(body) + 1):
            mine = [begin + k for k, train in enumerate(flags) if train]
            if said[begin : begin + len(body)] == body and mine and (not covered or mine[0] > covered[-1]):
                placed = begin, mine
                break
        if placed is None:
            problems.append(f"piece {number} is not a run of the example's messages after the previous piece")
            continue
        begin, mine = placed
        end = begin + len(body) - 1
        if mine != [i for i in trained if mine[0] <= i <= end] or mine[-1] != end:
            problems.append(f"piece {number} trains {mine} of messages {begin}..{end}")
        if mine[0] > n_system and begin >= mine[0]:
            problems.append(f"piece {number} trains message {mine[0]} without the turn it answers")
        covered += mine
    reported = sorted(covered + [n_system + turn for turn in too_long])
    if reported != trained:
        problems.append(f"trained messages {trained}: trained in pieces {covered}, too long {too_long}")
    return problems


# -- the comparison -------------------------------------------------------------------------
@dataclass
class Row:
    source: str
    template: str
    max_length: int
    examples: int = 0
    pieces: int = 0
    tokens: int = 0
    trained: int = 0
    too_long: int = 0
    ids: int = 0  # pieces whose ids differ from apply_chat_template's
    labels: int = 0  # pieces whose labels differ from the reference's
    fitting: int = 0  # examples cut wrongly
    paths: int = 0  # 1 if locating by byte lengths and by offsets disagree
    problems: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return self.ids + self.labels + self.fitting + self.paths


def encode_all(encoder: ExampleEncoder, examples: list[Example]) -> tuple[list[Tokenized], TokenizeStats]:
    stats = TokenizeStats()
    pieces = [piece for start in range(0, len(examples), 512)
              for piece in encoder.encode(examples[start : start + 512], stats)]
    return pieces, stats


def check_one(tokenizer, template: ChatTemplate, max_length: int, source: str, examples: list[Example],
              references: dict) -> Row:
    """`references` keeps the reference of each piece met (at several max lengths, most are the same)."""
    row = Row(source, template.name, max_length, examples=len(examples))
    pieces, stats = encode_all(ExampleEncoder(tokenizer, template, max_length), examples)
    by_offsets, offsets_stats = encode_all(ExampleEncoder(tokenizer, template, max_length, by_offsets=True), examples)
    same_pieces = len(pieces) == len(by_offsets) and all(
        np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        and a.example.messages == b.example.messages for a, b in zip(pieces, by_offsets))
    if not same_pieces or stats != offsets_stats:
        row.paths = 1
        row.problems.append("locating by byte lengths and by offsets disagree")
    row.pieces, row.too_long = len(pieces), stats.turns_too_long
    for piece in pieces:
        row.tokens += len(piece.input_ids)
        row.trained += int((piece.labels != IGNORE_INDEX).sum())
        key = tuple((m["role"], m.get("name"), m["content"], m["train"], json.dumps(m.get("tool_calls")))
                    for m in piece.example.messages)
        if key not in references:
            try:
                references[key] = reference(tokenizer, template, piece.example)
            except ValueError as err:
                references[key] = str(err)
        if isinstance(references[key], str):
            row.labels += 1
            row.problems.append(f"{piece.example.dialogue_id}: the reference fails: {references[key]}")
            continue
        ids, labels = references[key]
        if piece.input_ids.tolist() != ids:
            row.ids += 1
            row.problems.append(f"{piece.example.dialogue_id}: ids differ from apply_chat_template")
        elif piece.labels.tolist() != labels:
            row.labels += 1
            at = next(i for i, (a, b) in enumerate(zip(piece.labels.tolist(), labels)) if a != b)
            row.problems.append(f"{piece.example.dialogue_id}: label {at} is {piece.labels[at]}, reference"
                                f" {labels[at]} (token {tokenizer.decode(ids[at : at + 1])!r})")
    pieces_of: dict[str, list[Tokenized]] = {}
    for piece in pieces:
        pieces_of.setdefault(piece.example.dialogue_id, []).append(piece)
    too_long_of: dict[str, list[int]] = {}
    for reject in stats.rejects:
        found = _TOO_LONG.match(reject.reason)
        if found is None:
            row.fitting += 1
            row.problems.append(f"{reject.item}: rejected: {reject.reason}")
        else:
            too_long_of.setdefault(reject.item, []).append(int(found.group(1)))
    for example in examples:
        problems = fit_problems(example, pieces_of.get(example.dialogue_id, []),
                                too_long_of.get(example.dialogue_id, []), max_length)
        if problems:
            row.fitting += 1
            row.problems += [f"{example.dialogue_id}: {p}" for p in problems]
    return row


def check(tokenizer, sample: dict[str, list[Dialogue]], templates: list[ChatTemplate],
          max_lengths=MAX_LENGTHS, report=None) -> list[Row]:
    examples = {source: [e for d in dialogues for e in examples_of(d, source in TOOL_SOURCES)]
                for source, dialogues in sample.items()}
    rows = []
    for template in templates:
        references: dict = {}
        for max_length in max_lengths:
            for source, made in examples.items():
                if source in TOOL_SOURCES and not renders_tool_calls(template.source):
                    continue
                rows.append(check_one(tokenizer, template, max_length, source, made, references))
                if report is not None:
                    report(rows[-1])
    return rows


def templates_for(tokenizer) -> list[ChatTemplate]:
    names = sorted(SHIPPED) + ([MODEL_TEMPLATE] if tokenizer.chat_template else [])
    return [resolve_template(name, tokenizer) for name in names]


# -- the command ----------------------------------------------------------------------------
HEADER = (f"{'source':<12} {'template':<15} {'max_len':>7} {'examples':>8} {'pieces':>7} {'tokens':>10}"
          f" {'trained':>9} {'too long':>8} {'ids≠':>5} {'labels≠':>7} {'fit≠':>5} {'paths≠':>6}")


def format_row(row: Row) -> str:
    return (f"{row.source:<12} {row.template:<15} {row.max_length:>7} {row.examples:>8} {row.pieces:>7}"
            f" {row.tokens:>10} {row.trained:>9} {row.too_long:>8} {row.ids:>5} {row.labels:>7} {row.fitting:>5}"
            f" {row.paths:>6}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    args = parser.parse_args()
    from dialogtune.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    sample = read_sample(args.data)
    started = time.perf_counter()
    print(f"{sum(map(len, sample.values()))} dialogues ({', '.join(f'{k} {len(v)}' for k, v in sample.items())}),"
          f" tokenizer {args.tokenizer}\n")
    print(HEADER)

    def report(row: Row) -> None:
        print(format_row(row), flush=True)
        for problem in row.problems[:SHOWN]:
            print(f"    {problem}")

    rows = check(tokenizer, sample, templates_for(tokenizer), report=report)
    bad = sum(row.mismatches for row in rows)
    print(f"\n{len(rows)} rows, {sum(r.pieces for r in rows)} pieces, {sum(r.tokens for r in rows)} tokens,"
          f" {sum(r.trained for r in rows)} trained: {bad} mismatches ({time.perf_counter() - started:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
