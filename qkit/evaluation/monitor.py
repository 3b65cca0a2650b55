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
exact binomial test against the 5% expected.

**False alarms.** One check runs a test per window × scope (the whole window, and each tag) × measure.
They are corrected together with Benjamini–Hochberg at ``alpha``: on a log where nothing changed, every
alert is false, and BH then bounds the chance that the check raises any alert at all by ``alpha``
(its FDR guarantee, which holds for these positively dependent one-sided tests: they share the
baseline, and the measures of one window its requests). BH rather than Bonferroni because a real change
moves many tests at once (every window after a switch, several measures), and BH's threshold grows
with the number of them that are small; rather than alpha spending over windows, because a spending
schedule makes a monitor that runs for months ever less able to see anything. A test whose effect is
under its threshold cannot alert: it enters the correction as p = 1 (still a valid p-value, so BH's
guarantee holds) and its permutation test is not run, which is what keeps a long log cheap. A check
that covers only the windows new since the last one (``first_window``, as ``qkit drift check`` does)
keeps its family to those: a scheduler running it N times raises at most alpha·N false alarms on
average. Measured on 100 synthetic unchanged logs of 300 windows of 60 requests in 4 tags, at alpha
0.01 (tests/test_drift_alerts.py): a check of the whole log alerted on 0 of 100 logs (uncorrected, as
before: 95 of 100), and a check per window on 0.51% of 29,900 windows (uncorrected: 7.4%).

**Once per alert** (``Monitor.events``): an alert is a (tag, measure); it opens in the first window that
rejects, continues while its effect stays past the threshold (a p-value near alpha would otherwise
make it flap), and clears in the first window with enough requests whose effect is back under it.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from qkit.core.errors import QkitError
from qkit.evaluation.metrics import benjamini_hochberg, permutation_p, tail_share_p

# The measures a window is compared on, and the direction that is worse.
WORSE = {"kld": +1, "top1": -1, "served_top1": -1, "ref_logprob": -1}

# An open alert: (tag, or None for the whole window; measure).
AlertKey = tuple[str | None, str]


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
    alpha: float = 0.01  # a check's false-alarm level: Benjamini-Hochberg over all of its tests
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


def _compare(base: dict[str, np.ndarray], win: dict[str, np.ndarray], config: MonitorConfig, seed: int,
             test: bool) -> tuple[dict, list[dict]]:
    """A window's measures (arrays by column) against the baseline's and, with `test`, one change test per
    measure: its effect, threshold, whether the effect crossed it, and the p-value where it did."""
    n, n_base = len(win["kld"]), len(base["kld"])
    out: dict[str, Any] = {"n": n}
    for m in WORSE:
        out[m] = win[m].mean()
    # A tag absent from the baseline window has nothing to be compared with.
    tail = float(np.quantile(base["kld"], config.tail_quantile)) if n_base else math.nan
    out["tail_share"] = float(np.mean(win["kld"] > tail)) if n_base else math.nan
    base_kld = base["kld"].mean() if n_base else math.nan
    out["kld_ratio"] = out["kld"] / base_kld if base_kld > 0 else (math.inf if base_kld == 0 else math.nan)
    checked = win["checked"]
    if checked.any():
        ref, quant = win["correct_ref"][checked], win["correct_quant"][checked]
        out["acc_ref"], out["acc_quant"], out["flips"] = ref.mean(), quant.mean(), int((ref != quant).sum())
    if not (test and n >= config.min_requests and n_base >= config.min_requests):
        return out, []
    base_mean = {m: base[m].mean() for m in WORSE}
    drop = {m: base_mean[m] - out[m] for m in ("top1", "served_top1", "ref_logprob")}
    tests = {  # measure: (effect, threshold, what it means)
        "kld": (out["kld_ratio"], config.kld_ratio,
                f"mean KLD {out['kld']:.3g} is {out['kld_ratio']:.1f}x the baseline's {base_mean['kld']:.3g}"),
        "tail_share": (out["tail_share"], config.tail_share,
                       f"{100 * out['tail_share']:.0f}% of requests past the baseline's "
                       f"{100 * config.tail_quantile:.0f}th KLD percentile ({tail:.3g})"),
        "top1": (drop["top1"], config.agreement_drop,
                 f"top-1 agreement {100 * out['top1']:.1f}% vs the baseline's {100 * base_mean['top1']:.1f}%"),
        "served_top1": (drop["served_top1"], config.agreement_drop,
                        f"served tokens the reference's top-1: {100 * out['served_top1']:.1f}% vs the "
                        f"baseline's {100 * base_mean['served_top1']:.1f}%"),
        "ref_logprob": (drop["ref_logprob"], config.logprob_drop,
                        f"reference log-prob of served tokens {out['ref_logprob']:.3f} vs the baseline's "
                        f"{base_mean['ref_logprob']:.3f} nats/token"),
    }
    rows = []
    for m, (effect, threshold, text) in tests.items():
        if threshold is None:
            continue
        crossed = bool(effect >= threshold)
        if not crossed:
            p = math.nan
        elif m == "tail_share":
            p = tail_share_p(base["kld"], win["kld"], config.tail_quantile, config.n_permutations, seed)
        else:
            p = permutation_p(base[m], win[m], WORSE[m], config.n_permutations, seed)
        out[f"p_{m}"] = p
        rows.append({"measure": m, "effect": float(effect), "threshold": float(threshold), "crossed": crossed,
                     "p": p, "text": text})
    return out, rows


def _table(df: pd.DataFrame, config: MonitorConfig, seed: int, first_window: int) -> tuple[pd.DataFrame, list[dict]]:
    # Plain arrays: indexing a DataFrame per window and measure cost more than the tests on a long log.
    cols = {m: df[m].to_numpy(dtype=float) for m in WORSE}
    cols["checked"] = df["check"].notna().to_numpy()
    for c in ("correct_ref", "correct_quant"):
        cols[c] = df[c].to_numpy(dtype=float) if c in df else np.full(len(df), math.nan)
    window, line, stamp = df["window"].to_numpy(), df["line"].to_numpy(), df["timestamp"].to_numpy(dtype=float)
    in_base = window < config.baseline_windows
    base = {c: v[in_base] for c, v in cols.items()}
    rows, tests = [], []
    for w in np.unique(window):
        at = window == w
        row = {"window": int(w), "first_line": int(line[at].min()), "last_line": int(line[at].max()),
               "start": np.nanmin(stamp[at]) if np.isfinite(stamp[at]).any() else math.nan,
               "end": np.nanmax(stamp[at]) if np.isfinite(stamp[at]).any() else math.nan,
               "baseline": bool(w < config.baseline_windows), "tested": bool(w >= first_window)}
        stats, found = _compare(base, {c: v[at] for c, v in cols.items()}, config, seed + int(w),
                                row["tested"] and not row["baseline"])
        row.update(stats)
        rows.append(row)
        place = {k: row[k] for k in ("window", "first_line", "last_line", "start", "end", "n")}
        tests += [{**place, **t} for t in found]
    return pd.DataFrame(rows), tests


@dataclass
class Monitor:
    windows: pd.DataFrame  # one row per window; `alert`: an alert is open in it (new or continuing)
    tags: pd.DataFrame  # one row per (tag, window), each tag against its own baseline requests
    tests: pd.DataFrame  # one row per change test of the tested windows, with p and BH-adjusted p
    events: list[dict]  # the tests as alert events: new, continuing, cleared (see the module docstring)
    open: list[AlertKey]  # the alerts still open after the last window
    requests: pd.DataFrame  # per-request results with their window
    config: MonitorConfig
    first_window: int = 0  # windows before it are history: shown, never tested

    @property
    def alerts(self) -> list[dict]:
        """The alerts in force in the tested windows: events new or continuing."""
        return [e for e in self.events if e["status"] != "cleared"]


TEST_COLUMNS = ("window", "first_line", "last_line", "start", "end", "n", "tag", "measure", "effect", "threshold",
                "crossed", "p", "text")


def monitor(results: Sequence[dict], config: MonitorConfig = MonitorConfig(), first_window: int = 0,
            open_before: Iterable[AlertKey] = ()) -> Monitor:
    """Windows against the baseline, overall and per tag, and the alerts of the windows from `first_window`
    on: their tests Benjamini-Hochberg-corrected together, each alert an event once, given the alerts
    `open_before` them (see the module docstring)."""
    if not results:
        raise QkitError("there are no measured requests to monitor", "measure a log first (drift.update)")
    df = pd.DataFrame(list(results))
    if "check" not in df:
        df["check"] = None
    df["window"] = assign_windows(df, config)
    windows, tests = _table(df, config, config.seed, first_window)
    if windows["baseline"].all():
        warnings.warn(f"the log fills only the baseline ({len(windows)} window(s) of {config.window}): nothing "
                      "to compare yet", stacklevel=2)
    for t in tests:
        t["tag"] = None
    parts = []
    for tag, g in df.groupby("tag", sort=True):
        table, found = _table(g, config, config.seed, first_window)
        parts.append(table.assign(tag=tag))
        tests += [{**t, "tag": tag} for t in found]
    tags = pd.concat(parts, ignore_index=True)
    tests = pd.DataFrame(tests, columns=list(TEST_COLUMNS))
    gated = tests["p"].where(tests["crossed"].astype(bool), 1.0).to_numpy(dtype=float)
    tests["p_adjusted"] = benjamini_hochberg(gated) if len(tests) else gated
    tests["alert"] = tests["crossed"].astype(bool) & (tests["p_adjusted"] <= config.alpha)
    # In window order, the whole window before its tags: the order the events happen in.
    tests = tests.assign(_tag=tests["tag"].fillna("")).sort_values(["window", "_tag"], kind="stable")
    tests = tests.drop(columns="_tag").reset_index(drop=True)
    found, still_open = _events(tests, open_before)
    for table, is_all in ((windows, True), (tags, False)):
        keys = {(e["window"], e["tag"]) for e in found if e["status"] != "cleared"}
        reasons = {k: [e["reason"] for e in found if (e["window"], e["tag"]) == k] for k in keys}
        index = zip(table["window"], [None] * len(table) if is_all else table["tag"])
        table["reasons"] = [reasons.get(k, []) for k in index]
        table["alert"] = table["reasons"].map(bool)
    return Monitor(windows, tags, tests, found, still_open, df, config, first_window)


def _reason(row: pd.Series) -> str:
    return f"{row['text']} (p={row['p']:.4f}, adjusted {row['p_adjusted']:.4f})"


def _event(row: pd.Series, status: str) -> dict:
    """A test as the alerts JSON carries it."""
    def number(x: Any) -> float | None:
        return None if pd.isna(x) else float(x)

    tag = None if pd.isna(row["tag"]) else row["tag"]
    return {"status": status, "window": int(row["window"]), "first_line": int(row["first_line"]),
            "last_line": int(row["last_line"]), "start": number(row["start"]), "end": number(row["end"]),
            "n": int(row["n"]), "scope": "all" if tag is None else "tag", "tag": tag, "measure": row["measure"],
            "effect": number(row["effect"]), "threshold": float(row["threshold"]), "p": number(row["p"]),
            "p_adjusted": number(row["p_adjusted"]), "reason": _reason(row) if row["crossed"] else row["text"]}


def _events(tests: pd.DataFrame, open_before: Iterable[AlertKey]) -> tuple[list[dict], list[AlertKey]]:
    """``new`` where a (tag, measure) not open alerts, ``continuing`` while an open one's effect stays past
    its threshold, ``cleared`` where it falls back under it; and the alerts open after the last window."""
    open_now = {tuple(k) for k in open_before}
    out = []
    for _, row in tests.iterrows():
        key = (None if pd.isna(row["tag"]) else row["tag"], row["measure"])
        if key not in open_now:
            if row["alert"]:
                open_now.add(key)
                out.append(_event(row, "new"))
        elif row["crossed"]:
            out.append(_event(row, "continuing"))
        else:
            open_now.discard(key)
            out.append(_event(row, "cleared"))
    return out, sorted(open_now, key=lambda k: (k[0] or "", k[1]))


_STATUS = {"new": "ALERT", "continuing": "continuing", "cleared": "cleared"}


def resolution(mon: Monitor) -> str:
    """What a check of this log can and cannot resolve: the effects it alerts on (the thresholds), how many
    requests each tested window compares with the baseline's, and whether one test alone can survive the
    correction: BH passes a lone test at p <= alpha / N for N tests, and a permutation test's smallest p is
    1 / (n_permutations + 1)."""
    c, w = mon.config, mon.windows
    tested = w[w["tested"] & ~w["baseline"]]
    n_tests = len(mon.tests)
    lone, smallest = c.alpha / max(n_tests, 1), 1 / (c.n_permutations + 1)
    small = mon.tags[mon.tags["tested"] & ~mon.tags["baseline"] & (mon.tags["n"] < c.min_requests)]
    size = int(tested["n"].median()) if len(tested) else 0
    line = (f"**What this check can resolve:** {len(tested)} window(s) of {size} requests (median), each against"
            f" a baseline of {int(w.loc[w['baseline'], 'n'].sum())}. An alert needs an"
            f" effect past its threshold (mean KLD {c.kld_ratio:g}x the baseline's, top-1 or served top-1 agreement"
            f" {100 * c.agreement_drop:g} points lower, or {100 * c.tail_share:g}% of requests past the baseline's"
            f" {100 * c.tail_quantile:g}th KLD percentile) and a p-value that survives Benjamini-Hochberg at alpha ="
            f" {c.alpha:g} over the check's {n_tests} tests: smaller changes are not reported, by design. ")
    line += (f"One test alone can alert (it needs p <= {lone:.2g}; {c.n_permutations} permutations reach "
             f"{smallest:.2g})." if smallest <= lone else
             f"One test alone cannot alert (it would need p <= {lone:.2g}; {c.n_permutations} permutations reach "
             f"{smallest:.2g} at best): only a change that moves several tests at once can.")
    if len(small):
        line += f" {len(small)} (tag, window) pair(s) held fewer than {c.min_requests} requests and were not tested."
    return line


def alert_lines(found: Sequence[dict]) -> list[str]:
    """One line per window, tag and status of alert events (Monitor.events)."""
    groups: dict[tuple, list[dict]] = {}
    for e in found:
        groups.setdefault((e["window"], e["tag"] or "", e["status"]), []).append(e)
    lines = []
    for (_, tag, status), group in groups.items():
        a = group[0]
        what = "; ".join(e["reason"] if status != "cleared" else f"back under its threshold: {e['reason']}"
                         for e in group)
        lines.append(f"{_STATUS[status]} window {a['window']} (lines {a['first_line']}-{a['last_line']}, "
                     f"{a['n']} requests" + (f", tag {tag}" if tag else "") + f"): {what}")
    return lines


def worst(mon: Monitor, n: int = 5, by: str = "kld") -> pd.DataFrame:
    """The n requests furthest from the reference by one measure, worst first."""
    ascending = WORSE[by] < 0
    return mon.requests.sort_values(by, ascending=ascending).head(n)
