"""Calibration-set diagnostics on hand-made rows with known answers, and on qkit's own sets."""
from __future__ import annotations

import pytest

from qkit import calibration as C
from qkit.errors import QkitError

EOS = 0


def test_duplicates_lengths_truncation_and_mix_on_hand_made_rows() -> None:
    a = list(range(1, 21))  # 20 tokens, no EOS: a piece of one long document
    b = [5, 6, EOS, 7, 8, 9, EOS]  # two whole documents of 3 and 4 tokens
    rows = [a, b, a, [3] * 20]
    d = C.diagnose(rows, eos_id=EOS, domains=["prose", "chat", "prose", "code"])
    assert (d.n_samples, d.seq_len, d.tokens) == (4, 20, 67)
    assert d.duplicate_rows_pct == 25.0  # the second `a`
    assert sorted(d.segment_lengths) == [3, 4, 20, 20, 20]
    assert d.truncated_pct == 75.0  # every row but b ends inside a document
    assert d.padded_pct == pytest.approx(100 * 13 / 80)  # b is 13 tokens short of the 20-token width
    assert d.domain_mix == {"chat": 25.0, "code": 25.0, "prose": 50.0}
    # 16-token windows: a has 5 (each twice: 10 duplicated), [3]*20 has 5 identical ones; b has none
    assert d.duplicate_ngrams_pct == pytest.approx(100 * 15 / 15)


def test_vocabulary_coverage_counts_types_and_tokens() -> None:
    d = C.diagnose([[1, 2, 3, 4]], eos_id=None, eval_ids={"prose": [1, 1, 1, 9], "code": [7, 8]})
    assert d.coverage["prose"] == {"types_pct": 50.0, "tokens_pct": 75.0}
    assert d.coverage["code"] == {"types_pct": 0.0, "tokens_pct": 0.0}
    assert any("code eval tokens" in w for w in d.warnings)
    assert not any("prose eval tokens" in w for w in d.warnings)


def test_warnings_name_the_anchor_the_set_falls_short_of() -> None:
    rows = [[i + 1 for i in range(8)] for _ in range(1)]
    d = C.diagnose(rows, eos_id=EOS, methods=["w4a16_gptq", "w4a16_awq", "fp8_dynamic"])
    gptq = [w for w in d.warnings if w.startswith("w4a16_gptq")]
    assert gptq and "512 x 2048" in gptq[0] and "llm-compressor" in gptq[0]
    assert any(w.startswith("w4a16_awq") and "256 x 512" in w for w in d.warnings)
    assert not any(w.startswith("fp8_dynamic") for w in d.warnings)  # needs no calibration
    big = C.diagnose([list(range(1, 513))] * 1, eos_id=EOS, methods=["w4a16_awq"])
    assert any("w4a16_awq" in w for w in big.warnings)  # 1 sample is still below 256


def test_empty_set_and_mislabelled_rows() -> None:
    with pytest.raises(QkitError, match="no rows"):
        C.diagnose([], eos_id=EOS)
    with pytest.raises(QkitError, match="2 domain labels for 1 rows"):
        C.diagnose([[1, 2]], eos_id=EOS, domains=["a", "b"])


def test_inspect_qkit_sets_on_tiny(tiny) -> None:
    mixed = C.inspect("mixed", 6, 64, tokenizer=tiny.tokenizer, eval_tokens=1024)
    assert mixed.domain_mix == {"chat": pytest.approx(100 / 3), "code": pytest.approx(100 / 3),
                                "prose": pytest.approx(100 / 3)}
    assert mixed.padded_pct == 0 and mixed.tokens == 6 * 64
    prose = C.inspect("prose", 4, 64, tokenizer=tiny.tokenizer, eval_tokens=1024)
    assert prose.coverage["prose"]["tokens_pct"] > prose.coverage["code"]["tokens_pct"]
    rnd = C.inspect("random", 4, 64, tokenizer=tiny.tokenizer, eval_tokens=1024)
    assert rnd.truncated_pct == 0 and rnd.domain_mix == {"random": 100.0}
    with pytest.raises(QkitError, match="fewer than n_samples x seq_len.*ask for at most"):
        C.inspect("chat", 100000, 512, tokenizer=tiny.tokenizer)
