"""Per-item scores: the ``process_results`` hooks of qkit's lm-eval tasks.

Each hook returns one number per metric for one item; lm-eval averages them into the task's score, and
qkit keeps the per-item numbers for paired bootstraps and flips. A rolling-likelihood task's per-item
numbers are NLL per word or byte with a weight, aggregated as lm-eval does (:func:`weighted_score`).
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from qkit.core.errors import QkitError
from qkit.evaluation import metrics, sandbox

# A number as people write answers: optional sign, thousands separators, decimals.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_GSM8K_MARKERS = ("####", "answer is")
HUMANEVAL_LIMITS = sandbox.Limits(timeout_s=10.0, memory_bytes=1 << 30)


def normalize_number(text: str) -> str:
    """'1,234.50' → '1234.5', '18.0' → '18', '-0' → '0'."""
    text = text.replace(",", "").rstrip(".")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def final_number(text: str) -> str | None:
    """GSM8K's answer in a generation: the number after "####" or "the answer is" if present, else the
    last number in the text."""
    lower = text.lower()
    for marker in _GSM8K_MARKERS:
        if marker in lower:
            found = _NUMBER.findall(text[lower.rindex(marker):])
            if found:
                return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def first_number(text: str) -> str | None:
    """BIG-bench arithmetic and passkey answers: the first number in the generation."""
    found = _NUMBER.search(text)
    return normalize_number(found.group()) if found else None


def gsm8k(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(final_number(results[0]) == normalize_number(doc["answer"]))}


def arithmetic(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(first_number(results[0]) == normalize_number(doc["answer"]))}


def passkey(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(first_number(results[0]) == doc["answer"])}


def humaneval(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of a greedy completion, run in qkit's sandbox (the reason the YAML sets unsafe_code)."""
    outcome = sandbox.run_program(sandbox.humaneval_program(doc, results[0]), HUMANEVAL_LIMITS)
    return {"pass@1": float(outcome.passed)}


@functools.cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(reference: str, prediction: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures in [0, 1] (Google's rouge-score, Porter stemming, as BIG-bench uses)."""
    scores = _rouge().score(reference, prediction)
    return {name: s.fmeasure for name, s in scores.items()}


def xsum(doc: dict, results: list[str]) -> dict[str, float]:
    return rouge(doc["summary"], results[0].strip())


def xsum_ll(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """Negative log-likelihood of the reference summary per UTF-8 byte (nats): per byte, so that
    tokenizers of different granularity compare."""
    ll, _ = results[0]
    return {"nll_per_byte": -ll / len((" " + doc["summary"]).encode("utf-8"))}


# lm-eval's aggregations of (log-likelihood, words or bytes) pairs, applied to per-item NLL per unit.
WEIGHTED_AGGREGATIONS: dict[str, Callable[[float], float]] = {
    "weighted_perplexity": math.exp, "bits_per_byte": lambda nll: nll / math.log(2)}


def weighted_score(nll: metrics.Values, weights: metrics.Values, aggregation: str) -> float:
    """lm-eval's score of a ``loglikelihood_rolling`` task from per-item NLL per unit (nats per word or
    byte) and each item's units: ``aggregation`` of the unit-weighted mean NLL, so it equals
    lm-eval's ``weighted_perplexity`` or ``bits_per_byte`` over the same items."""
    x, w = np.asarray(nll, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    return WEIGHTED_AGGREGATIONS[aggregation](float((x * w).sum() / w.sum()))


def weighted_diff_ci(values: metrics.Values, paired_with: metrics.Values, weights: metrics.Values, aggregation: str, *,
                     n_boot: int = metrics.BOOTSTRAP_RESAMPLES, alpha: float = 0.05, seed: int = 0
                     ) -> tuple[float, float, float]:
    """(difference, low, high) of :func:`weighted_score` between two models on the same items: items are
    resampled in pairs, and each resample's scores are ratios of weighted sums, as lm-eval aggregates.
    NaN bounds for a single item."""
    q, b, w = (np.asarray(v, dtype=np.float64) for v in (values, paired_with, weights))
    if not q.shape == b.shape == w.shape:
        raise QkitError(f"weighted bootstrap needs equal lengths, got {q.size}, {b.size} and {w.size}",
                        "pass one NLL and one weight per item for both models, in the same order")
    f = WEIGHTED_AGGREGATIONS[aggregation]
    point = weighted_score(q, w, aggregation) - weighted_score(b, w, aggregation)
    if q.size < 2:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, q.size, size=(n_boot, q.size))
    ws = w[idx].sum(axis=1)
    boots = np.vectorize(f)((q[idx] * w[idx]).sum(axis=1) / ws) - np.vectorize(f)((b[idx] * w[idx]).sum(axis=1) / ws)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return point, min(float(low), point), max(float(high), point)
