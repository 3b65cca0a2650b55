"""Property tests: the functions that turn study results into tables, findings and figures accept any
result a run can produce (ties, all-equal items, zero baselines, single items, missing CIs), and every
interval they report contains its point."""
from __future__ import annotations

import io
import math
import re
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkit import data
from qkit.data.diagnostics import diagnose
from qkit.evaluation import monitor, tasks
from qkit.studies import calibration_data as calibration
from qkit.studies import kv_cache as kvcache
from qkit.studies import plots
from qkit.studies import quantization_methods as studies
from qkit.studies import task_sensitivity as S
from qkit.studies import task_tables as T

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Scores as tasks give them: right/wrong, or a few distinct values (ties are the rule, not the exception).
binary_scores = st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=30)
graded = st.sampled_from([0.0, 0.125, 0.25, 0.5, 1 / 3, 1.0])
small_floats = st.floats(0.0, 3.0, allow_nan=False, width=32)


def _contains(point: float, low: float, high: float) -> bool:
    """low ≤ point ≤ high, or no CI at all (both bounds NaN)."""
    if math.isnan(low) and math.isnan(high):
        return True
    return low <= point <= high


def _draw(fig) -> None:
    """Render the figure for real: some matplotlib errors (log scales, bad limits) only show on drawing."""
    fig.savefig(io.BytesIO(), format="png", dpi=30)
    plt.close(fig)


@st.composite
def paired(draw, values=st.sampled_from([0.0, 1.0])):
    n = draw(st.integers(1, 30))
    base = draw(st.lists(values, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["random", "same", "all equal"]))
    quant = base if kind == "same" else [base[0]] * n if kind == "all equal" else draw(
        st.lists(values, min_size=n, max_size=n))
    return np.array(base, float), np.array(quant, float)


@PROPERTY
@given(paired(), st.integers(0, 3))
def test_compare_scores_brackets_the_change_and_the_recovery(pair, seed) -> None:
    base, quant = pair
    out = T.compare_scores(base, quant, seed=seed)
    assert _contains(out["diff"], out["diff_low"], out["diff_high"])
    assert _contains(out["recovery_pct"], out["recovery_low"], out["recovery_high"])
    assert math.isnan(out["recovery_pct"]) == (out["score_base"] == 0)
    assert out["correct_to_wrong"] + out["wrong_to_correct"] <= out["n"]


@PROPERTY
@given(paired(st.floats(0.05, 5.0, allow_nan=False)))
def test_lower_is_better_recovery_is_bracketed(pair) -> None:
    base, quant = pair
    out = T.compare_scores(base, quant, higher_is_better=False, binary=False)
    assert _contains(out["recovery_pct"], out["recovery_low"], out["recovery_high"])


# One task per family, the likelihood task beside its generation task.
TASKS = ("qkit_arithmetic", "qkit_gsm8k", "qkit_humaneval", "qkit_passkey", "qkit_xsum", "qkit_xsum_ll")


@st.composite
def sensitivity_results(draw) -> S.Result:
    methods = draw(st.lists(st.sampled_from(["fp8_dynamic", "w8a8_int8", "w4a16_gptq"]), min_size=1, max_size=3,
                            unique=True))
    chosen = draw(st.lists(st.sampled_from(TASKS), min_size=1, max_size=len(TASKS), unique=True))
    rows, kld = [], []
    for name in chosen:
        task = tasks.get_task(name)
        values = (st.sampled_from([0.0, 1.0]) if task.binary else
                  st.floats(0.5, 3.0, allow_nan=False) if name.endswith("_ll") else graded)
        base, _ = draw(paired(values))
        for method in ["baseline", *methods]:
            scores = base if method == "baseline" else draw(st.one_of(
                st.just(list(base)), st.lists(values, min_size=len(base), max_size=len(base))))
            rows += [{"method": method, "task": name, "family": task.family, "id": str(i), "score": float(s),
                      "output": "x"} for i, s in enumerate(scores)]
            if method != "baseline":
                kld.append({"method": method, "task": name, "kld_mean": draw(small_floats)})
    return S.Result(S.PROFILES["quick"], pd.DataFrame(rows), pd.DataFrame(kld), {"methods": methods, "tasks": chosen})


@PROPERTY
@given(sensitivity_results())
def test_task_sensitivity_tables_findings_and_figure(res) -> None:
    for table in (S.task_table(res), S.family_table(res)):
        for _, r in table.iterrows():
            assert _contains(r["diff"], r["diff_low"], r["diff_high"])
            assert _contains(r["recovery_pct"], r["recovery_low"], r["recovery_high"])
        S.display_table(table)
    S.flip_table(res)
    S.flip_examples(res)
    assert S.findings(res)
    fam = S.family_table(res)
    if len(fam):
        _draw(plots.recovery_by_family(fam))


def test_the_rounding_tie_that_broke_the_report_draws() -> None:
    """w8a8_int8 on arithmetic: baseline 1/12, quantized 1/12, the same item right; recovery was
    100·score/base and its bounds 100·(1 + diff/base), which rounded 1.4e-14 apart."""
    base = np.zeros(12)
    base[3] = 1
    out = T.compare_scores(base, base.copy())
    assert out["recovery_low"] <= out["recovery_pct"] <= out["recovery_high"]
    fam = pd.DataFrame([{"method": "w8a8_int8", "family": "arithmetic", **out}])
    _draw(plots.recovery_by_family(fam))


@st.composite
def evaluation_results(draw) -> dict:
    """What evaluation.compare returns, on chunks of equal length (ties and single chunks included)."""
    n = draw(st.integers(1, 8))
    chunk = lambda values: draw(st.lists(values, min_size=n, max_size=n))  # noqa: E731
    nll_base = chunk(st.floats(1.0, 5.0, allow_nan=False))
    nll = draw(st.one_of(st.just(nll_base), st.just([nll_base[0]] * n), st.just(chunk(st.floats(1.0, 6.0)))))
    kld = draw(st.one_of(st.just([0.0] * n), st.just(chunk(small_floats))))
    top1 = chunk(st.sampled_from([0.0, 0.5, 0.75, 1.0]))
    return {"n_tokens": 64 * n, "ppl_base": math.exp(np.mean(nll_base)), "ppl_quant": math.exp(np.mean(nll)),
            "kld_mean": float(np.mean(kld)), "kld_p99": float(np.max(kld)), "top1_agreement_pct": 100 * float(np.mean(top1)),
            "mean_dp_pct": 0.0, "ppl_recovery_pct": 100.0, "chunk_kld": kld, "chunk_nll": nll,
            "chunk_nll_base": nll_base, "chunk_top1": top1}


@PROPERTY
@given(st.lists(evaluation_results(), min_size=1, max_size=5), st.integers(0, 3))
def test_methods_rows_tables_and_figures(results, seed) -> None:
    rows = []
    for i, result in enumerate(results):
        row = studies.result_row(result, seed)
        for metric in ("kld_mean", "ppl_quant", "top1_pct", "delta_nll"):
            assert _contains(row[metric], row[f"{metric}_low"], row[f"{metric}_high"]), metric
        rows.append({"method": f"m{i}", "size_mb": 100.0 + 10 * (i % 2), "weight_format": "INT4",
                     "reduction_vs_bf16": 2.0, "quant_seconds": 1.0, "error": None, **row})
    rows.append({"method": "broken", "error": "RuntimeError: no kernel"})  # a failed method stays in the table
    df = pd.DataFrame(rows)
    studies.results_table(df)
    _draw(plots.size_vs_kld(df))
    _draw(plots.metric_bars(df, "kld_mean", "KLD", log=True))
    _draw(plots.metric_bars(df, "top1_pct", "top-1"))
    _draw(plots.metric_bars(df, "delta_nll", "ΔNLL"))
    _draw(plots.memory_reduction(df))


@st.composite
def sweeps(draw) -> pd.DataFrame:
    methods = draw(st.lists(st.sampled_from(["w4a16_gptq", "w4a16_awq"]), min_size=1, max_size=2, unique=True))
    sources = tuple(draw(st.lists(st.sampled_from(data.EVAL_DOMAINS), min_size=1, max_size=3, unique=True)))
    seeds = tuple(range(draw(st.integers(1, 2))))
    grid = calibration.Config(methods=tuple(methods), sources=sources, samples=(2, 4), seq_lens=(64, 128),
                            seeds=seeds, center=(4, 128), curve_source=sources[0], eval_tokens=512, ctx=256)
    tie = draw(st.booleans())
    rows = [{"method": m, "source": c.name, "n_samples": c.n_samples, "seq_len": c.seq_len, "seed": c.seed,
             "eval_domain": d, "in_domain": c.name == d, "kld_mean": 0.2 if tie else draw(small_floats),
             "ppl_quant": 30.0, "ppl_base": 25.0, "top1_pct": draw(st.floats(0, 100)), "quant_seconds": 50.0,
             "peak_rss_mb": 1000.0, "rss_growth_mb": draw(st.floats(0, 900)), "checkpoint": f"{m}-{c}"}
            for m in methods for c in grid.configs() for d in data.EVAL_DOMAINS]
    df = pd.DataFrame(rows)
    df.attrs.update(grid=calibration.asdict(grid))
    return df


@PROPERTY
@given(sweeps())
def test_calibration_tables_findings_and_figures(df) -> None:
    for method in dict.fromkeys(df["method"]):
        calibration.source_matrix(df, method)
        for axis in ("n_samples", "seq_len"):
            c = calibration.curve(df, method, axis)
            assert ((c["min"] <= c["mean"]) & (c["mean"] <= c["max"])).all()
    lines = calibration.findings(df)
    assert lines
    for line in lines:  # every "no difference" says the spread it could not beat
        assert line.count("no difference") == len(re.findall(r"spread \((?:[-+.e\d]+|nan|inf)\): no difference",
                                                             line))
    calibration.cost_table(df)
    config = calibration.Config(**df.attrs["grid"])
    sets = {s: diagnose([[1, 2, 3] * 8] * 2, eos_id=None, domains=[s] * 2) for s in config.sources}
    result = calibration.Result(config, df, sets)
    assert result.findings() and result.summary().headline
    for name, figure in result.figures().items():
        _draw(figure)


@st.composite
def kv_results(draw) -> kvcache.Result:
    schemes = draw(st.lists(st.sampled_from(["fp8_tensor", "fp8_head", "hqq_int4"]), min_size=1, max_size=3,
                            unique=True))
    n_docs, n_blocks = draw(st.integers(1, 2)), draw(st.integers(1, 12))
    rows = []
    for s in schemes:
        same = draw(st.booleans())
        for d in range(n_docs):
            for b in range(n_blocks):
                # A runtime cache's first chunk is unquantized: exactly 0.
                kld = 0.0 if s == "hqq_int4" and b < 4 else (0.01 if same else draw(small_floats))
                rows.append({"scheme": s, "doc": d, "start": b * kvcache.BLOCK, "kld": kld, "nll": 3.0 + kld,
                             "nll_base": 3.0, "top1": draw(st.sampled_from([0.0, 0.5, 1.0]))})
    return kvcache.Result(kvcache.PROFILES["quick"], pd.DataFrame(rows),
                          pd.DataFrame(columns=["scheme", "task", "length", "depth", "score"]), {})


@PROPERTY
@given(kv_results())
def test_kv_tables_findings_and_figure(res) -> None:
    table = kvcache.by_position(res)
    for _, r in table.iterrows():
        assert _contains(r["kld"], r["low"], r["high"])
    if {"fp8_tensor", "fp8_head"} <= set(res.blocks["scheme"]):
        for _, r in kvcache.compare(res).iterrows():
            assert _contains(r["difference"], r["low"], r["high"])
    kvcache.findings(res)
    _draw(plots.kv_by_position(table))


@st.composite
def drift_logs(draw) -> list[dict]:
    n = draw(st.integers(20, 120))
    flat = draw(st.booleans())
    return [{"line": i + 1, "timestamp": None, "tag": draw(st.sampled_from("ab")), "check": None,
             "top1": 1.0 if flat else draw(st.sampled_from([0.8, 0.9, 1.0])),
             "served_top1": 1.0 if flat else draw(st.sampled_from([0.8, 1.0])),
             "ref_logprob": -1.0, "kld": 0.0 if flat else draw(small_floats)} for i in range(n)]


@PROPERTY
@given(drift_logs(), st.sampled_from([10, 20, 40]))
def test_drift_windows_alerts_and_figure(rows, window) -> None:
    config = monitor.MonitorConfig(window=window, n_permutations=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a log that fills only the baseline warns; it must not fail
        mon = monitor.monitor(rows, config)
    monitor.alert_lines(mon.events)
    monitor.worst(mon)
    _draw(plots.drift_windows(mon.windows, mon.config))

