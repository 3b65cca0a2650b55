"""End to end: the methods notebook, executed by papermill on the tiny model with every method."""
import json
import re
from functools import partial

import pytest

from qkit import report
from qkit.quant.registry import STUDY_METHODS

# A cell that never gets its kernel reply fails its test after 10 minutes instead of holding CI to its limit.
run_report = partial(report.run_report, timeout=600)

SMALL = {"model": "tiny", "samples": 16, "seq_len": 128, "eval_tokens": 2048, "ctx": 256}


@pytest.mark.slow
def test_methods_notebook_reports_every_method_with_table_and_figures(tmp_path):
    records = run_report(["02_quantization_methods"], SMALL, tmp_path)
    assert [r["status"] for r in records] == ["ok"], records[0].get("error")
    html = (tmp_path / "02_quantization_methods.html").read_text()
    assert "KLD mean" in html and "× smaller than BF16" in html  # the results table
    for name in STUDY_METHODS:
        assert f">{name}<" in html, name
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64', html)) >= 5
    assert "def " not in html  # code hidden
    assert "Traceback" not in html and "failed:" not in html
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["02_quantization_methods"]["status"] == "ok"
    assert (tmp_path / "index.html").exists()


@pytest.mark.slow
def test_task_sensitivity_notebook_reports_families_cis_and_flips(tmp_path):
    params = {"model": "tiny", "methods": ["fp8_dynamic", "w4a16_rtn"], "limit": 2, "samples": 16, "seq_len": 128}
    records = run_report(["04_task_sensitivity"], params, tmp_path)
    assert [r["status"] for r in records] == ["ok"], records[0].get("error")
    html = (tmp_path / "04_task_sensitivity.html").read_text()
    for family in ("arithmetic", "code", "long_context", "summarization"):
        assert f">{family}<" in html, family
    assert "change [95% CI]" in html and "correct_to_wrong" in html  # family table and flip table
    # the claim check runs; `tiny` scores 0 on summarization, which it must say rather than rank families
    assert "against the claim" in html or "no loss to compare against" in html
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64', html)) >= 1
    assert "Traceback" not in html


@pytest.mark.slow
def test_layer_sensitivity_notebook_reports_scan_proxy_mixes_and_pareto(tmp_path):
    from tests.test_layer_sensitivity import TINY

    records = run_report(["06_layer_sensitivity"], TINY, tmp_path)
    assert [r["status"] for r in records] == ["ok"], records[0].get("error")
    html = (tmp_path / "06_layer_sensitivity.html").read_text()
    assert "spearman_rho" in html and "predicted_kld" in html and "mix 5 bpw (prose)" in html
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64', html)) >= 5
    assert "Traceback" not in html
    assert json.loads((tmp_path / "index.json").read_text())["06_layer_sensitivity"]["status"] == "ok"


@pytest.mark.slow
def test_calibration_notebook_reports_matrix_curves_and_cost(tmp_path):
    params = {"model": "tiny", "methods": ["fp8_static"], "sources": ["prose", "chat", "random"],
              "samples": [2, 4], "seq_lens": [32, 64], "seeds": [0, 1], "center": [2, 32], "eval_tokens": 256,
              "ctx": 128, "workers": 1}
    records = run_report(["01_calibration_data"], params, tmp_path)
    assert [r["status"] for r in records] == ["ok"], records[0].get("error")
    html = (tmp_path / "01_calibration_data.html").read_text()
    assert "duplicate_rows_pct" in html and "quant_seconds" in html  # diagnostics and cost tables
    assert "seed-to-seed" in html and "**fp8_static**" not in html and "<strong>fp8_static</strong>" in html
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64', html)) >= 5
    assert "Traceback" not in html


@pytest.mark.slow
def test_kv_cache_notebook_reports_position_quality_retrieval_and_planner(tmp_path):
    params = {"model": "tiny", "schemes": ["fp8_tensor", "fp8_head"], "n_tokens": 512, "n_docs": 2,
              "context_lengths": [256], "measure_lengths": [64, 256]}
    records = run_report(["03_kv_cache"], params, tmp_path)
    assert [r["status"] for r in records] == ["ok"], records[0].get("error")
    html = (tmp_path / "03_kv_cache.html").read_text()
    assert "llama-3.1-8b: 32 layers x 8 KV heads" in html  # the planner for the second model
    assert "per-tensor against per-head scales" in html and "passkey retrieval" in html
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64', html)) >= 3
    assert "Traceback" not in html and "False" not in html  # every planned size matched the measured one


@pytest.mark.slow
def test_choose_a_method_notebook_reports_recommendation_memory_and_checklist(tmp_path):
    records = run_report(["00_choose_a_method"], {"gpu": "A100", "model": "llama-3.1-70b", "context": 32768},
                         tmp_path)
    assert [r["status"] for r in records] == ["ok"], records[0].get("error")
    html = (tmp_path / "00_choose_a_method.html").read_text()
    assert "Recommended: int4" in html and "Marlin" in html
    assert "room for KV GB" in html and "KV GB, fp8" in html  # memory table and KV plan
    assert "Should you quantize" in html and "[6]" in html
    assert ">RTX 4090<" in html  # the hardware table
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64', html)) >= 1
    assert "Traceback" not in html
