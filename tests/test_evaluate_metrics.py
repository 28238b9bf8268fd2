"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from dialogtune.evaluate.metrics import bleu, call_metrics, distinct, perplexity, reply_metrics, rouge, rouge_l


def test_rouge_on_hand_computed_pairs():
    # reference: "the cat sat on the mat" (6 words), prediction: "the cat lay on the mat"
    # unigrams: 5 of 6 match -> P = R = F = 5/6; bigrams: "the cat", "on the", "the mat" -> 3/5
    # LCS: the cat _ on the mat = 5 -> 5/6
    scores = rouge(["the cat lay on the mat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5, abs=1e-3)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6, abs=1e-3)


def test_rouge_stems_and_averages_over_samples():
    # "running"/"runs" both stem to "run": a perfect match after stemming.
    assert rouge(["he runs"], ["he running"])["rouge1"] == pytest.approx(100.0)
    two = rouge(["a b", "x y"], ["a b", "p q"])
    assert two["rouge1"] == pytest.approx(50.0)  # the mean of 100 and 0
    assert rouge_l("a b c", "a b c") == pytest.approx(100.0)


def test_bleu_is_sacrebleu_corpus_bleu():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["completely different words here"], ["the cat sat on the mat"]) < 10


def test_distinct_counts_unique_ngrams_over_all_replies():
    replies = ["I am fine", "I am here"]  # unigrams: i am fine i am here -> 4 distinct / 6
    assert distinct(replies, 1) == pytest.approx(4 / 6, abs=1e-4)
    assert distinct(replies, 2) == pytest.approx(3 / 4, abs=1e-4)  # i-am, am-fine, i-am, am-here
    assert distinct([], 1) == 0.0


def test_perplexity_of_known_token_losses():
    # Four trained tokens with losses ln 2, ln 2, ln 8, ln 8: mean ln 4 -> perplexity 4.
    total = 2 * math.log(2) + 2 * math.log(8)
    assert perplexity(total, 4) == pytest.approx(4.0)


def test_reply_metrics_measure_stopping_and_length():
    m = reply_metrics(["Hello there", "Bye"], ["Hello there", "Goodbye"], [True, False])
    assert m["stopped_share"] == 0.5 and m["avg_words"] == 1.5


def test_call_metrics_on_constructed_cases():
    gold = [{"function": "FindRestaurants", "arguments": {"city": "San Jose", "cuisine": "Italian"}},
            {"function": "BookTable", "arguments": {"time": "7 pm"}},
            {"function": None, "arguments": {}}]
    predicted = [{"function": "FindRestaurants", "arguments": {"city": "san jose", "cuisine": "Thai"}},
                 {"function": "BookTable", "arguments": {"time": "7 pm"}},
                 {"function": "FindRestaurants", "arguments": {}}]
    m = call_metrics(predicted, gold)
    assert m["function_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    # slots: predicted {city=san jose, cuisine=thai, time=7 pm}, gold {city, cuisine=italian, time}: 2 right
    assert (m["slot_precision"], m["slot_recall"]) == (pytest.approx(2 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4))
    assert m["slot_f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["exact_match"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["none_accuracy"] == 0.0
