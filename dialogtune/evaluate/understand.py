"""`dialogtune eval RUN --task understand --data SGD_DIR`: how well a run turns SGD user turns into calls.

Each dialogue is replayed turn by turn as `dialogtune understand` would see it: system turns are
context, each user turn is understood with the state the run itself has tracked so far (never the
gold state). Per user turn, against SGD's annotations (dialogtune.state.sgd_user_turns):

- function accuracy: stage 1's answer equals the turn's active intent (`none` when no service has one);
- none accuracy: the same, over the turns whose gold is `none`;
- slot precision / recall / F1: the tracked state of the turn's service against its gold state,
  a value right when it equals (case-insensitively) one of SGD's acceptable values;
- exact call: the function and every argument right;
- joint goal accuracy (DSTC8's primary metric): every slot of the service's state right, where a
  free-text value scores its best fuzzy match to the gold values (rapidfuzz's token-sort ratio,
  DSTC8's choice) and a turn's score is the product of its slots' scores;
reported over all turns and separately for services with exemplars in the index (seen) and
services known only by their schema (unseen). report.md lists the worst turns. With `limit`, the
dialogues evaluated are the first `limit` by a hash of their ids: a fixed sample spread over services.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialogtune.dialogue import Dialogue, Reject
from dialogtune.files import write_json, write_text
from dialogtune.retrieval.exemplars import categorical_slots
from dialogtune.state import service_of, sgd_user_turns
from dialogtune.understand import Conversation, Understander, latency

GROUPS = ("all", "seen", "unseen")
WORST_SHOWN = 30


def value_score(predicted: str | None, gold: list[str], categorical: bool) -> float:
    """1.0 for a right value; a free-text value's best fuzzy match otherwise (DSTC8)."""
    if predicted is None:
        return 0.0
    if any(predicted.strip().lower() == g.strip().lower() for g in gold):
        return 1.0
    if categorical:
        return 0.0
    from rapidfuzz import fuzz

    return max(fuzz.token_sort_ratio(predicted, g) / 100 for g in gold)


@dataclass
class Tally:
    turns: int = 0
    function_right: int = 0
    none_turns: int = 0
    none_right: int = 0
    slots_predicted: int = 0
    slots_gold: int = 0
    slots_right: int = 0
    calls: int = 0
    calls_right: int = 0
    goal_scores: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        precision = self.slots_right / self.slots_predicted if self.slots_predicted else None
        recall = self.slots_right / self.slots_gold if self.slots_gold else None
        f1 = (2 * precision * recall / (precision + recall)) if precision and recall else (
            0.0 if precision is not None and recall is not None else None)
        return {"turns": self.turns,
                "function_accuracy": self.function_right / self.turns if self.turns else None,
                "none_accuracy": self.none_right / self.none_turns if self.none_turns else None,
                "none_turns": self.none_turns,
                "slot_precision": precision, "slot_recall": recall, "slot_f1": f1,
                "exact_call": self.calls_right / self.calls if self.calls else None,
                "joint_goal_accuracy": statistics.fmean(self.goal_scores) if self.goal_scores else None,
                "goal_turns": len(self.goal_scores)}


def score_dialogue(understander: Understander, dialogue: Dialogue, seen_services: set[str],
                   tallies: dict[str, Tally], worst: list[dict], seconds: list[float],
                   stages: dict[str, list[float]] | None = None) -> None:
    gold_turns = {t.index: t for t in sgd_user_turns(dialogue)}
    conversation = Conversation(services=dialogue.meta.get("services"))
    for index, turn in enumerate(dialogue.turns):
        if turn.speaker != "USER":
            conversation.turns.append((turn.speaker or "SYSTEM", turn.text))
            continue
        gold = gold_turns[index]
        result = understander.turn(conversation, turn.text)
        seconds.append(result.seconds)
        for stage, spent in result.stages.items():
            if stages is not None:
                stages.setdefault(stage, []).append(spent)
        service = gold.service or (service_of(gold.function) if gold.function else None)
        group = "seen" if service in seen_services else "unseen"
        held = conversation.state.values.get(service, {}) if service else {}
        categorical = categorical_slots(dialogue, service) if service else set()
        slots = {slot: value_score(held.get(slot), values, slot in categorical) for slot, values in gold.state.items()}
        extra = [slot for slot in held if slot not in gold.state]
        right = sum(score == 1.0 for score in slots.values())
        goal = 0.0 if extra else float(math.prod(slots.values()))
        call_right = result.function == gold.function and (gold.function is None or (not extra and right == len(slots)))
        for name in ["all", group] if service else ["all"]:
            tally = tallies[name]
            tally.turns += 1
            tally.function_right += result.function == gold.function
            if gold.function is None:
                tally.none_turns += 1
                tally.none_right += result.function is None
            if service:
                tally.slots_predicted += len(held)
                tally.slots_gold += len(slots)
                tally.slots_right += right
                tally.goal_scores.append(goal)
            tally.calls += 1
            tally.calls_right += call_right
        if not call_right:
            worst.append({"dialogue": dialogue.id, "turn": index, "utterance": turn.text, "group": group,
                          "gold_function": gold.function, "function": result.function,
                          "gold_state": {k: v[0] for k, v in gold.state.items()}, "state": dict(held),
                          "goal": round(goal, 3), "candidates": result.candidates,
                          "gold_offered": gold.function is None or gold.function in result.candidates})


def evaluate_understanding(understander: Understander, dialogues: Iterable[Dialogue | Reject], out: Path,
                           limit: int | None = None, quiet: bool = False) -> dict[str, Any]:
    from tqdm.auto import tqdm

    seen = {service_of(e.function) for e in understander.prompts.index.exemplars if e.function}
    tallies = {name: Tally() for name in GROUPS}
    worst: list[dict] = []
    seconds: list[float] = []
    stages: dict[str, list[float]] = {}
    rejected = 0
    started = time.perf_counter()
    chosen = []
    for item in dialogues:
        if isinstance(item, Reject):
            rejected += 1
        else:
            chosen.append(item)
    if limit is not None:  # SGD files are grouped by service: the first N would be a few services
        chosen = sorted(chosen, key=lambda d: hashlib.blake2b(d.id.encode(), digest_size=8).digest())[:limit]
    for dialogue in tqdm(chosen, desc="eval understand", unit=" dialogues", disable=quiet or None):
        score_dialogue(understander, dialogue, seen, tallies, worst, seconds, stages)
    report = {"task": "understand", "dialogues": len(chosen), "rejected": rejected,
              "groups": {name: tally.summary() for name, tally in tallies.items()},
              "latency": latency(seconds), "latency_by_stage": {name: latency(spent) for name, spent in stages.items()},
              "seconds": round(time.perf_counter() - started, 1),
              "errors": len(worst)}
    worst.sort(key=lambda w: (w["gold_offered"], w["goal"]))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    write_json(out / "errors.json", worst)
    write_text(out / "report.md", markdown(report, worst))
    return report


def cell(value: float | None) -> str:
    """A metric as a Markdown table shows it: 3 decimals, a dash for none."""
    return "–" if value is None else f"{value:.3f}"


def markdown(report: dict[str, Any], worst: list[dict]) -> str:
    lines = [f"# eval --task understand: {report['dialogues']} dialogues", "",
             "| group | turns | function acc | none acc | slot P | slot R | slot F1 | exact call | JGA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in report["groups"].items():
        lines.append(f"| {name} | {s['turns']} | {cell(s['function_accuracy'])} | {cell(s['none_accuracy'])} | "
                     f"{cell(s['slot_precision'])} | {cell(s['slot_recall'])} | {cell(s['slot_f1'])} | "
                     f"{cell(s['exact_call'])} | {cell(s['joint_goal_accuracy'])} |")
    lat = report["latency"]
    by_stage = "; ".join(f"{name} p50 {spent['p50_ms']} ms" for name, spent in report.get("latency_by_stage", {}).items())
    lines += ["", f"Latency per user turn (retrieval + both stages): p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms"
              + (f" ({by_stage})." if by_stage else "."),
              "", f"## Worst turns ({min(WORST_SHOWN, len(worst))} of {len(worst)} wrong calls)", ""]
    for w in worst[:WORST_SHOWN]:
        offered = "" if w["gold_offered"] else " (gold not among the candidates)"
        lines.append(f"- `{w['dialogue']}` turn {w['turn']} ({w['group']}): \"{w['utterance']}\" — gold "
                     f"`{w['gold_function']}` {w['gold_state']}, got `{w['function']}` {w['state']}{offered}")
    return "\n".join(lines) + "\n"
