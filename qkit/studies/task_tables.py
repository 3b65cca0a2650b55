"""The task study's analysis: per-task and per-family tables with paired bootstrap CIs, flips, findings and
timings, from a :class:`qkit.studies.task_sensitivity.Result` (its item rows, KLD rows and meta)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pandas as pd

from qkit.evaluation import metrics, tasks
from qkit.evaluation.tasks import scoring
from qkit.evaluation.tasks import user as user_tasks
from qkit.quant import variants

BASELINE = variants.BASELINE
# Below this many paired items a percentile bootstrap CI is too unreliable to conclude from (with 4 items
# there are only 35 distinct resamples): findings say so instead of calling a change real.
MIN_ITEMS = 10


class Result(Protocol):
    """What the tables read of :class:`qkit.studies.task_sensitivity.Result`."""

    items: pd.DataFrame  # one row per (method, task, item): method, task, family, id, score, weight, output
    kld: pd.DataFrame  # one row per (method, task): kld_mean, top1_agreement_pct, kld_tokens
    meta: dict  # methods, tasks, seconds per "method/task"


def _paired(res: Result, method: str, task_filter: Callable[[tasks.Task], bool] | None,
            group: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Baseline and `method` scores on the items both have, and the items' weights."""
    df = res.items
    sel = df[group] == key
    base = df[(df["method"] == BASELINE) & sel].set_index(["task", "id"])
    quant = df[(df["method"] == method) & sel].set_index(["task", "id"])["score"]
    if task_filter is not None:
        keep = [t for t in base.index.get_level_values(0).unique() if task_filter(tasks.get_task(t))]
        base, quant = base[base.index.get_level_values(0).isin(keep)], quant[quant.index.get_level_values(0).isin(keep)]
    common = base.index.intersection(quant.index)
    weight = base.loc[common]["weight"] if "weight" in base else pd.Series(1.0, index=common)
    return (base.loc[common]["score"].to_numpy(float), quant.loc[common].to_numpy(float),
            weight.fillna(1.0).to_numpy(float))


def compare_scores(base: np.ndarray, quant: np.ndarray, *, higher_is_better: bool = True, binary: bool = True,
                   seed: int = 0, weights: np.ndarray | None = None, aggregation: str = "mean") -> dict:
    """Score, recovery, paired-bootstrap CI of the difference and flips for one set of paired items.
    A rolling-likelihood task's scores are per-item NLL per unit with ``weights`` (units per item), and
    its score is lm-eval's ``aggregation`` of them (:func:`qkit.evaluation.tasks.scoring.weighted_score`)."""
    if aggregation != "mean" and base.size:
        diff, low, high = scoring.weighted_diff_ci(quant, base, weights, aggregation, seed=seed)
        out: dict[str, Any] = {"n": int(base.size), "score_base": scoring.weighted_score(base, weights, aggregation),
                               "score": scoring.weighted_score(quant, weights, aggregation)}
    else:
        out = {"n": int(base.size), "score_base": float(base.mean()) if base.size else np.nan,
               "score": float(quant.mean()) if quant.size else np.nan}
        diff, low, high = (metrics.mean_ci(quant, paired_with=base, seed=seed) if base.size
                           else (np.nan, np.nan, np.nan))
    out.update(diff=diff, diff_low=low, diff_high=high)
    out["recovery_pct"], out["recovery_low"], out["recovery_high"] = metrics.recovery_ci(
        out["score_base"], out["score"], diff, low, high, higher_is_better)
    if binary and base.size:
        out.update({k: v for k, v in metrics.flips(base > 0.5, quant > 0.5).items() if k != "n"})
    return out


def task_table(res: Result, seed: int = 0) -> pd.DataFrame:
    """One row per (method, task)."""
    rows = []
    for method in res.meta["methods"]:
        for name in res.meta["tasks"]:
            task = tasks.get_task(name)
            base, quant, weights = _paired(res, method, None, "task", name)
            row = {"method": method, "task": name, "family": task.family, "metric": task.metric,
                   **compare_scores(base, quant, higher_is_better=task.higher_is_better, binary=task.binary,
                                    seed=seed, weights=weights, aggregation=task.aggregation)}
            k = res.kld[(res.kld["method"] == method) & (res.kld["task"] == name)] if len(res.kld) else res.kld
            row["kld_mean"] = float(k["kld_mean"].iloc[0]) if len(k) else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def family_table(res: Result, seed: int = 0) -> pd.DataFrame:
    """One row per (method, family): the items of the family's score tasks pooled (the likelihood task,
    on another scale, is left out); KLD is the mean over the family's tasks."""
    by_task = task_table(res, seed)
    rows = []
    for method in res.meta["methods"]:
        for family in dict.fromkeys(tasks.get_task(t).family for t in res.meta["tasks"]):
            base, quant, _ = _paired(res, method, lambda t: t.in_family_score, "family", family)
            if not base.size:
                continue
            fam_tasks = [t for t in res.meta["tasks"] if tasks.get_task(t).family == family
                         and tasks.get_task(t).in_family_score]
            binary = all(tasks.get_task(t).binary for t in fam_tasks)
            kld = by_task[(by_task["method"] == method) & (by_task["family"] == family)]["kld_mean"]
            rows.append({"method": method, "family": family, "tasks": ", ".join(fam_tasks),
                         **compare_scores(base, quant, binary=binary, seed=seed), "kld_mean": kld.mean()})
    return pd.DataFrame(rows)


def flip_table(res: Result) -> pd.DataFrame:
    """Items whose correctness changed, per method and right/wrong task."""
    df = task_table(res)
    df = df[df["task"].map(lambda t: tasks.get_task(t).binary)]
    cols = ["method", "task", "n", "score_base", "score", "correct_to_wrong", "wrong_to_correct", "flips_pct"]
    # A run without right/wrong tasks has no flip columns at all: an empty table, not a KeyError.
    df = df.reindex(columns=cols)
    out = df.assign(score_base=100 * df["score_base"], score=100 * df["score"])
    out = out.astype({"correct_to_wrong": int, "wrong_to_correct": int}).round(1)
    return out.rename(columns={"score_base": "baseline %", "score": "quantized %"}).set_index(["method", "task"])


def findings(res: Result, seed: int = 0) -> list[str]:
    """What the data shows, one sentence per method and family, worded by the CIs; then the seed's claim
    (arithmetic, code and long context lose more than summarization) checked against them."""
    fam = family_table(res, seed)
    if fam.empty:
        return ["No family has a pooled score in this run: likelihood tasks are shown per task only (see the "
                "per-task table); add a scored task of the family to compare families."]
    lines = []
    for method, g in fam.groupby("method", sort=False):
        parts = []
        for _, r in g.iterrows():
            pp = f"{100 * r['diff']:+.1f} pp [{100 * r['diff_low']:+.1f}, {100 * r['diff_high']:+.1f}]"
            if r["score_base"] == 0 and r["score"] == 0:
                parts.append(f"{r['family']}: baseline and {method} both score 0 on {r['n']} items, so this "
                             "model cannot show a loss here")
            elif np.isnan(r["diff_low"]) or r["n"] < MIN_ITEMS:
                parts.append(f"{r['family']}: {pp} on {r['n']} item(s), too few to conclude (fewer than "
                             f"{MIN_ITEMS}; run more items or the full profile)")
            elif r["diff_high"] < 0:
                parts.append(f"{r['family']}: loses {pp}, a loss the 95% CI excludes zero from")
            elif r["diff_low"] > 0:
                parts.append(f"{r['family']}: gains {pp} (CI above zero)")
            elif r["diff_low"] == r["diff_high"] == 0:
                parts.append(f"{r['family']}: the same score on every one of {r['n']} items")
            else:
                # The half-width: how large a change this run could have seen ("no difference" is not "no effect").
                half = 100 * (r["diff_high"] - r["diff_low"]) / 2
                parts.append(f"{r['family']}: {pp}, no difference detectable on {r['n']} items (the CI spans "
                             f"zero; a change beyond about ±{half:.0f} pp, its half-width, would show)")
        lines.append(f"**{method}** — " + "; ".join(parts) + ".")
        lines.append(_claim(method, g))
    return lines


def _claim(method: str, g: pd.DataFrame) -> str:
    summ = g[g["family"] == "summarization"]
    others = g[g["family"].isin(["arithmetic", "code", "long_context"])]
    if summ.empty or others.empty:
        return f"*{method}: the claim needs summarization and at least one other family in the run.*"
    s = summ.iloc[0]
    if s["score_base"] == 0:
        return f"*{method}: the baseline scores 0 on summarization, so there is no loss to compare against.*"
    worse, overlap, better, floor, few = [], [], [], [], []
    for _, r in others.iterrows():
        if r["score_base"] == 0:
            floor.append(r["family"])
        elif min(r["n"], s["n"]) < MIN_ITEMS or np.isnan(r["diff_low"]) or np.isnan(s["diff_low"]):
            few.append(r["family"])
        elif r["diff_high"] < s["diff_low"]:
            worse.append(r["family"])
        elif r["diff_low"] > s["diff_high"]:
            better.append(r["family"])
        else:
            overlap.append(r["family"])
    out = [f"*{method} against the claim:*"]
    if worse:
        out.append(f"{', '.join(worse)} lost more than summarization, with non-overlapping CIs.")
    if better:
        out.append(f"{', '.join(better)} lost less than summarization, with non-overlapping CIs.")
    if overlap:
        out.append(f"For {', '.join(overlap)} the CIs overlap summarization's: this run cannot tell them apart.")
    if few and s["n"] < MIN_ITEMS:
        out.append(f"{', '.join(few)}: not compared, summarization has too few items ({s['n']}, fewer than "
                   f"{MIN_ITEMS}).")
    elif few:
        out.append(f"{', '.join(few)}: not compared, too few items (fewer than {MIN_ITEMS} in a family).")
    if floor:
        out.append(f"{', '.join(floor)}: not compared, the baseline scores 0.")
    return " ".join(out)


def _ci_text(r: pd.Series, scale: float = 100, digits: int = 1) -> str:
    text = f"{scale * r['diff']:+.{digits}f}"
    if np.isnan(r["diff_low"]):
        return text
    return f"{text} [{scale * r['diff_low']:+.{digits}f}, {scale * r['diff_high']:+.{digits}f}]"


def timing_table(res: Result) -> pd.DataFrame:
    """Seconds per model and task, as each item's batch took where it was computed (in this run or the one
    that cached it, in whichever process ran its cell); blank for items cached before qkit timed them."""
    rows = [{"model": k.split("/")[0], "task": k.split("/")[1], "seconds": v} for k, v in res.meta["seconds"].items()]
    out = pd.DataFrame(rows).pivot(index="model", columns="task", values="seconds")
    out = out.reindex(index=[BASELINE, *res.meta["methods"]], columns=res.meta["tasks"])
    out["total"] = out.sum(axis=1)
    return out.round(1)


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """A family or task table as people read it: scores in %, the change in points with its 95% CI,
    recovery, flips and KLD. Likelihood rows (nats per byte) are shown as they are, not in %."""
    rows = []
    for _, r in df.iterrows():
        # Scores are fractions shown in %; likelihoods and perplexities as they are.
        pct = r.get("metric") not in ("nll_per_byte", *user_tasks.ROLLING_AGGREGATION)
        scale, digits = (100, 1) if pct else (1, 4)
        rows.append({
            "method": r["method"], ("task" if "task" in r else "family"): r.get("task", r.get("family")),
            "items": r["n"],
            "baseline": f"{scale * r['score_base']:.{digits}f}",
            "quantized": f"{scale * r['score']:.{digits}f}",
            "change [95% CI]": _ci_text(r, scale, digits),
            "recovery %": "-" if np.isnan(r["recovery_pct"]) else f"{r['recovery_pct']:.1f}",
            "flips c→w / w→c": ("-" if np.isnan(r.get("correct_to_wrong", np.nan)) else
                                f"{r['correct_to_wrong']:.0f} / {r['wrong_to_correct']:.0f}"),
            "KLD": f"{r['kld_mean']:.4f}",
        })
    out = pd.DataFrame(rows)
    return out.set_index(list(out.columns[:2])) if len(out) else out


def flip_examples(res: Result, n: int = 6) -> pd.DataFrame:
    """Items whose correctness flipped, with both generations, to read what changed."""
    df = res.items
    base = df[df["method"] == BASELINE].set_index(["task", "id"])
    rows = []
    for (method, task_name), g in df[df["method"] != BASELINE].groupby(["method", "task"], sort=False):
        if not tasks.get_task(task_name).binary:
            continue
        for _, r in g.iterrows():
            b = base.loc[(task_name, r["id"])]
            if (b["score"] > 0.5) != (r["score"] > 0.5):
                rows.append({"method": method, "task": task_name, "item": r["id"],
                             "flip": "correct → wrong" if b["score"] > 0.5 else "wrong → correct",
                             "baseline output": _text(b["output"]), "quantized output": _text(r["output"])})
    return pd.DataFrame(rows).head(n)


def _text(output: Any) -> str:
    # A task scored by likelihood (HellaSwag, TruthfulQA) generates nothing: its output is None, or NaN
    # once pandas has held it.
    return output[:160] if isinstance(output, str) else ""
