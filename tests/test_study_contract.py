"""Every study keeps the contract of qkit.studies.contract: a frozen Config with quick and full profiles,
run(config, *, store), and a Result whose tables, findings, figures, provenance and summary have the
right shapes; notebook N calls study module N and publishes its summary to the report index."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from qkit.core.errors import QkitError
from qkit.core.provenance import collect
from qkit.studies import STUDIES, contract

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("notebook, module", STUDIES.items())
def test_study_module_keeps_the_contract(notebook: str, module: str) -> None:
    study = importlib.import_module(module)
    assert dataclasses.is_dataclass(study.Config) and study.Config.__dataclass_params__.frozen
    assert {"quick", "full"} <= set(study.PROFILES)
    assert all(isinstance(c, study.Config) for c in study.PROFILES.values())
    assert study.config("quick") == study.PROFILES["quick"]
    params = inspect.signature(study.run).parameters
    assert list(params)[:2] == ["config", "store"] and params["store"].kind is inspect.Parameter.KEYWORD_ONLY
    for name in ("tables", "findings", "figures", "provenance", "summary"):
        assert callable(getattr(study.Result, name)), name
    assert "config" in {f.name for f in dataclasses.fields(study.Result)}


@pytest.mark.parametrize("notebook, module", STUDIES.items())
def test_notebook_n_calls_study_n_and_publishes_it(notebook: str, module: str) -> None:
    cells = json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert f"from qkit.studies import {module.rsplit('.', 1)[1]} as study" in code
    assert "study.run(config)" in code and code.rstrip().endswith("publish(result)")


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_are_committed_valid_and_without_outputs(path: Path) -> None:
    import nbformat

    nb = json.loads(path.read_text())
    assert all("id" in c for c in nb["cells"])  # nbformat warns on every run about a cell without one
    nbformat.validate(nb)  # after: it adds missing ids, warning only
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_every_study_notebook_is_registered() -> None:
    studies = {p.stem for p in NOTEBOOKS.glob("*.ipynb")} - {"00_choose_a_method"}  # the advisor plans, it runs no study
    assert studies == set(STUDIES)


def test_config_names_a_bad_field_and_a_bad_profile() -> None:
    from qkit.studies import quantization_methods as study

    with pytest.raises(QkitError, match="has no field sampels.*use one of"):
        study.config("quick", sampels=8)
    with pytest.raises(QkitError, match="unknown profile 'fast'"):
        study.config("fast")
    assert study.config("quick", samples=8, methods=["fp8_dynamic"]).methods == ("fp8_dynamic",)


def _check(result: contract.Result) -> contract.Summary:
    tables = result.tables()
    assert tables and all(isinstance(t, pd.DataFrame) for t in tables.values()), tables
    findings = result.findings()
    assert findings and all(isinstance(f, str) and f for f in findings)
    figures = result.figures()
    assert len(figures) and all(isinstance(figures[name], Figure) for name in figures)
    assert isinstance(result.provenance(), pd.DataFrame)
    summary = result.summary()
    assert isinstance(summary, contract.Summary) and summary.headline
    assert summary.figure is None or summary.figure in figures
    import matplotlib.pyplot as plt

    plt.close("all")
    return summary


def test_methods_result(tmp_path) -> None:
    from qkit.studies import quantization_methods as study

    rows = []
    for i, (name, kld) in enumerate([("fp8_dynamic", [0.010, 0.012, 0.011]), ("w4a16_rtn", [0.20, 0.25, 0.22])]):
        result = {"n_tokens": 768, "ppl_base": 20.0, "ppl_quant": 20.5 + i, "kld_p99": 1.0, "mean_dp_pct": 0.0,
                  "top1_agreement_pct": 90.0, "ppl_recovery_pct": 97.0, "chunk_kld": kld,
                  "chunk_nll": [3.0 + i / 10, 3.1, 3.0], "chunk_nll_base": [3.0, 3.0, 2.9], "chunk_top1": [0.9, 0.8, 0.95]}
        rows.append({"method": name, "size_mb": 140.0 - 60 * i, "weight_format": "FP8" if i == 0 else "INT4",
                     "reduction_vs_bf16": 2.0 + 2 * i, "quant_seconds": 1.0, "error": None,
                     **study.result_row(result)})
    res = study.Result(study.PROFILES["quick"], pd.DataFrame(rows))
    summary = _check(res)
    assert summary.best == "fp8_dynamic" and "smallest w4a16_rtn" in summary.headline
    # The CIs do not overlap, so the ranking says fp8_dynamic is ahead.
    assert "fp8_dynamic 0.011 [" in res.findings()[0] and " > w4a16_rtn" in res.findings()[0]


def test_calibration_result() -> None:
    from qkit.data.diagnostics import diagnose
    from qkit.studies import calibration_data as study

    grid = study.config(study.Config(methods=("w4a16_gptq",), sources=("prose", "chat"), samples=(2, 4),
                                     seq_lens=(64, 128), seeds=(0, 1), center=(4, 128)))
    rng = np.random.default_rng(0)
    rows = [{"method": "w4a16_gptq", "source": c.name, "n_samples": c.n_samples, "seq_len": c.seq_len, "seed": c.seed,
             "eval_domain": d, "in_domain": c.name == d,
             "kld_mean": (0.1 if c.name == d else 0.4) + rng.uniform(0, 0.01), "ppl_quant": 30.0, "ppl_base": 25.0,
             "top1_pct": 80.0, "quant_seconds": 50.0, "peak_rss_mb": 1000.0, "rss_growth_mb": 400.0,
             "checkpoint": f"{c}"} for c in grid.configs() for d in ("prose", "chat", "code")]
    df = pd.DataFrame(rows)
    df.attrs.update(grid=dataclasses.asdict(grid))
    sets = {s: diagnose([[1, 2, 3, 4] * 32] * 4, eos_id=None, domains=[s] * 4) for s in grid.sources}
    summary = _check(study.Result(grid, df, sets))
    assert summary.status == "ok" and "better on 2 of 3 texts" in summary.headline


def test_kv_result() -> None:
    from qkit.studies import kv_cache as study

    rng = np.random.default_rng(0)
    blocks = pd.DataFrame([{"scheme": s, "doc": d, "start": b * study.BLOCK, "kld": (1 + b) * 0.001 * (2 if s == "fp8_tensor" else 1)
                            + rng.uniform(0, 1e-4), "nll": 3.0, "nll_base": 3.0, "top1": 0.9}
                           for s in ("fp8_tensor", "fp8_head") for d in range(2) for b in range(16)])
    retrieval = pd.DataFrame([{"scheme": s, "task": "qkit_passkey", "length": 256, "depth": 0.5, "id": "p", "score": 1.0}
                              for s in ("baseline", "fp8_tensor", "fp8_head")])
    summary = _check(study.Result(study.PROFILES["quick"], blocks, retrieval,
                                  {"model": {"spec": "tiny"}, "config": {}, "n_docs": 2, "n_tokens": 1024,
                                   "calibration": {}, "provenance": collect()}))
    assert summary.best == "fp8_head" and summary.status == "ok"


def test_task_sensitivity_result() -> None:
    from qkit.evaluation import tasks
    from qkit.studies import task_sensitivity as study

    scores = {"baseline": [1.0] * 20, "fp8_dynamic": [1.0] * 20, "w4a16_rtn": [1.0] * 5 + [0.0] * 15}
    items = pd.DataFrame([{"method": m, "task": "qkit_arithmetic", "family": tasks.get_task("qkit_arithmetic").family,
                           "id": str(i), "score": s, "output": "x"} for m, v in scores.items() for i, s in enumerate(v)])
    kld = pd.DataFrame([{"method": m, "task": "qkit_arithmetic", "kld_mean": 0.01} for m in ("fp8_dynamic", "w4a16_rtn")])
    meta = {"methods": ["fp8_dynamic", "w4a16_rtn"], "tasks": ["qkit_arithmetic"],
            "seconds": {"baseline/qkit_arithmetic": 1.0, "fp8_dynamic/qkit_arithmetic": 1.0,
                        "w4a16_rtn/qkit_arithmetic": 1.0}}
    summary = _check(study.Result(study.PROFILES["quick"], items, kld, meta))
    assert "1 of 2" in summary.headline and "w4a16_rtn on arithmetic" in summary.headline


def test_drift_result(tmp_path) -> None:
    from qkit.evaluation import monitor
    from qkit.quant.variants import Variant
    from qkit.studies import drift_monitoring as study

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"prompt": "p", "served_by": "a" if i < 40 else "b"}) + "\n" for i in range(80)))
    rng = np.random.default_rng(0)
    rows = [{"line": i + 1, "timestamp": None, "tag": "ab"[i % 2], "check": None, "top1": 0.95, "served_top1": 0.95,
             "ref_logprob": -1.0, "kld": rng.exponential(0.01) * (6 if i >= 40 else 1), "truncated": False}
            for i in range(80)]
    state = study.DriftState(log=str(log), results=rows, meta={"provenance": collect()})
    mon = monitor.monitor(rows, monitor.MonitorConfig(window=20))
    res = study.Result(study.PROFILES["quick"], log, None, Variant("fp8_dynamic", "x", lambda: None), state, mon)
    summary = _check(res)
    assert summary.status == "alert" and "served by" in res.tables()
