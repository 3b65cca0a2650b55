"""Diagnostics of a calibration set before quantizing with it.

:func:`diagnose` looks at the token rows a method would see (pure function, testable on hand-made rows);
:func:`inspect` builds one of qkit's calibration sets and diagnoses it against the held-out text of every
domain. The thresholds come from what llm-compressor's own examples use (:data:`ANCHORS`)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from qkit.core.errors import QkitError
from qkit.data import sources

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# What llm-compressor's examples calibrate with (samples, tokens per sample, where). A set below them is
# not wrong, but the method's authors tuned and reported it on more.
ANCHORS: dict[str, tuple[int, int, str]] = {
    "w4a16_gptq": (512, 2048, "llm-compressor examples/quantization_w4a16/llama3_example.py"),
    "w8a8_int8": (512, 2048, "llm-compressor examples/quantization_w8a8_int8/llama3_example.py"),
    "fp8_static": (512, 2048, "llm-compressor examples/quantization_w8a8_fp8 (static scales)"),
    "w4a16_awq": (256, 512, "llm-compressor examples/awq/llama_example.py (\"256 samples is a good place to start\")"),
}


# Duplicates are counted on windows of this many tokens: long enough that common phrases do not count.
NGRAM = 16


# Below this share of eval tokens whose type the set contains, the set hardly sees that domain: 32 x 512
# tokens of in-domain text cover 84-89% on SmolLM2, out-of-domain text 53-72%, random tokens 23-45%.
COVERAGE_WARN_PCT = 50.0


@dataclass
class Diagnostics:
    """What a calibration set holds. Percentages are 0-100."""

    n_samples: int
    seq_len: int
    tokens: int
    segment_lengths: list[int]  # tokens per document piece (documents split at EOS and row edges)
    domain_mix: dict[str, float]  # % of rows per source domain
    duplicate_rows_pct: float  # rows identical to an earlier row
    duplicate_ngrams_pct: float  # NGRAM-token windows that occur more than once
    truncated_pct: float  # rows that end inside a document (a cut document)
    padded_pct: float  # share of tokens that are padding
    coverage: dict[str, dict[str, float]] = field(default_factory=dict)  # per eval domain: types_pct, tokens_pct
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The scalar figures, for a table."""
        out = {k: v for k, v in asdict(self).items() if k not in ("segment_lengths", "domain_mix", "coverage",
                                                                    "warnings")}
        out["median_segment"] = float(np.median(self.segment_lengths)) if self.segment_lengths else 0.0
        out.update({f"mix_{d}_pct": v for d, v in self.domain_mix.items()})
        for domain, cov in self.coverage.items():
            out.update({f"coverage_{domain}_{k}": v for k, v in cov.items()})
        return out


def _segments(row: Sequence[int], eos_id: int | None) -> list[int]:
    lengths, run = [], 0
    for t in row:
        run += 1
        if t == eos_id:
            lengths.append(run)
            run = 0
    if run:
        lengths.append(run)
    return lengths


def diagnose(rows: Sequence[Sequence[int]], *, eos_id: int | None, pad_id: int | None = None,
             domains: Sequence[str] | None = None, eval_ids: Mapping[str, Sequence[int]] | None = None,
             methods: Sequence[str] = ()) -> Diagnostics:
    """Diagnostics of calibration rows (token id lists), with warnings for `methods` whose anchors the set
    falls short of. ``domains`` labels each row's source; ``eval_ids`` maps an eval domain to its tokens."""
    if not rows:
        raise QkitError("the calibration set has no rows", "ask for at least one sample")
    n = len(rows)
    seq_len = max(len(r) for r in rows)
    tokens = sum(len(r) for r in rows)
    pad = sum(1 for r in rows for t in r if pad_id is not None and t == pad_id) + sum(seq_len - len(r) for r in rows)
    seen: set[tuple[int, ...]] = set()
    dup_rows = 0
    for r in rows:
        key = tuple(r)
        dup_rows += key in seen
        seen.add(key)
    grams = Counter(tuple(r[i:i + NGRAM]) for r in rows for i in range(len(r) - NGRAM + 1))
    total_grams = sum(grams.values())
    dup_grams = sum(c for c in grams.values() if c > 1)
    # A packed row that does not end in EOS cut its last document short.
    truncated = sum(1 for r in rows if r and r[-1] != eos_id) if eos_id is not None else 0
    labels = list(domains) if domains is not None else ["unknown"] * n
    if len(labels) != n:
        raise QkitError(f"{len(labels)} domain labels for {n} rows", "pass one label per row")
    mix = {d: 100.0 * c / n for d, c in sorted(Counter(labels).items())}
    out = Diagnostics(
        n_samples=n, seq_len=seq_len, tokens=tokens,
        segment_lengths=[s for r in rows for s in _segments(r, eos_id)],
        domain_mix=mix, duplicate_rows_pct=100.0 * dup_rows / n,
        duplicate_ngrams_pct=100.0 * dup_grams / total_grams if total_grams else 0.0,
        truncated_pct=100.0 * truncated / n, padded_pct=100.0 * pad / (n * seq_len),
    )
    calib_types = {t for r in rows for t in r}
    for domain, ids in (eval_ids or {}).items():
        types = set(ids)
        out.coverage[domain] = {
            "types_pct": 100.0 * len(types & calib_types) / len(types) if types else 0.0,
            "tokens_pct": 100.0 * sum(t in calib_types for t in ids) / len(ids) if len(ids) else 0.0,
        }
    out.warnings = _warnings(out, methods)
    return out


def _warnings(d: Diagnostics, methods: Sequence[str]) -> list[str]:
    out = []
    for m in methods:
        if m not in ANCHORS:
            continue
        samples, seq_len, where = ANCHORS[m]
        if d.n_samples < samples or d.seq_len < seq_len:
            out.append(f"{m}: {d.n_samples} x {d.seq_len} tokens is below the {samples} x {seq_len} of {where}")
    if d.duplicate_rows_pct > 0:
        out.append(f"{d.duplicate_rows_pct:.1f}% of the rows repeat an earlier row: they add no information")
    if d.duplicate_ngrams_pct > 10:
        out.append(f"{d.duplicate_ngrams_pct:.1f}% of {NGRAM}-token windows repeat: the set is less varied than "
                   "its size suggests")
    if d.padded_pct > 10:
        out.append(f"{d.padded_pct:.1f}% of the tokens are padding, which calibrates nothing")
    for domain, cov in d.coverage.items():
        if cov["tokens_pct"] < COVERAGE_WARN_PCT:
            out.append(f"only {cov['tokens_pct']:.1f}% of the {domain} eval tokens are of a type the set contains: "
                       f"it barely sees {domain} text")
    return out


def inspect(name: str, n_samples: int, seq_len: int, seed: int = 0, *, tokenizer: PreTrainedTokenizerBase,
            methods: Sequence[str] = tuple(ANCHORS), eval_tokens: int = 8192,
            eval_texts: Sequence[str] = sources.EVAL_DOMAINS) -> Diagnostics:
    """Build the calibration set `name` (built-in or a user's file) and diagnose it against the held-out
    split of each eval text (built-in domains or a user's files), up to `eval_tokens` tokens of each."""
    labelled = sources.calibration_rows(name, n_samples, seq_len, seed, tokenizer=tokenizer)
    eval_ids = {d: sources.heldout_tokens(d, tokenizer, eval_tokens) for d in eval_texts}
    # Random token rows hold no documents: nothing to count as cut.
    eos = None if name == "random" else tokenizer.eos_token_id
    return diagnose([r for _, r in labelled], eos_id=eos, pad_id=None,
                    domains=[d for d, _ in labelled], eval_ids=eval_ids, methods=methods)
