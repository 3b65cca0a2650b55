"""Drift monitoring of per-request measures: windows against a baseline, change tests, alerts.

**Monitoring** (:func:`monitor`) cuts the requests into windows (a number of requests, or a duration),
compares each window with a baseline window (the first by default) and alerts when a measure moves past
its threshold *and* the change is unlikely to be chance. The thresholds (:class:`MonitorConfig`) are
effect sizes: mean KLD at least 2x the baseline's; agreement (``top1`` or ``served_top1``) down at least
5 points; at least 15% of the window's requests past the baseline's 95th KLD percentile (5% expected).
The reference's log-probability of the served tokens is shown but alerts only when given a threshold:
it depends on the text as much as on the model (on `tiny`, prose and code openings differ by 0.5
nats/token under one and the same deployment), so a change of traffic mix would read as drift.

The change test for a mean is a one-sided permutation test of the window's requests against the
baseline's: requests are the independent units, their KLDs are skewed and heavy-tailed (a t-test's
normal approximation is poor at 10-50 requests), and the permutation test assumes nothing but
exchangeability under no change. A CUSUM would flag a shift
sooner, but it needs the in-control mean and spread known in advance and a tuned slack, and its alarm
belongs to the whole history rather than to a window one can look at. The tail share is tested with an
exact binomial test against the 5% expected. Each test runs at ``alpha`` = 0.01 without correction for
the several measures and windows; requiring the effect size as well keeps false alarms rare (an
unchanged log raises none in the tests), and a stricter ``alpha`` is one setting away.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from qkit.core.errors import QkitError
from qkit.evaluation.metrics import binomial_tail_p, permutation_p

# The measures a window is compared on, and the direction that is worse.
WORSE = {"kld": +1, "top1": -1, "served_top1": -1, "ref_logprob": -1}


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class MonitorConfig:
    """Windows, baseline and alert thresholds; the defaults are argued in the module docstring."""

    window: int | str = 50  # requests per window, or a duration: "30m", "6h", "1d"
    baseline_windows: int = 1  # the first windows, pooled, are the baseline
    kld_ratio: float = 2.0  # window mean KLD / baseline mean KLD
    agreement_drop: float = 0.05  # fall in top1 or served_top1 (a share: 0.05 = 5 points)
    tail_quantile: float = 0.95  # the baseline's KLD percentile that defines the tail ...
    tail_share: float = 0.15  # ... and the share of a window's requests past it that alerts
    # Fall in the reference's mean log-probability of served tokens (nats/token) that alerts; off by default
    # because it moves with the kind of text served as much as with the deployment (see the docstring).
    logprob_drop: float | None = None
    alpha: float = 0.01  # each change test's significance level
    min_requests: int = 10  # a window (or a tag in it) with fewer requests never alerts
    n_permutations: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        self.window_spec()
        if self.baseline_windows < 1 or self.min_requests < 2 or self.n_permutations < 100:
            raise QkitError("baseline_windows must be ≥ 1, min_requests ≥ 2 and n_permutations ≥ 100",
                            "pass larger values")
        if not 0 < self.alpha < 1 or not 0 < self.tail_quantile < 1:
            raise QkitError(f"alpha and tail_quantile must lie in (0, 1), got {self.alpha}, {self.tail_quantile}",
                            "pass e.g. alpha=0.01, tail_quantile=0.95")

    def window_spec(self) -> tuple[str, float]:
        """("requests", N) or ("seconds", S)."""
        w = self.window
        if isinstance(w, str) and w.isdigit():
            w = int(w)
        if isinstance(w, int) and not isinstance(w, bool):
            if w < 2:
                raise QkitError(f"a window of {w} request(s) is too small to compare", "pass --window 20 or more")
            return "requests", w
        m = _DURATION.fullmatch(str(w))
        if not m or float(m.group(1)) <= 0:
            raise QkitError(f"window {w!r} is neither a number of requests nor a duration",
                            "pass e.g. --window 50 (requests) or --window 30m, 6h, 1d")
        return "seconds", float(m.group(1)) * _SECONDS[m.group(2)]


def assign_windows(df: pd.DataFrame, config: MonitorConfig) -> pd.Series:
    """Each request's window index, in log order."""
    kind, size = config.window_spec()
    if kind == "requests":
        return pd.Series(np.arange(len(df)) // int(size), index=df.index)
    if df["timestamp"].isna().any():
        n = int(df["timestamp"].isna().sum())
        raise QkitError(f"time windows need a timestamp on every request, and {n} have none",
                        "log a timestamp (epoch seconds or ISO 8601), or use windows of N requests (--window N)")
    t = df["timestamp"].to_numpy()
    return pd.Series(((t - t.min()) // size).astype(int), index=df.index)


def _compare(base: pd.DataFrame, win: pd.DataFrame, config: MonitorConfig, seed: int) -> dict:
    """A window's measures against the baseline's, with the change tests and the thresholds crossed."""
    out: dict[str, Any] = {"n": len(win)}
    for m in WORSE:
        out[m] = win[m].mean()
    # A tag absent from the baseline window has nothing to be compared with.
    tail = float(np.quantile(base["kld"], config.tail_quantile)) if len(base) else math.nan
    past = int((win["kld"] > tail).sum())
    out["tail_share"] = past / len(win) if len(base) else math.nan
    base_kld = base["kld"].mean() if len(base) else math.nan
    out["kld_ratio"] = out["kld"] / base_kld if base_kld > 0 else (math.inf if base_kld == 0 else math.nan)
    checked = win[win["check"].notna()] if "check" in win else win.iloc[:0]
    if len(checked):
        out["acc_ref"], out["acc_quant"] = checked["correct_ref"].mean(), checked["correct_quant"].mean()
        out["flips"] = int((checked["correct_ref"] != checked["correct_quant"]).sum())
    reasons = []
    if len(win) >= config.min_requests and len(base) >= config.min_requests:
        p = {m: permutation_p(base[m].to_numpy(), win[m].to_numpy(), worse, config.n_permutations, seed)
             for m, worse in WORSE.items()}
        p["tail_share"] = binomial_tail_p(past, len(win), 1 - config.tail_quantile)
        out.update({f"p_{m}": v for m, v in p.items()})
        base_mean = {m: base[m].mean() for m in WORSE}
        crossed = {
            "kld": (out["kld_ratio"] >= config.kld_ratio,
                    f"mean KLD {out['kld']:.3g} is {out['kld_ratio']:.1f}x the baseline's {base_mean['kld']:.3g}"),
            "tail_share": (out["tail_share"] >= config.tail_share,
                           f"{100 * out['tail_share']:.0f}% of requests past the baseline's "
                           f"{100 * config.tail_quantile:.0f}th KLD percentile ({tail:.3g})"),
            "top1": (base_mean["top1"] - out["top1"] >= config.agreement_drop,
                     f"top-1 agreement {100 * out['top1']:.1f}% vs the baseline's {100 * base_mean['top1']:.1f}%"),
            "served_top1": (base_mean["served_top1"] - out["served_top1"] >= config.agreement_drop,
                            f"served tokens the reference's top-1: {100 * out['served_top1']:.1f}% vs the "
                            f"baseline's {100 * base_mean['served_top1']:.1f}%"),
            "ref_logprob": (config.logprob_drop is not None
                            and base_mean["ref_logprob"] - out["ref_logprob"] >= config.logprob_drop,
                            f"reference log-prob of served tokens {out['ref_logprob']:.3f} vs the baseline's "
                            f"{base_mean['ref_logprob']:.3f} nats/token"),
        }
        reasons = [f"{text} (p={p[m]:.4f})" for m, (hit, text) in crossed.items() if hit and p[m] < config.alpha]
    out["alert"] = bool(reasons)
    out["reasons"] = reasons
    return out


@dataclass
class Monitor:
    windows: pd.DataFrame  # one row per window
    tags: pd.DataFrame  # one row per (tag, window), each tag against its own baseline requests
    alerts: list[dict]
    requests: pd.DataFrame  # per-request results with their window
    config: MonitorConfig


def _table(df: pd.DataFrame, config: MonitorConfig, seed: int) -> pd.DataFrame:
    base = df[df["window"] < config.baseline_windows]
    rows = []
    for w, win in df.groupby("window", sort=True):
        row = {"window": int(w), "first_line": int(win["line"].min()), "last_line": int(win["line"].max()),
               "start": win["timestamp"].min(), "end": win["timestamp"].max(),
               "baseline": bool(w < config.baseline_windows)}
        row.update(_compare(base, win, config, seed + int(w)))
        if row["baseline"]:
            row.update(alert=False, reasons=[])
        rows.append(row)
    return pd.DataFrame(rows)


def monitor(results: Sequence[dict], config: MonitorConfig = MonitorConfig()) -> Monitor:
    """Windows against the baseline, overall and per tag, and the alerts (see the module docstring)."""
    if not results:
        raise QkitError("there are no measured requests to monitor", "measure a log first (drift.update)")
    df = pd.DataFrame(list(results))
    if "check" not in df:
        df["check"] = None
    df["window"] = assign_windows(df, config)
    windows = _table(df, config, config.seed)
    if windows["baseline"].all():
        warnings.warn(f"the log fills only the baseline ({len(windows)} window(s) of {config.window}): nothing "
                      "to compare yet", stacklevel=2)
    tags = pd.concat([_table(g, config, config.seed).assign(tag=t) for t, g in df.groupby("tag", sort=True)],
                     ignore_index=True)
    alerts = [{"scope": "all", "tag": None, **_alert_fields(r)} for _, r in windows[windows["alert"]].iterrows()]
    alerts += [{"scope": "tag", "tag": r["tag"], **_alert_fields(r)} for _, r in tags[tags["alert"]].iterrows()]
    return Monitor(windows, tags, alerts, df, config)


def _alert_fields(row: pd.Series) -> dict:
    return {"window": int(row["window"]), "first_line": int(row["first_line"]), "last_line": int(row["last_line"]),
            "start": None if pd.isna(row["start"]) else float(row["start"]),
            "end": None if pd.isna(row["end"]) else float(row["end"]), "n": int(row["n"]),
            "reasons": list(row["reasons"])}


def alert_lines(mon: Monitor) -> list[str]:
    return [f"ALERT window {a['window']} (lines {a['first_line']}-{a['last_line']}, {a['n']} requests"
            + (f", tag {a['tag']}" if a["tag"] else "") + "): " + "; ".join(a["reasons"]) for a in mon.alerts]


def worst(mon: Monitor, n: int = 5, by: str = "kld") -> pd.DataFrame:
    """The n requests furthest from the reference by one measure, worst first."""
    ascending = WORSE[by] < 0
    return mon.requests.sort_values(by, ascending=ascending).head(n)
