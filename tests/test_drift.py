"""Drift monitoring on the tiny model: a log whose deployment switches to a damaged checkpoint halfway
alerts in the windows after the switch and in none before; an unchanged log alerts nowhere."""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

from qkit import cli, data
from qkit.core.errors import QkitError
from qkit.core.store import Store
from qkit.data import request_log
from qkit.evaluation import metrics, monitor
from qkit.evaluation import served as serving
from qkit.models.builtin import train_tokenizer
from qkit.quant import variants
from qkit.studies import drift_monitoring as drift

N_PROMPTS, WINDOW, NEW_TOKENS = 64, 16, 16
CONFIG = serving.DriftConfig(batch_size=8, max_new_tokens=NEW_TOKENS)
# alpha 0.05, not the default 0.01: BH over a window's 12 tests multiplies the smallest p by up to 12, and
# a 16-against-16 permutation test with ties (requests the damaged model still serves right) reaches
# p ~0.001 at best, so 0.01 decided the switch by how `tiny`'s training came out on the machine
# (adjusted 0.012 on one, under 0.01 on CI's). The gate on each measure's threshold keeps window 1 quiet.
MONITOR = monitor.MonitorConfig(window=WINDOW, alpha=0.05)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Openings of held-out prose and code paragraphs, the two kinds of text `tiny` was trained on."""
    tags = ("prose", "code")
    pieces = {tag: [p[:240] for d in data.documents(tag, "heldout") for p in d.split("\n\n") if len(p) >= 120]
              for tag in tags}
    # Alternating, so that the traffic's mix stays the same throughout: only the deployment changes.
    chosen = [(tag, pieces[tag][::len(pieces[tag]) // (N_PROMPTS // 2)][i]) for i in range(N_PROMPTS // 2)
              for tag in tags]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "tag": tag, "timestamp": 1_800_000_000 + 60 * i}) + "\n"
                            for i, (tag, p) in enumerate(chosen)))
    return path


@pytest.fixture(scope="module")
def damaged_dir(tiny, tmp_path_factory):
    """`tiny` with Gaussian noise twice each decoder Linear's weight spread added: a broken deployment
    (INT4 RTN barely moves this model: KLD ~1e-4)."""
    model = copy.deepcopy(tiny.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(2 * module.weight.std() * torch.randn(module.weight.shape, generator=g))
    path = tmp_path_factory.mktemp("damaged")
    model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def switched_log(tiny, prompts, damaged_dir, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("logs") / "switched.jsonl"
    return drift.replay(tiny, "fp8_dynamic", prompts, out, switch_to=str(damaged_dir), switch_at=N_PROMPTS // 2,
                        max_new_tokens=NEW_TOKENS, store=store)


@pytest.fixture(scope="module")
def served(tiny, store):
    return variants.parse(tiny, "fp8_dynamic", store=store)


def test_replay_writes_the_log_format_with_the_switch(switched_log, damaged_dir):
    records = [json.loads(line) for line in switched_log.read_text().splitlines()]
    assert len(records) == N_PROMPTS
    assert [r["served_by"] for r in records] == ["fp8_dynamic"] * 32 + [damaged_dir.name] * 32
    assert all(isinstance(r["completion"], str) and r["prompt"] and r["tag"] in ("prose", "code") for r in records)
    assert request_log.read_log(switched_log).malformed == []


def test_switch_alerts_after_it_and_not_before(tiny, served, switched_log, store):
    state = drift.update(switched_log, tiny, served, CONFIG, store)
    mon = monitor.monitor(state.results, MONITOR)
    w = mon.windows.set_index("window")
    assert list(w.index) == [0, 1, 2, 3]
    assert not w.loc[1, "alert"], w.loc[1, "reasons"]
    assert w.loc[2, "alert"] and w.loc[3, "alert"], w[["served_top1", "p_served_top1"]]
    assert any("served tokens" in r for r in w.loc[2, "reasons"])
    # The served completions moved away from the reference; the named model did not.
    assert w.loc[2, "served_top1"] < w.loc[0, "served_top1"] - MONITOR.agreement_drop
    assert {a["window"] for a in mon.alerts if a["scope"] == "all"} == {2, 3}


@pytest.fixture(scope="module")
def unchanged_log(tiny, prompts, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("logs") / "same.jsonl"
    return drift.replay(tiny, "fp8_dynamic", prompts, out, max_new_tokens=NEW_TOKENS, store=store)


def test_unchanged_log_gives_no_alert(tiny, served, unchanged_log, store):
    mon = monitor.monitor(drift.update(unchanged_log, tiny, served, CONFIG, store).results, MONITOR)
    assert len(mon.windows) == 4 and mon.alerts == [], mon.alerts
    # Greedy fp8_dynamic serving: the named model's agreement and the served tokens' are one measure.
    assert np.allclose(mon.requests["top1"], mon.requests["served_top1"])


def test_batched_scoring_equals_one_request_at_a_time(tiny, served, switched_log):
    requests = request_log.read_log(switched_log).requests[:10]
    batched = serving.measure(tiny, served.model, requests, serving.DriftConfig(batch_size=8))
    single = serving.measure(tiny, served.model, requests, serving.DriftConfig(batch_size=1))
    assert [r["line"] for r in batched] == [r["line"] for r in single] == [r.line for r in requests]
    for b, s in zip(batched, single):
        assert b["n_tokens"] == s["n_tokens"] and b["top1"] == s["top1"] and b["served_top1"] == s["served_top1"]
        assert math.isclose(b["kld"], s["kld"], rel_tol=1e-3, abs_tol=1e-6)
        assert math.isclose(b["ref_logprob"], s["ref_logprob"], rel_tol=1e-4)


def test_rerun_reads_only_new_lines(tiny, served, switched_log, store, tmp_path, monkeypatch):
    lines = switched_log.read_text().splitlines(keepends=True)
    log = tmp_path / "growing.jsonl"
    log.write_text("".join(lines[:20]))
    first = drift.update(log, tiny, served, CONFIG, store)
    assert [r["line"] for r in first.results] == list(range(1, 21))
    seen: list[int] = []
    measure = serving.measure
    monkeypatch.setattr(drift, "measure", lambda ref, q, reqs, cfg: seen.extend(r.line for r in reqs)
                        or measure(ref, q, reqs, cfg))
    with open(log, "a") as f:
        f.writelines(lines[20:30])
    second = drift.update(log, tiny, served, CONFIG, store)
    assert seen == list(range(21, 31))
    assert [r["line"] for r in second.results] == list(range(1, 31))
    assert second.results[:20] == first.results
    seen.clear()
    drift.update(log, tiny, served, CONFIG, store)
    assert seen == []
    # A rewritten log is read afresh, not appended to.
    log.write_text("".join(lines[40:45]))
    with pytest.warns(UserWarning, match="rewritten"):
        third = drift.update(log, tiny, served, CONFIG, store)
    assert seen == [1, 2, 3, 4, 5] and len(third.results) == 5


def test_malformed_lines_are_reported_by_number_and_skipped(tiny, served, store, tmp_path):
    log = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "The cat sat on", "completion": " the mat today."})
    log.write_text("\n".join([good, "{not json", json.dumps({"completion": "no prompt"}), "",
                              json.dumps({"prompt": "x", "check": "chess"}), good]) + "\n")
    with pytest.warns(UserWarning) as caught:
        state = drift.update(log, tiny, served, CONFIG, store)
    messages = [str(w.message) for w in caught]
    assert [line for line, _ in state.malformed] == [2, 3, 5]
    assert any(f"{log}:2: skipped, not JSON" in m for m in messages)
    assert any(":5: skipped, unknown check 'chess'" in m for m in messages)
    assert [r["line"] for r in state.results] == [1, 6]


def test_half_written_last_line_waits_for_the_next_run(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"prompt": "a"}) + "\n" + '{"prompt": "b", "compl')
    chunk = request_log.read_log(log)
    assert [r.line for r in chunk.requests] == [1] and chunk.malformed == [] and chunk.n_lines == 1
    log.write_text(log.read_text() + 'etion": " c"}\n')
    rest = request_log.read_log(log, chunk.end_offset, 2)
    assert [(r.line, r.completion) for r in rest.requests] == [(2, " c")]


def test_log_without_usable_lines_is_an_error(tiny, served, store, tmp_path):
    log = tmp_path / "empty.jsonl"
    log.write_text("garbage\n[1, 2]\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(QkitError, match="no usable request"):
            drift.update(log, tiny, served, CONFIG, store)


def test_long_prompt_is_cut_from_the_left_with_a_warning(tiny, served):
    req = request_log.Request(1, "word " * 400, " the end of it.")
    unanswered = request_log.Request(2, "word " * 400)  # answered by the quantized model within the 64 tokens
    with pytest.warns(UserWarning, match="2 request.* cut from the left"):
        cut, answered = serving.measure(tiny, served.model, [req, unanswered], serving.DriftConfig(max_length=64,
                                                                                              max_new_tokens=8))
    (whole,) = serving.measure(tiny, served.model, [req], serving.DriftConfig())
    assert cut["truncated"] and not whole["truncated"] and cut["n_tokens"] == whole["n_tokens"]
    assert answered["generated"] and 0 < answered["n_tokens"] <= 8


def test_checkable_requests_are_scored_for_both_models(tiny, served):
    reqs = [request_log.Request(1, "Q: What is 1 plus 1?\nA:", " 2", check="arithmetic", fields={"answer": "2"}),
            request_log.Request(2, "Q: What is 1 plus 1?\nA:", " 3", check="arithmetic", fields={"answer": "2"})]
    a, b = serving.measure(tiny, served.model, reqs, CONFIG)
    assert (a["correct_quant"], b["correct_quant"]) == (1.0, 0.0)
    assert a["correct_ref"] == b["correct_ref"] == float(serving.score(reqs[0], a["ref_answer"]))


def test_other_tokenizer_is_a_clear_error(tiny, damaged_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(damaged_dir, other)
    train_tokenizer(["a small other corpus, with another vocabulary"] * 20).save_pretrained(other)
    with pytest.raises(QkitError, match="another tokenizer than the reference"):
        variants.parse(tiny, str(other))


def test_time_windows_and_their_errors():
    rows = [{"line": i + 1, "timestamp": 1000.0 + 60 * i, "tag": "t", "kld": 0.1, "top1": 1.0, "served_top1": 1.0,
             "ref_logprob": -2.0, "check": None} for i in range(30)]
    mon = monitor.monitor(rows, monitor.MonitorConfig(window="10m"))
    assert list(mon.windows["n"]) == [10, 10, 10] and mon.alerts == []
    with pytest.raises(QkitError, match="timestamp"):
        monitor.monitor([{**r, "timestamp": None} for r in rows], monitor.MonitorConfig(window="1h"))
    # A tag first seen after the baseline window is shown, never compared.
    late = [{**r, "tag": "new"} if r["line"] > 20 else r for r in rows]
    tags = monitor.monitor(late, monitor.MonitorConfig(window=10)).tags
    assert not tags["alert"].any() and tags.loc[tags["tag"] == "new", "kld_ratio"].isna().all()
    for bad in ("1", "ten", "0m"):
        with pytest.raises(QkitError):
            monitor.MonitorConfig(window=bad)


def test_change_tests_can_tell_noise_from_a_shift():
    rng = np.random.default_rng(1)
    base = rng.exponential(0.01, 40)
    assert metrics.permutation_p(base, rng.exponential(0.01, 20), +1, 2000, 0) > 0.01
    assert metrics.permutation_p(base, rng.exponential(0.05, 20), +1, 2000, 0) < 0.001
    assert metrics.tail_share_p(base, rng.exponential(0.01, 20), 0.95, 2000, 0) > 0.01
    assert metrics.tail_share_p(base, rng.exponential(0.05, 20), 0.95, 2000, 0) < 0.01


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_check_exits_1_on_the_switch_and_0_without(capsys, switched_log, unchanged_log, tmp_path):
    check = ("drift", "check", "--reference", "tiny", "--quantized", "fp8_dynamic", "--window", WINDOW,
             "--alpha", MONITOR.alpha, "--max-new-tokens", NEW_TOKENS)
    code, out, err = run_cli(capsys, *check, "--log", switched_log, "--alerts", tmp_path / "alerts.json")
    assert code == 1, err
    table = [line for line in out.splitlines() if line[:1].isdigit()]
    assert ["ALERT" in line for line in table] == [False, False, True, True], out
    assert "baseline" in table[0]
    assert "ALERT window 2 (lines 33-48" in out
    alerts = json.loads((tmp_path / "alerts.json").read_text())
    assert {a["window"] for a in alerts["alerts"] if a["scope"] == "all"} == {2, 3}
    assert {(a["window"], a["status"]) for a in alerts["alerts"]
            if a["scope"] == "all" and a["measure"] == "served_top1"} == {(2, "new"), (3, "continuing")}
    assert alerts["quantized"] == "fp8_dynamic" and alerts["provenance"]["git_commit"]
    # The scheduler's next run, with nothing new in the log: nothing reported, exit 0; --all shows it all.
    code, out, err = run_cli(capsys, *check, "--log", switched_log)
    assert code == 0 and "no window new since the last check" in out and "ALERT" not in out, out
    code, out, err = run_cli(capsys, *check, "--log", switched_log, "--all")
    assert code == 1 and "ALERT window 2 (lines 33-48" in out, out
    code, out, err = run_cli(capsys, *check, "--log", unchanged_log)
    assert code == 0 and "ALERT" not in out, out


@pytest.mark.parametrize("case", ["missing log", "tiny window", "unknown method", "other tokenizer"])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, case, tmp_path, damaged_dir, unchanged_log):
    other = tmp_path / "other"
    if case == "other tokenizer":
        shutil.copytree(damaged_dir, other)
        train_tokenizer(["another corpus entirely"] * 20).save_pretrained(other)
    argv = {"missing log": ["--log", tmp_path / "nope.jsonl", "--quantized", "fp8_dynamic"],
            "tiny window": ["--log", unchanged_log, "--quantized", "fp8_dynamic", "--window", "1"],
            "unknown method": ["--log", unchanged_log, "--quantized", "int3_magic"],
            "other tokenizer": ["--log", unchanged_log, "--quantized", other]}[case]
    code, out, err = run_cli(capsys, "drift", "check", "--reference", "tiny", *argv)
    errors = [line for line in err.splitlines() if line.startswith("qkit: error: ")]
    assert code == 2 and out == "" and len(errors) == 1 and "Fix: " in errors[0], err


def test_cli_replay_writes_a_log(capsys, prompts, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(prompts.read_text().splitlines(keepends=True)[:4]))
    code, out, err = run_cli(capsys, "drift", "replay", "--model", "tiny", "--method", "fp8_dynamic", "--prompts", few,
                             "--switch-to", "w4a16_rtn", "--switch-at", 3, "--max-new-tokens", 4, "--out",
                             tmp_path / "log.jsonl")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert out.strip() == str(tmp_path / "log.jsonl")
    assert [r["served_by"] for r in records] == ["fp8_dynamic"] * 3 + ["w4a16_rtn"]
    assert all(len(r["completion_ids"]) <= 4 and isinstance(r["completion"], str) for r in records)


@pytest.mark.slow
def test_drift_notebook_reports_windows_alerts_tags_and_flips(prompts, damaged_dir, tmp_path):
    # Here rather than in test_notebooks.py: it reuses this module's prompts and damaged checkpoint.
    from qkit.report import run_report

    params = {"model": "tiny", "method": "fp8_dynamic", "switch_to": str(damaged_dir), "prompts": str(prompts),
              "window": WINDOW, "alpha": MONITOR.alpha, "max_new_tokens": NEW_TOKENS}
    records = run_report(["05_drift_monitoring"], params, tmp_path)
    assert [r["status"] for r in records] == ["ok"], records[0].get("error")
    html = (tmp_path / "05_drift_monitoring.html").read_text()
    assert "ALERT window 2" in html and "ALERT window 1" not in html and "ALERT window 0" not in html
    assert "served_top1" in html and "Why accuracy alone misses drift" in html and "flips" in html
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64', html)) >= 1
    assert "Traceback" not in html


def test_replay_without_out_is_kept_in_the_store(tiny, prompts, store, tmp_path, monkeypatch):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(prompts.read_text().splitlines(keepends=True)[:3]))
    first = drift.replay(tiny, "fp8_dynamic", few, max_new_tokens=4, store=store)
    assert first.is_relative_to(store.root) and len(first.read_text().splitlines()) == 3
    monkeypatch.setattr(drift, "generate", lambda *a, **k: pytest.fail("served again"))
    assert drift.replay(tiny, "fp8_dynamic", few, max_new_tokens=4, store=store) == first
    with pytest.raises(QkitError, match="switch_at 3 leaves one side"):
        drift.replay(tiny, "fp8_dynamic", few, switch_to="w4a16_rtn", switch_at=3, store=store)


def test_the_upgrade_check_is_the_canarys_and_a_rerun_reads_it_back(store_with_tiny, prompts, tmp_path, monkeypatch):
    import pandas as pd

    from qkit.evaluation import canary

    store = store_with_tiny(tmp_path / "store")
    few = tmp_path / "few.jsonl"
    few.write_text("".join(prompts.read_text().splitlines(keepends=True)[:6]))
    config = drift.Config(model="tiny", prompts=str(few), max_new_tokens=4)
    first = drift.upgrade_check(config, store=store)
    ident = canary.identify("tiny", prompts=few)
    direct = canary.check_record(canary.make_record(canary.deployment(ident), canary.CanaryConfig(max_new_tokens=4)),
                                 canary.deployment(ident, "bfloat16"))
    assert first.changed == direct.changed == ["dtype: float32 → bfloat16"]
    pd.testing.assert_frame_equal(first.measures, direct.measures)
    pd.testing.assert_frame_equal(first.per_prompt, direct.per_prompt, check_dtype=False)
    monkeypatch.setattr(canary, "make_record", lambda *a, **k: pytest.fail("the canary ran again"))
    again = drift.upgrade_check(config, store=store)
    pd.testing.assert_frame_equal(again.per_prompt, first.per_prompt)
    assert again.alert == first.alert and again.thresholds == first.thresholds


def test_a_change_in_one_tag_alerts_for_that_tag():
    rng = np.random.default_rng(0)
    rows = [{"line": i + 1, "timestamp": None, "tag": "ab"[i % 2], "check": None, "top1": 0.95, "served_top1": 0.95,
             "ref_logprob": -1.0, "kld": rng.exponential(0.01) * (5 if i >= 80 and i % 2 else 1)} for i in range(120)]
    mon = monitor.monitor(rows, monitor.MonitorConfig(window=40))
    assert {(a["tag"], a["window"]) for a in mon.alerts if a["scope"] == "tag"} == {("b", 2)}
    assert any("mean KLD" in a["reason"] and a["measure"] == "kld" for a in mon.alerts)


def test_sample_log_parses_and_its_code_request_is_checked_in_the_sandbox():
    chunk = request_log.read_log(request_log.SAMPLE_LOG)
    assert chunk.malformed == [] and [r.check for r in chunk.requests] == ["arithmetic", None, "humaneval", None]
    code = chunk.requests[2]
    assert serving.score(code, code.completion) == 1.0
    assert serving.score(code, "    return a - b\n") == 0.0
    assert len(request_log.read_log(request_log.SAMPLE_PROMPTS).requests) == 64


def test_side_by_side_shows_the_references_greedy_answers_and_a_rerun_reads_them_back(
        tiny, served, switched_log, store, monkeypatch):
    from qkit.evaluation.served import generate

    mon = monitor.monitor(drift.update(switched_log, tiny, served, CONFIG, store).results, MONITOR)
    first = drift.side_by_side(switched_log, mon, tiny, n=3, max_new_tokens=NEW_TOKENS, store=store)
    prompts = [json.loads(line)["prompt"] for line in switched_log.read_text().splitlines()]
    direct = generate(tiny.model, tiny.tokenizer, [prompts[int(i) - 1] for i in first["line"]], NEW_TOKENS,
                      context=tiny.info["max_length"])
    assert list(first["reference"]) == [a for a, _ in direct] and len(first) == 3
    monkeypatch.setattr(drift, "generate", lambda *a, **k: pytest.fail("the reference generated again"))
    again = drift.side_by_side(switched_log, mon, tiny, n=3, max_new_tokens=NEW_TOKENS, store=store)
    assert again.equals(first)
