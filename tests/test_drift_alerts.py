"""The drift monitor's alerts on synthetic per-request results (no model): false alarms on long unchanged
logs stay under the configured level, each alert is reported once, and a scheduled check reports only
the windows new since the last one."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qkit.evaluation import metrics, monitor
from qkit.studies import drift_monitoring as drift

TAGS = ("a", "b", "c", "d")


def unchanged_log(seed: int, n_windows: int, window: int, tags=TAGS) -> list[dict]:
    """Requests of one unchanging deployment: heavy-tailed KLDs, agreements of 16-token completions that
    vary from request to request, tags drawn at random (so a tag's share of a window varies too)."""
    rng = np.random.default_rng(seed)
    n = n_windows * window
    tag = rng.choice(tags, n)
    kld = rng.lognormal(np.log(0.01), 1.0, n)
    top1 = rng.binomial(16, 0.9, n) / 16
    served = np.where(rng.random(n) < 0.8, top1, rng.binomial(16, 0.9, n) / 16)
    return [{"line": i + 1, "timestamp": None, "tag": str(tag[i]), "check": None, "kld": kld[i], "top1": top1[i],
             "served_top1": served[i], "ref_logprob": -1.0} for i in range(n)]


def false_alarms(seeds: range, n_windows: int, window: int = 60) -> dict[str, float]:
    """Over unchanged logs: the share of logs whose whole-log check alerts, and the share of windows that
    alert when each window is its own check (a scheduler checking once a window); each with BH (the
    monitor) and without any correction (every test at alpha, as before)."""
    config = monitor.MonitorConfig(window=window)
    logs = {"bh": 0, "raw": 0}
    windows = {"bh": 0, "raw": 0, "n": 0}
    for seed in seeds:
        tests = monitor.monitor(unchanged_log(seed, n_windows, window), config).tests
        raw = tests["crossed"] & (tests["p"] < config.alpha)
        logs["bh"] += bool(tests["alert"].any())
        logs["raw"] += bool(raw.any())
        for _, t in tests.groupby("window"):
            gated = t["p"].where(t["crossed"], 1.0).to_numpy(dtype=float)
            windows["bh"] += bool((t["crossed"] & (metrics.benjamini_hochberg(gated) <= config.alpha)).any())
        windows["raw"] += int(raw.groupby(tests["window"]).any().sum())
        windows["n"] += n_windows - config.baseline_windows
    return {"logs_bh": logs["bh"] / len(seeds), "logs_raw": logs["raw"] / len(seeds),
            "windows_bh": windows["bh"] / windows["n"], "windows_raw": windows["raw"] / windows["n"],
            "windows": windows["n"]}


def test_false_alarms_on_long_unchanged_logs_stay_under_alpha():
    rates = false_alarms(range(8), n_windows=200)
    print(rates)
    # Without the correction the same logs alert all the time: this is what the test guards against.
    assert rates["logs_raw"] >= 0.5 and rates["windows_raw"] > 3 * monitor.MonitorConfig.alpha, rates
    assert rates["logs_bh"] == 0.0, rates
    assert rates["windows_bh"] <= monitor.MonitorConfig.alpha, rates


def test_benjamini_hochberg_adjusts_in_the_given_order():
    adjusted = metrics.benjamini_hochberg([0.01, 0.04, 0.03, 0.5])
    assert np.allclose(adjusted, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert metrics.benjamini_hochberg([0.9, 0.9]).tolist() == [0.9, 0.9]


def test_tail_share_test_accounts_for_a_small_baseline():
    rng = np.random.default_rng(3)
    # From 15 baseline requests the 95th percentile is rough: a window of the same traffic often has
    # 2-3 of 15 past it, which a binomial test against 5% would call significant.
    small = [metrics.tail_share_p(rng.lognormal(0, 1, 15), rng.lognormal(0, 1, 15), 0.95, 2000, i)
             for i in range(200)]
    assert np.mean(np.array(small) < 0.01) <= 0.02
    assert metrics.tail_share_p(rng.lognormal(0, 1, 50), rng.lognormal(1.5, 1, 20), 0.95, 2000, 0) < 0.001


def shifted(n_windows: int = 8, window: int = 40, bad: tuple[int, ...] = (3, 4, 5)) -> list[dict]:
    """Two tags; tag b's KLD is 6x higher in the `bad` windows."""
    rng = np.random.default_rng(0)
    return [{"line": i + 1, "timestamp": None, "tag": "ab"[i % 2], "check": None, "top1": 0.95, "served_top1": 0.95,
             "ref_logprob": -1.0,
             "kld": rng.exponential(0.01) * (6 if i // window in bad and i % 2 else 1)}
            for i in range(n_windows * window)]


def test_an_alert_opens_once_continues_and_clears_once():
    mon = monitor.monitor(shifted(), monitor.MonitorConfig(window=40))
    found, still_open = mon.events, mon.open
    kld_b = [(e["window"], e["status"]) for e in found if e["tag"] == "b" and e["measure"] == "kld"]
    assert kld_b == [(3, "new"), (4, "continuing"), (5, "continuing"), (6, "cleared")]
    assert ("b", "kld") not in still_open
    event = next(e for e in found if e["status"] == "new")
    assert set(event) >= {"window", "tag", "measure", "effect", "threshold", "p", "p_adjusted", "status"}
    assert event["p"] <= event["p_adjusted"] <= mon.config.alpha and event["effect"] >= event["threshold"]
    lines = monitor.alert_lines(found)
    assert any(line.startswith("ALERT window 3") and "tag b" in line for line in lines)
    assert any(line.startswith("cleared window 6") and "tag b" in line for line in lines)
    assert not any(line.startswith("ALERT window 4") for line in lines)


@pytest.fixture
def state(tmp_path):
    def make(rows):
        return drift.DriftState(log=str(tmp_path / "log.jsonl"), results=rows)
    return make


def test_a_scheduled_check_reports_only_new_windows_and_each_alert_once(state, tmp_path):
    rows, config, path = shifted(), monitor.MonitorConfig(window=40), tmp_path / "state.json"
    # Cron runs the check as the log grows: after window 3 (the shift starts), after 4, after 7.
    first = drift.check(state(rows[:160]), config, path)
    assert [e["status"] for e in first.new_alerts] and {e["window"] for e in first.mon.events} == {3}
    saved = drift.DriftState(**json.loads(path.read_text()))
    assert saved.checks and ["b", "kld"] in next(iter(saved.checks.values()))["open"]
    saved.results = rows[:200]
    second = drift.check(saved, config, path)
    assert list(second.mon.windows.loc[second.mon.windows["tested"], "window"]) == [4]
    assert second.new_alerts == [] and {e["status"] for e in second.mon.events} == {"continuing"}
    saved = drift.DriftState(**json.loads(path.read_text()))
    assert drift.check(saved, config, path).mon.events == []  # nothing new: nothing reported, exit 0
    saved.results = rows
    third = drift.check(saved, config, path)
    assert list(third.mon.windows.loc[third.mon.windows["tested"], "window"]) == [5, 6, 7]
    assert third.new_alerts == [] and ("cleared", 6) in {(e["status"], e["window"]) for e in third.mon.events}
    # --all: the whole log as today, and the next scheduled check is not moved.
    before = path.read_text()
    everything = drift.check(drift.DriftState(**json.loads(before)), config, path, everything=True)
    assert {e["window"] for e in everything.new_alerts} == {3} and path.read_text() == before
    drift.write_alerts(everything, saved, tmp_path / "alerts.json")
    written = json.loads((tmp_path / "alerts.json").read_text())
    assert written["all_windows"] and written["windows_checked"] == [0, 7]
    assert {e["status"] for e in written["alerts"]} == {"new", "continuing", "cleared"}


def test_a_grown_last_window_is_checked_again_without_alerting_twice(state, tmp_path):
    rows, config, path = shifted(), monitor.MonitorConfig(window=40), tmp_path / "state.json"
    first = drift.check(state(rows[:140]), config, path)  # window 3 half full, already past the threshold
    assert {(e["tag"], e["window"]) for e in first.new_alerts} >= {("b", 3)}
    saved = drift.DriftState(**json.loads(path.read_text()))
    saved.results = rows[:160]
    again = drift.check(saved, config, path)
    assert list(again.mon.windows.loc[again.mon.windows["tested"], "window"]) == [3]
    assert ("b", "kld", "continuing") in {(e["tag"], e["measure"], e["status"]) for e in again.mon.events}
    assert not any(e["tag"] == "b" and e["measure"] == "kld" for e in again.new_alerts)


def test_other_monitor_settings_keep_their_own_place(state, tmp_path):
    rows, path = shifted(), tmp_path / "state.json"
    s = state(rows)
    drift.check(s, monitor.MonitorConfig(window=40), path)
    other = drift.check(s, monitor.MonitorConfig(window=80), path)
    assert other.mon.first_window == 0 and other.new_alerts
    assert len(s.checks) == 2 and pd.notna(other.mon.tests["p_adjusted"]).all()


def test_the_resolution_line_says_what_the_check_can_resolve():
    log = unchanged_log(0, n_windows=3, window=60)  # 2 tested windows x (whole + 4 tags) x 4 measures
    line = monitor.resolution(monitor.monitor(log, monitor.MonitorConfig(window=60)))
    assert "2 window(s) of 60 requests (median), each against a baseline of 60" in line
    assert "over the check's 40 tests" in line
    # BH passes a lone test at p <= 0.01 / 40 = 0.00025; 2,000 permutations give p >= 1/2001 = 0.0005
    assert "One test alone cannot alert (it would need p <= 0.00025; 2000 permutations reach 0.0005" in line
    more = monitor.resolution(monitor.monitor(log, monitor.MonitorConfig(window=60, n_permutations=9999)))
    assert "One test alone can alert (it needs p <= 0.00025; 9999 permutations reach 0.0001)" in more
    # a tag with 4 requests per window of 20 is never tested: once per tested window
    few = [{**r, "tag": "rare" if r["line"] % 5 == 0 else "common"} for r in unchanged_log(1, 4, 20)]
    assert "3 (tag, window) pair(s) held fewer than 10 requests" in monitor.resolution(
        monitor.monitor(few, monitor.MonitorConfig(window=20)))
