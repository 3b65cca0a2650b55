"""Calibration-set diagnostics on hand-made rows with known answers, and on qkit's own sets."""
from __future__ import annotations

import pytest

from qkit.core.errors import QkitError
from qkit.data import diagnostics
from qkit.quant.backends import llmcompressor as llmcompressor_backend
from qkit.studies import calibration_data as C

EOS = 0


def test_duplicates_lengths_truncation_and_mix_on_hand_made_rows() -> None:
    a = list(range(1, 21))  # 20 tokens, no EOS: a piece of one long document
    b = [5, 6, EOS, 7, 8, 9, EOS]  # two whole documents of 3 and 4 tokens
    rows = [a, b, a, [3] * 20]
    d = diagnostics.diagnose(rows, eos_id=EOS, domains=["prose", "chat", "prose", "code"])
    assert (d.n_samples, d.seq_len, d.tokens) == (4, 20, 67)
    assert d.duplicate_rows_pct == 25.0  # the second `a`
    assert sorted(d.segment_lengths) == [3, 4, 20, 20, 20]
    assert d.truncated_pct == 75.0  # every row but b ends inside a document
    assert d.padded_pct == pytest.approx(100 * 13 / 80)  # b is 13 tokens short of the 20-token width
    assert d.domain_mix == {"chat": 25.0, "code": 25.0, "prose": 50.0}
    # 16-token windows: a has 5 (each twice: 10 duplicated), [3]*20 has 5 identical ones; b has none
    assert d.duplicate_ngrams_pct == pytest.approx(100 * 15 / 15)


def test_vocabulary_coverage_counts_types_and_tokens() -> None:
    d = diagnostics.diagnose([[1, 2, 3, 4]], eos_id=None, eval_ids={"prose": [1, 1, 1, 9], "code": [7, 8]})
    assert d.coverage["prose"] == {"types_pct": 50.0, "tokens_pct": 75.0}
    assert d.coverage["code"] == {"types_pct": 0.0, "tokens_pct": 0.0}
    assert any("code eval tokens" in w for w in d.warnings)
    assert not any("prose eval tokens" in w for w in d.warnings)


def test_warnings_name_the_anchor_the_set_falls_short_of() -> None:
    rows = [[i + 1 for i in range(8)] for _ in range(1)]
    d = diagnostics.diagnose(rows, eos_id=EOS, methods=["w4a16_gptq", "w4a16_awq", "fp8_dynamic"])
    gptq = [w for w in d.warnings if w.startswith("w4a16_gptq")]
    assert gptq and "512 x 2048" in gptq[0] and "llm-compressor" in gptq[0]
    assert any(w.startswith("w4a16_awq") and "256 x 512" in w for w in d.warnings)
    assert not any(w.startswith("fp8_dynamic") for w in d.warnings)  # needs no calibration
    big = diagnostics.diagnose([list(range(1, 513))] * 1, eos_id=EOS, methods=["w4a16_awq"])
    assert any("w4a16_awq" in w for w in big.warnings)  # 1 sample is still below 256


def test_empty_set_and_mislabelled_rows() -> None:
    with pytest.raises(QkitError, match="no rows"):
        diagnostics.diagnose([], eos_id=EOS)
    with pytest.raises(QkitError, match="2 domain labels for 1 rows"):
        diagnostics.diagnose([[1, 2]], eos_id=EOS, domains=["a", "b"])


def test_inspect_qkit_sets_on_tiny(tiny) -> None:
    mixed = diagnostics.inspect("mixed", 6, 64, tokenizer=tiny.tokenizer, eval_tokens=1024)
    assert mixed.domain_mix == {"chat": pytest.approx(100 / 3), "code": pytest.approx(100 / 3),
                                "prose": pytest.approx(100 / 3)}
    assert mixed.padded_pct == 0 and mixed.tokens == 6 * 64
    prose = diagnostics.inspect("prose", 4, 64, tokenizer=tiny.tokenizer, eval_tokens=1024)
    assert prose.coverage["prose"]["tokens_pct"] > prose.coverage["code"]["tokens_pct"]
    rnd = diagnostics.inspect("random", 4, 64, tokenizer=tiny.tokenizer, eval_tokens=1024)
    assert rnd.truncated_pct == 0 and rnd.domain_mix == {"random": 100.0}
    with pytest.raises(QkitError, match="fewer than n_samples x seq_len.*ask for at most"):
        diagnostics.inspect("chat", 100000, 512, tokenizer=tiny.tokenizer)


# ------------------------------------------------------------------ the sweep

GRID = C.Config(model="tiny", methods=("fp8_static",), sources=("prose", "chat"), samples=(2,), seq_lens=(32,), seeds=(0, 1),
              center=(2, 32), eval_tokens=256, ctx=128)


def test_grid_configs_run_along_three_axes_through_the_center() -> None:
    g = C.config("quick", samples=[4, 16, 64], seq_lens=[128, 512], seeds=[0])
    got = [(c.name, c.n_samples, c.seq_len) for c in g.configs()]
    n0, len0 = g.center
    assert got[:len(g.sources)] == [(s, n0, len0) for s in g.sources]
    assert ("prose", 64, len0) in got and ("prose", n0, 512) in got
    assert len(got) == len(set(got))  # the center is not repeated


def test_the_quick_curves_span_32x_in_samples_and_8x_in_length_for_gptq_only() -> None:
    g = C.PROFILES["quick"]
    curve = [c for c in g.configs("w4a16_gptq") if c.name == g.curve_source and c.seed == 0]
    assert max(c.n_samples for c in curve) / min(c.n_samples for c in curve) >= 32
    assert max(c.seq_len for c in curve) / min(c.seq_len for c in curve) >= 8
    n0, len0 = g.center
    assert {(c.name, c.n_samples, c.seq_len) for c in g.configs("w4a16_awq")} == {(s, n0, len0) for s in g.sources}
    # a curve method the user left out of the methods: the curves run for the methods chosen
    awq_only = C.config("quick", methods=["w4a16_awq"])
    assert awq_only.configs("w4a16_awq") == awq_only.configs()


@pytest.mark.parametrize("overrides, message", [
    ({"sources": ["prose", "webtext"]}, "unknown calibration set 'webtext'"),
    ({"methods": ["fp8_dynamic", "w4a16_rtn"]}, "none of fp8_dynamic, w4a16_rtn uses calibration data"),
    ({"seq_lens": [32, 4096]}, "seq_len 4096 is longer than the model's maximum length of 2048"),
    ({"samples": [100000]}, "fewer than n_samples x seq_len.*ask for at most"),
    ({"methods": ["fp9"]}, "unknown quantization method 'fp9'"),
])
def test_bad_grids_fail_before_any_quantization(tiny, tmp_path, monkeypatch, overrides, message) -> None:

    monkeypatch.setattr(llmcompressor_backend, "build", lambda *a, **k: pytest.fail("quantized"))
    with pytest.raises(QkitError, match=message):
        C.run(C.config(GRID, **overrides))
    with pytest.raises(QkitError, match="unknown profile"):
        C.config("huge")


def test_sweep_caches_every_cell_and_extends_by_computing_only_new_ones(tiny, store_with_tiny, tmp_path, monkeypatch,
                                                                        refuse_loading) -> None:
    from qkit import evaluation
    from qkit.studies import quantization_methods as studies

    store = store_with_tiny(tmp_path)
    built, compared = [], []
    real_build, real_compare = llmcompressor_backend.build, evaluation.compare
    monkeypatch.setattr(llmcompressor_backend, "build", lambda *a: built.append(a[2]) or real_build(*a))
    monkeypatch.setattr(studies, "compare", lambda *a, **k: compared.append(a[2].domain) or real_compare(*a, **k))

    df = C.run(C.config(GRID, workers=1), store=store).rows  # in this process, where the counters are
    assert len(built) == 4 and len(compared) == 4 * 3  # 2 sources x 2 seeds; 3 eval texts each
    assert len(df) == 12 and set(df["eval_domain"]) == {"prose", "chat", "code"}
    assert (df["in_domain"] == (df["source"] == df["eval_domain"])).all()
    built.clear(), compared.clear()
    with monkeypatch.context() as warm:
        warm.setattr(C.diagnostics, "inspect", lambda *a, **k: pytest.fail("diagnosed again"))
        refuse_loading(warm)
        rerun = C.run(C.config(GRID, workers=1), store=store)
    again = rerun.rows
    assert built == [] and compared == []
    cols = ["method", "source", "seed", "eval_domain", "kld_mean"]
    assert again[cols].equals(df[cols])
    # The kept diagnostics are the direct ones, their dicts in the same order.
    grid = C.config(GRID)
    direct = diagnostics.inspect("prose", *grid.center, tokenizer=tiny.tokenizer, methods=grid.methods,
                                 eval_texts=grid.eval_texts)
    assert rerun.sets["prose"] == direct
    assert list(rerun.sets["prose"].summary()) == list(direct.summary())
    wider = C.run(C.config(GRID, seeds=[0, 1, 2], workers=1), store=store).rows
    assert [c.seed for c in built] == [2, 2] and len(compared) == 6 and len(wider) == 18

    mean, spread = C.source_matrix(wider, "fp8_static")
    assert list(mean.index) == ["prose", "chat"] and (spread.to_numpy() >= 0).all()
    assert C.findings(wider)[0].startswith("**fp8_static**")
    assert len(C.cost_table(wider)) == 6


def test_parallel_sweep_fills_the_cache_the_serial_one_reads(store_with_tiny, tmp_path, monkeypatch) -> None:
    from qkit.studies import quantization_methods as studies

    store = store_with_tiny(tmp_path)
    df = C.run(C.config(GRID, workers=2), store=store).rows
    assert len(set(df["checkpoint"])) == 4 and df["kld_mean"].gt(0).all()
    monkeypatch.setattr(llmcompressor_backend, "build", lambda *a, **k: pytest.fail("quantized again"))
    monkeypatch.setattr(studies, "compare", lambda *a, **k: pytest.fail("evaluated again"))
    again = C.run(C.config(GRID, workers=2), store=store).rows  # nothing missing: no worker starts
    assert again["kld_mean"].equals(df["kld_mean"])


def test_a_workers_error_reaches_the_parent_with_its_fix() -> None:
    import pickle

    from qkit.core.errors import QkitError

    # The pool pickles a worker's exception; an error that cannot be rebuilt breaks the whole pool instead.
    err = pickle.loads(pickle.dumps(QkitError("too few chunks", "raise n_tokens")))
    assert isinstance(err, QkitError) and (err.problem, err.fix) == ("too few chunks", "raise n_tokens")
    assert str(err) == "too few chunks. Fix: raise n_tokens"
