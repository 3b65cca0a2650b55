"""The user's own lm-eval tasks: read from an include path as lm-eval reads them, scored per item as
lm-eval scores them, and refused with a one-line error when qkit could not compare them offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qkit.core.errors import QkitError
from qkit.evaluation import tasks
from qkit.evaluation.tasks import scoring, user

QUESTIONS = [("What is two plus two?", ["four", "five", "twenty-two"]),
             ("What is the capital of France?", ["Paris", "Rome", "Lyon"]),
             ("What colour is the clear sky?", ["blue", "green", "red"]),
             ("What is the opposite of hot?", ["cold", "warm", "loud"])]


def write_task(folder: Path, name: str = "my_mc_task", output_type: str = "multiple_choice", **extra: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.jsonl", "w") as f:
        for i in range(8):
            q, c = QUESTIONS[i % 4]
            f.write(json.dumps({"question": q, "choices": c, "answer": c[0], "label": 0}) + "\n")
    body = {"multiple_choice": 'doc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
                               "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
            "generate_until": 'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
                              "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                              "    higher_is_better: true\n",
            "loglikelihood": 'doc_to_target: " {{answer}}"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n'
                             "    higher_is_better: true\n"}[output_type]
    yaml = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
            f"output_type: {output_type}\ntest_split: test\n" + 'doc_to_text: "Q: {{question}}\\nA:"\n' + body)
    for key, value in extra.items():
        yaml += f"{key}: {value}\n"
    (folder / f"{name}.yaml").write_text(yaml)
    return folder


@pytest.mark.parametrize("output_type", ["multiple_choice", "generate_until", "loglikelihood"])
def test_a_users_task_scores_per_item_as_lm_eval_aggregates(tiny, tmp_path, output_type) -> None:
    name = f"mine_{output_type}"
    (task,) = user.include(write_task(tmp_path / output_type, name, output_type))
    assert tasks.get_task(name) is task and task.family == name and task.binary
    records, aggregate = tasks.evaluate(tiny.model, tiny.tokenizer, task, range(8), batch_size=4,
                                        max_length=tiny.info["max_length"])
    assert [r["id"] for r in records] == [str(i) for i in range(8)]
    assert set(r["score"] for r in records) <= {0.0, 1.0}
    assert np.mean([r["score"] for r in records]) == pytest.approx(aggregate, abs=1e-12)


def write_rolling_task(folder: Path, name: str = "my_rolling_task", metric: str = "word_perplexity") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    texts = ["The sky is blue and the grass is green.", "Two plus two makes four, said the teacher.",
             "Paris is the capital of France, and Rome the capital of Italy.", "It was cold, so we stayed in.",
             "A short one.", "The opposite of hot is cold, and the opposite of up is down, as everyone knows."]
    with open(folder / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        f"metric_list:\n  - metric: {metric}\n  - metric: bits_per_byte\n")
    return folder


@pytest.mark.parametrize("metric", ["word_perplexity", "bits_per_byte"])
def test_a_users_rolling_likelihood_task_scores_as_lm_eval_aggregates(tiny, tmp_path, metric) -> None:
    (task,) = user.include(write_rolling_task(tmp_path / metric, f"rolling_{metric}", metric))
    assert not task.binary and not task.higher_is_better and not task.in_family_score
    records, aggregate = tasks.evaluate(tiny.model, tiny.tokenizer, task, range(6), batch_size=2,
                                        max_length=tiny.info["max_length"])
    nll, weight = [r["score"] for r in records], [r["weight"] for r in records]
    assert len(set(weight)) > 1  # the items differ in length, so a plain mean would not do
    assert scoring.weighted_score(nll, weight, task.aggregation) == pytest.approx(aggregate, rel=1e-12)
    # The prompts whose KLD the study measures are the scored texts themselves.
    assert tasks.prompts(task, tiny.tokenizer)[0].startswith("The sky is blue")


def test_a_rolling_task_with_an_unsplittable_metric_is_refused(tmp_path) -> None:
    folder = write_rolling_task(tmp_path / "bad", "rolling_bad")
    (folder / "rolling_bad.yaml").write_text((folder / "rolling_bad.yaml").read_text().replace(
        "metric: word_perplexity", "metric: acc"))
    with pytest.raises(QkitError, match="scored by acc, which qkit cannot split per item"):
        user.include(folder)


@pytest.mark.slow
def test_qkit_scores_a_users_task_as_the_lm_eval_cli_does(tiny, tmp_path) -> None:
    folder = write_task(tmp_path / "cli", "cli_mc_task")
    (task,) = user.include(folder)
    records, _ = tasks.evaluate(tiny.model, tiny.tokenizer, task, range(8), batch_size=1,
                                max_length=tiny.info["max_length"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny.path}",
           "--include_path", str(folder), "--tasks", "cli_mc_task", "--output_path", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["cli_mc_task"]["acc,none"]
    assert np.mean([r["score"] for r in records]) == pytest.approx(acc, abs=1e-12)


def test_families_and_names_from_the_user(tmp_path) -> None:
    (task,) = user.include(write_task(tmp_path / "fam", "fam_task"), {"fam_task": "arithmetic"})
    assert task.family == "arithmetic" and task in tasks.resolve("arithmetic")
    assert user.parse_families(["code=my_task"]) == {"my_task": "code"}
    with pytest.raises(QkitError, match="--family expects FAMILY=TASK"):
        user.parse_families(["code"])
    with pytest.raises(QkitError, match="--family names other_task, not a task of"):
        user.include(tmp_path / "fam", {"other_task": "code"})


def test_bad_include_paths_and_tasks_are_one_line_errors(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(QkitError, match="holds no .yaml files"):
        user.include(tmp_path / "empty")
    with pytest.raises(QkitError, match="is not a folder"):
        user.include(tmp_path / "nowhere")
    hub = write_task(tmp_path / "hub", "hub_task")
    (hub / "hub_task.yaml").write_text((hub / "hub_task.yaml").read_text().replace(
        "dataset_path: json", "dataset_path: Rowan/hellaswag"))
    with pytest.raises(QkitError, match="needs 'Rowan/hellaswag' downloaded.*Fix: make its data local"):
        user.include(hub)
    clash = write_task(tmp_path / "clash", "qkit_gsm8k")
    with pytest.raises(QkitError, match="has the name of a built-in task"):
        user.include(clash)
    with pytest.raises(QkitError, match="for your own lm-eval YAML tasks pass --include-path"):
        tasks.get_task("never_included")


def test_the_task_catalog_lists_the_builtin_tasks_and_the_include_paths(tmp_path) -> None:
    from qkit.studies import task_sensitivity as S

    catalog = S.task_catalog(S.config(include_path=str(write_task(tmp_path / "cat", "cat_task"))))
    assert {"qkit_gsm8k", "qkit_hellaswag", "cat_task"} <= set(catalog.index)
    assert catalog.loc["cat_task", "items"] == 8 and catalog.loc["cat_task", "metric"] == "acc"
