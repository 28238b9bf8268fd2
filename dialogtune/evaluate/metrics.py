"""Metrics, each in the form the literature reports it.

- ROUGE-1/2/L/Lsum: Google's `rouge-score` with the Porter stemmer, F1 averaged over samples,
  times 100 (as the SAMSum papers and Hugging Face's summarisation examples report them).
  ROUGE-Lsum treats each sentence as a line (sentences split at . ! ? and newlines).
- BLEU: sacrebleu's corpus BLEU with its standard 13a tokenisation.
- distinct-1/2: distinct n-grams over all n-grams of all replies (lower-cased words).
- perplexity: exp of the token-weighted mean loss over trained tokens.
- function calling: function-name accuracy, slot precision/recall/F1 (over slot=value pairs),
  exact match of the whole call, and accuracy on out-of-domain ("none") cases.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences_as_lines(text: str) -> str:
    return "\n".join(s for line in text.splitlines() for s in _SENTENCE_END.split(line.strip()) if s)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    totals: Counter[str] = Counter()
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences_as_lines(reference), _sentences_as_lines(prediction))
        for name, score in scores.items():
            totals[name] += score.fmeasure
    n = max(len(predictions), 1)
    return {name: round(100 * totals[name] / n, 4) for name in ("rouge1", "rouge2", "rougeL", "rougeLsum")}


def rouge_l(prediction: str, reference: str) -> float:
    """Sentence-level ROUGE-L F1 (x100) of one pair: used to rank samples in reports."""
    from rouge_score import rouge_scorer

    return 100 * rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return round(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score, 4)


def distinct(predictions: Sequence[str], n: int) -> float:
    grams: Counter[tuple[str, ...]] = Counter()
    for text in predictions:
        words = text.lower().split()
        grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return round(len(grams) / total, 4) if total else 0.0


def perplexity(total_loss: float, tokens: int) -> float:
    return math.exp(total_loss / tokens) if tokens else float("nan")


def reply_metrics(predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]) -> dict[str, float]:
    n = max(len(predictions), 1)
    return {
        "bleu": bleu(predictions, references),
        "rougeL": rouge(predictions, references)["rougeL"],
        "distinct1": distinct(predictions, 1),
        "distinct2": distinct(predictions, 2),
        "avg_words": round(sum(len(p.split()) for p in predictions) / n, 2),
        "stopped_share": round(sum(bool(s) for s in stopped) / n, 4),
    }


def call_metrics(predicted: Sequence[dict], gold: Sequence[dict]) -> dict[str, float]:
    """Calls are {"function": name or None (out of domain), "arguments": {slot: value}}."""
    function_hits = exact = none_total = none_hits = 0
    true_positive = predicted_slots = gold_slots = 0
    for guess, truth in zip(predicted, gold, strict=True):
        same_function = guess.get("function") == truth.get("function")
        function_hits += same_function
        guess_pairs = {(k, str(v).strip().lower()) for k, v in (guess.get("arguments") or {}).items()}
        truth_pairs = {(k, str(v).strip().lower()) for k, v in (truth.get("arguments") or {}).items()}
        true_positive += len(guess_pairs & truth_pairs)
        predicted_slots += len(guess_pairs)
        gold_slots += len(truth_pairs)
        exact += same_function and guess_pairs == truth_pairs
        if truth.get("function") is None:
            none_total += 1
            none_hits += guess.get("function") is None
    n = max(len(gold), 1)
    precision = true_positive / predicted_slots if predicted_slots else 0.0
    recall = true_positive / gold_slots if gold_slots else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"function_accuracy": round(function_hits / n, 4), "slot_precision": round(precision, 4),
            "slot_recall": round(recall, 4), "slot_f1": round(f1, 4), "exact_match": round(exact / n, 4),
            "none_accuracy": round(none_hits / none_total, 4) if none_total else None}
