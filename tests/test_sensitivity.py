"""Task-sensitivity analysis on hand-made results with known answers, and the cached run on `tiny`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qkit.core.errors import QkitError
from qkit.core.store import Kind, Store
from qkit.evaluation import tasks
from qkit.studies import cells, plots
from qkit.studies import task_sensitivity as S
from qkit.studies import task_tables as T


def _result(scores: dict[tuple[str, str], list[float]], methods=("m",)) -> S.Result:
    """A study result from per-(method, task) item scores; item ids are positions."""
    rows = [{"method": m, "task": t, "family": tasks.get_task(t).family, "id": str(i), "score": s, "output": f"o{s}"}
            for (m, t), values in scores.items() for i, s in enumerate(values)]
    task_names = list(dict.fromkeys(t for _, t in scores))
    kld = pd.DataFrame([{"method": m, "task": t, "kld_mean": 0.01} for m in methods for t in task_names])
    return S.Result(S.PROFILES["quick"], pd.DataFrame(rows), kld, {"methods": list(methods), "tasks": task_names})


def test_compare_scores_known_flips_difference_and_recovery() -> None:
    base = np.array([1, 1, 0, 0, 1, 1, 1, 1], float)
    quant = np.array([1, 0, 1, 0, 1, 1, 0, 1], float)
    out = T.compare_scores(base, quant)
    assert (out["n"], out["score_base"], out["score"]) == (8, 0.75, 0.625)
    assert out["diff"] == pytest.approx(-0.125)
    assert (out["correct_to_wrong"], out["wrong_to_correct"], out["flips_pct"]) == (2, 1, 37.5)
    assert out["recovery_pct"] == pytest.approx(100 * 0.625 / 0.75)
    assert out["diff_low"] <= out["diff"] <= out["diff_high"]


def test_paired_ci_collapses_when_every_item_moves_alike_and_excludes_zero_for_a_clear_loss() -> None:
    base = np.linspace(0.2, 0.9, 30)
    out = T.compare_scores(base, base - 0.1, binary=False)
    # Each difference is exactly -0.1: the paired bootstrap has nothing to resample; unpaired would not collapse.
    assert out["diff_low"] == pytest.approx(-0.1) and out["diff_high"] == pytest.approx(-0.1)
    assert "correct_to_wrong" not in out


def test_recovery_is_undefined_when_the_baseline_scores_zero() -> None:
    out = T.compare_scores(np.zeros(5), np.array([0, 0, 1, 0, 0.0]))
    assert np.isnan(out["recovery_pct"]) and out["wrong_to_correct"] == 1


def test_lower_is_better_recovery() -> None:
    out = T.compare_scores(np.array([2.0, 2.0]), np.array([2.5, 2.5]), higher_is_better=False, binary=False)
    assert out["recovery_pct"] == pytest.approx(80.0)


def test_tables_pair_items_by_id_and_pool_families() -> None:
    res = _result({
        ("baseline", "qkit_gsm8k"): [1, 1, 0, 0], ("m", "qkit_gsm8k"): [1, 0, 0, 0],
        ("baseline", "qkit_arithmetic"): [1, 1], ("m", "qkit_arithmetic"): [1, 1],
        ("baseline", "qkit_xsum_ll"): [2.0, 3.0], ("m", "qkit_xsum_ll"): [2.5, 3.5],
        ("baseline", "qkit_xsum"): [0.2, 0.4], ("m", "qkit_xsum"): [0.2, 0.4],
    })
    fam = S.family_table(res).set_index("family")
    assert fam.loc["arithmetic", "n"] == 6
    assert fam.loc["arithmetic", "score_base"] == pytest.approx(4 / 6)
    assert fam.loc["arithmetic", "correct_to_wrong"] == 1
    # the likelihood task, on another scale, stays out of the summarization family
    assert fam.loc["summarization", "n"] == 2 and fam.loc["summarization", "diff"] == 0
    by_task = S.task_table(res).set_index("task")
    assert by_task.loc["qkit_xsum_ll", "recovery_pct"] == pytest.approx(100 * 2.5 / 3.0)
    flips = S.flip_table(res)
    assert set(flips.index.get_level_values("task")) == {"qkit_gsm8k", "qkit_arithmetic"}
    assert flips.loc[("m", "qkit_gsm8k"), "correct_to_wrong"] == 1 and flips.loc[("m", "qkit_gsm8k"), "baseline %"] == 50
    ex = S.flip_examples(res)
    assert list(ex["item"]) == ["1"] and ex["flip"].iloc[0] == "correct → wrong"
    shown = S.display_table(fam.reset_index())
    assert shown.loc[("m", "arithmetic"), "baseline"] == "66.7"
    plots.recovery_by_family(fam.reset_index())


def test_a_rolling_likelihood_task_is_scored_by_its_weighted_aggregate(tmp_path) -> None:
    tasks.register(tasks.Task("my_wiki", "my_wiki", "word_perplexity", "mine", "mine", lambda **_: [],
                              binary=False, higher_is_better=False, in_family_score=False,
                              include_path=tmp_path, aggregation="weighted_perplexity"))
    nll_b, nll_q, words = [1.0, 2.0, 3.0], [1.1, 2.0, 3.3], [10.0, 1.0, 5.0]
    rows = [{"method": m, "task": "my_wiki", "family": "my_wiki", "id": str(i), "score": s, "weight": w,
             "output": None} for m, scores in (("baseline", nll_b), ("m", nll_q)) for i, (s, w) in
            enumerate(zip(scores, words))]
    kld = pd.DataFrame([{"method": "m", "task": "my_wiki", "kld_mean": 0.01}])
    res = S.Result(S.PROFILES["quick"], pd.DataFrame(rows), kld, {"methods": ["m"], "tasks": ["my_wiki"]})
    row = S.task_table(res).set_index("task").loc["my_wiki"]
    # Perplexity over all words, as lm-eval aggregates: exp(sum(nll * words) / sum(words)), not a mean of items.
    assert row["score_base"] == pytest.approx(np.exp((10 * 1.0 + 2.0 + 5 * 3.0) / 16))
    assert row["score"] == pytest.approx(np.exp((10 * 1.1 + 2.0 + 5 * 3.3) / 16))
    assert row["recovery_pct"] == pytest.approx(100 * row["score_base"] / row["score"])
    assert row["diff_low"] <= row["diff"] <= row["diff_high"] and np.isnan(row.get("correct_to_wrong", np.nan))
    assert S.family_table(res).empty  # perplexity is never pooled with accuracies
    shown = S.display_table(S.task_table(res))
    assert shown.loc[("m", "my_wiki"), "baseline"] == f"{row['score_base']:.4f}"


def test_findings_follow_the_cis_not_the_claim() -> None:
    n = 40
    clear = _result({("baseline", "qkit_gsm8k"): [1] * n, ("m", "qkit_gsm8k"): [1] * 10 + [0] * 30,
                     ("baseline", "qkit_xsum"): [0.5] * n, ("m", "qkit_xsum"): [0.5] * n})
    text = "\n".join(S.findings(clear))
    assert "arithmetic: loses -75.0 pp" in text and "excludes zero" in text
    assert "arithmetic lost more than summarization, with non-overlapping CIs" in text
    assert "summarization: the same score on every one of 40 items" in text

    rng = np.random.default_rng(0)
    noisy = _result({("baseline", "qkit_gsm8k"): list(rng.integers(0, 2, n)),
                     ("m", "qkit_gsm8k"): list(rng.integers(0, 2, n)),
                     ("baseline", "qkit_xsum"): list(rng.random(n)), ("m", "qkit_xsum"): list(rng.random(n))})
    text = "\n".join(S.findings(noisy))
    assert "the CIs overlap summarization's: this run cannot tell them apart" in text
    assert "lost more than" not in text
    arith = T.family_table(noisy).set_index("family").loc["arithmetic"]
    assert arith["diff_low"] < 0 < arith["diff_high"]  # spans zero, so the resolvable size is stated
    half = 100 * (arith["diff_high"] - arith["diff_low"]) / 2
    assert f"a change beyond about ±{half:.0f} pp, its half-width, would show" in text

    floor = _result({("baseline", "qkit_humaneval"): [0] * n, ("m", "qkit_humaneval"): [0] * n,
                     ("baseline", "qkit_xsum"): [0.5] * n, ("m", "qkit_xsum"): [0.4] * n})
    text = "\n".join(S.findings(floor))
    assert "code: not compared, the baseline scores 0" in text and "lost less" not in text

    short = _result({("baseline", "qkit_gsm8k"): [1] * n, ("m", "qkit_gsm8k"): [1] * 10 + [0] * 30,
                     ("baseline", "qkit_xsum"): [0.5] * 4, ("m", "qkit_xsum"): [0.4] * 4})
    claim = S.findings(short)[1]  # the short family is summarization, not arithmetic
    assert "arithmetic: not compared, summarization has too few items (4, fewer than 10)" in claim

    zero = _result({("baseline", "qkit_humaneval"): [0] * 5, ("m", "qkit_humaneval"): [0] * 5})
    assert "both score 0 on 5 items, so this model cannot show a loss" in S.findings(zero)[0]
    assert "needs summarization" in S.findings(zero)[1]


def test_spread_covers_the_task() -> None:
    assert S.spread(298, 4) == [0, 99, 198, 297]
    assert S.spread(5, 5) == [0, 1, 2, 3, 4]


def test_get_items_computes_only_what_is_missing_and_resumes(tmp_path) -> None:
    store, calls = Store(tmp_path), []

    def compute(ids):
        calls.append(list(ids))
        if "boom" in ids:
            raise RuntimeError("interrupted")
        return {i: {"score": len(i)} for i in ids}

    assert store.get_items(Kind("t", 1), {"a": 1}, ["x", "yy"], compute, batch=1) == {"x": {"score": 1},
                                                                                 "yy": {"score": 2}}
    with pytest.raises(RuntimeError):
        store.get_items(Kind("t", 1), {"a": 1}, ["x", "zzz", "boom"], compute, batch=1)
    calls.clear()
    got = store.get_items(Kind("t", 1), {"a": 1}, ["zzz", "x", "yy"], compute, batch=1)
    assert calls == [] and list(got) == ["zzz", "x", "yy"]  # "zzz" was saved before "boom" failed
    path = store.path(Kind("t", 1), {"a": 1}) / "items.json"
    path.write_text("{truncated")
    assert store.get_items(Kind("t", 1), {"a": 1}, ["x"], compute) == {"x": {"score": 1}}
    assert path.with_suffix(".json.bad").exists()


def test_bad_profile_and_method_fail_before_any_work() -> None:
    with pytest.raises(QkitError, match="unknown profile 'fast'.*quick, full"):
        S.config("fast")
    with pytest.raises(QkitError, match="unknown quantization method"):
        S.run(S.config(model="tiny", methods=["fp9"]))


TINY_PROFILE = S.Config(max_items=2, context_lengths=(256,), depths=(0.0, 1.0), per_cell=1, kld_tokens=256,
                        max_gen_toks=8, batch_size=2, model="tiny", methods=("fp8_dynamic",), workers=1)


def test_run_on_tiny_caches_per_item_and_reuses_the_baseline(tiny, store_with_tiny, tmp_path, monkeypatch,
                                                              refuse_loading) -> None:
    store = store_with_tiny(tmp_path)  # a fresh store for the results
    calls = []
    real, real_items = tasks.evaluate, tasks.load_items

    def counting(model, tokenizer, task, indices, **kw):
        calls.append((task.name, tuple(indices)))
        return real(model, tokenizer, task, indices, **kw)

    monkeypatch.setattr(tasks, "evaluate", counting)
    names = ["qkit_arithmetic", "qkit_passkey"]
    res = S.run(S.config(TINY_PROFILE, methods=["fp8_dynamic"], tasks=names), store=store)
    assert len(calls) == 4  # baseline and fp8_dynamic, two tasks
    assert set(res.items["method"]) == {"baseline", "fp8_dynamic"} and len(res.items) == 8
    assert list(res.kld["task"]) == names and (res.kld["kld_mean"] >= 0).all()
    # qkit's score is lm-eval's: the cached per-item scores average to what lm-eval aggregated
    cached = res.items[(res.items["method"] == "baseline") & (res.items["task"] == "qkit_arithmetic")]["score"]
    _, aggregate = real(tiny.model, tiny.tokenizer, tasks.get_task("qkit_arithmetic"), [0, 297],
                        max_length=tiny.info["max_length"], max_gen_toks=8, batch_size=2)
    assert cached.mean() == pytest.approx(aggregate)

    calls.clear()
    with monkeypatch.context() as warm:
        warm.setattr(tasks, "load_items", lambda task, *a, **k: pytest.fail(f"made {task.name}'s items again")
                     if task.needs_tokenizer else real_items(task, *a, **k))
        refuse_loading(warm)
        again = S.run(S.config(TINY_PROFILE, methods=["fp8_dynamic"], tasks=names), store=store)
    assert calls == []
    pd.testing.assert_frame_equal(again.items, res.items)

    S.run(S.config(TINY_PROFILE, methods=["fp8_dynamic", "w4a16_rtn"], tasks=names), store=store)
    assert [c[0] for c in calls] == names  # only the new method ran; the baseline came from the cache

    calls.clear()
    S.run(S.config(TINY_PROFILE, methods=["fp8_dynamic"], tasks=["qkit_arithmetic"], limit=3), store=store)
    assert calls == [("qkit_arithmetic", (148,))] * 2  # 3 spread items: the 2 cached ends + the middle one
    with pytest.raises(QkitError, match="limit 3 is more than the 2 items of qkit_passkey"):
        S.run(S.config(TINY_PROFILE, methods=["fp8_dynamic"], tasks=["qkit_passkey"], limit=3), store=store)


@pytest.mark.slow
def test_cells_in_worker_processes_give_the_same_items_and_a_warm_rerun_starts_none(store_with_tiny, tmp_path,
                                                                                    monkeypatch) -> None:
    config = S.config(TINY_PROFILE, methods=["fp8_dynamic", "w4a16_rtn"], tasks=["qkit_arithmetic"])
    here = S.run(config, store=store_with_tiny(tmp_path / "here"))
    pooled_store = store_with_tiny(tmp_path / "pooled")
    pooled = S.run(S.config(config, workers=2), store=pooled_store)
    columns = ["method", "task", "id", "score", "output"]
    pd.testing.assert_frame_equal(pooled.items[columns], here.items[columns])
    pd.testing.assert_frame_equal(pooled.kld, here.kld)
    assert (S.timing_table(pooled)["total"] > 0).all()  # each cell's seconds, recorded where it ran

    def no_workers(*args, **kwargs):
        raise AssertionError("a warm rerun started worker processes")

    monkeypatch.setattr(cells.LocalExecutor, "run", no_workers)
    again = S.run(S.config(config, workers=2), store=pooled_store)
    pd.testing.assert_frame_equal(again.items, pooled.items)


def test_flip_examples_of_a_likelihood_task_show_no_generation() -> None:
    """HellaSwag is scored by likelihood: its items have no output, None or NaN once in a frame (the
    default model's quick run on SmolLM2 failed here on a NaN)."""
    res = _result({("baseline", "qkit_hellaswag"): [1, 0], ("m", "qkit_hellaswag"): [0, 0]})
    res.items["output"] = [None, float("nan"), None, float("nan")]
    ex = S.flip_examples(res)
    assert list(ex["item"]) == ["0"] and (ex["baseline output"] == "").all() and (ex["quantized output"] == "").all()
