"""End to end on `tiny`: a user's calibration JSONL, recipe file, GPTQModel checkpoint written outside qkit,
GGUF file and lm-eval task go through the methods study and task sensitivity, by the CLI and by papermill,
and the reports show them beside a built-in method."""
from __future__ import annotations

import json
import shutil
from functools import partial

import pytest

from qkit import cli, report
from qkit.quant import methods

run_report = partial(report.run_report, timeout=600)
RECIPE = """quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}
"""


@pytest.fixture(scope="module")
def mine(tiny, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("mine")
    words = "the model reads my own notes about servers, queues, latency and the weather".split()
    (d / "my.jsonl").write_text("".join(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(300))})
                                        + "\n" for i in range(40)))
    (d / "my_recipe.yaml").write_text(RECIPE)
    gptq = d / "gptq_elsewhere"
    shutil.copytree(methods.quantize(tiny, "w4a16_gptq_gptqmodel").path, gptq,
                    ignore=shutil.ignore_patterns("manifest.json"))
    gguf = shutil.copy(methods.quantize(tiny, "gguf_q8_0").path / "model.gguf", d / "mine.gguf")
    tasks = d / "my_tasks"
    tasks.mkdir()
    with open(tasks / "items.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 5)], "label": 0})
                    + "\n")
    (tasks / "my_task.yaml").write_text(
        f"task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'items.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_target: \"{{label}}\"\ndoc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n")
    return {"calib": str(d / "my.jsonl"), "recipe": f"recipe:{d / 'my_recipe.yaml'}", "gptq": str(gptq),
            "gguf": str(gguf), "tasks": str(tasks)}


def variants_of(mine: dict[str, str]) -> list[str]:
    return ["w4a16_rtn", mine["recipe"], mine["gptq"], mine["gguf"]]


LABELS = ("w4a16_rtn", "recipe:my_recipe.yaml", "gptq_elsewhere", "mine.gguf")


@pytest.mark.slow
def test_the_cli_takes_the_users_material(mine, capsys) -> None:
    code = cli.main(["sensitivity", "--model", "tiny", "--methods", ",".join(variants_of(mine)), "--tasks", "my_task",
                     "--include-path", mine["tasks"], "--family", "arithmetic=my_task", "--limit", "6",
                     "--calib", mine["calib"], "--samples", "4", "--seq-len", "64"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    for label in LABELS:
        assert label in out, label
    assert "arithmetic" in out


@pytest.mark.slow
def test_the_reports_show_the_users_material_beside_a_builtin_method(mine, tmp_path) -> None:
    small = {"model": "tiny", "methods": variants_of(mine), "calib": mine["calib"], "samples": 4, "seq_len": 64}
    records = run_report(["02_quantization_methods"], {**small, "eval_tokens": 1024, "ctx": 256}, tmp_path)
    records += run_report(["04_task_sensitivity"], {**small, "tasks": ["my_task", "qkit_arithmetic"],
                                                    "include_path": mine["tasks"], "limit": 2}, tmp_path)
    assert [r["status"] for r in records] == ["ok", "ok"], [r.get("error") for r in records]
    methods_html = (tmp_path / "02_quantization_methods.html").read_text()
    tasks_html = (tmp_path / "04_task_sensitivity.html").read_text()
    for label in LABELS:
        assert f">{label}<" in methods_html and label in tasks_html, label
    assert "my_task" in tasks_html and "sha256" in methods_html  # the user's data file, by content
    assert "Traceback" not in methods_html + tasks_html
