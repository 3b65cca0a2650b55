"""The offline task suite: data, scorers, passkey generation, and every task through lm-eval itself."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from qkit import data
from qkit.core.errors import QkitError
from qkit.evaluation import tasks
from qkit.evaluation.tasks import items, scoring

# ------------------------------------------------------------------ data


def test_item_counts_and_sources() -> None:
    counts = {r["task"]: r["items"] for r in tasks.item_counts()}
    assert counts["qkit_gsm8k"] == 100 and counts["qkit_humaneval"] == 164 and counts["qkit_xsum"] == 1001
    assert counts["qkit_arithmetic"] == 298  # 12 subtasks x 25, but 1-digit division has only 23 items
    assert {t.family for t in tasks.TASKS.values()} == set(tasks.FAMILIES)
    shots = items.arithmetic("fewshot")
    assert len(shots) == 4 and not {s["id"] for s in shots} & {s["id"] for s in items.arithmetic("test")}


def test_lead_1_rouge_on_all_xsum_items_matches_the_reference_figure() -> None:
    # A lead-1 baseline (the article's first sentence) gave ROUGE-1/2/L 18.16 / 2.24 / 13.44 on these
    # items with rouge-score; a different extract, tokenizer or stemming would move it.
    scores = [scoring.rouge(x["summary"], x["document"].split("\n")[0]) for x in items.xsum()]
    mean = {k: 100 * np.mean([s[k] for s in scores]) for k in ("rouge1", "rouge2", "rougeL")}
    assert mean["rougeL"] == pytest.approx(13.44, abs=0.01)
    assert mean["rouge1"] == pytest.approx(18.16, abs=0.01) and mean["rouge2"] == pytest.approx(2.24, abs=0.01)


def test_task_names_families_and_unknown_task() -> None:
    assert tasks.get_task("xsum") is tasks.TASKS["qkit_xsum"]
    assert [t.name for t in tasks.resolve("long_context,qkit_gsm8k")] == [
        "qkit_passkey", "qkit_passkey_multi", "qkit_gsm8k"]
    with pytest.raises(QkitError, match="unknown task 'mmlu'.*qkit_gsm8k.*arithmetic"):
        tasks.resolve(["mmlu"])


def test_limit_above_the_items_available_names_the_maximum() -> None:
    task = tasks.get_task("qkit_gsm8k")
    assert tasks.check_limit(task, None, 100) == 100 and tasks.check_limit(task, 7, 100) == 7
    with pytest.raises(QkitError, match="limit 101 is more than the 100 items of qkit_gsm8k.*--limit 100"):
        tasks.check_limit(task, 101, 100)
    with pytest.raises(QkitError, match="limit must be ≥ 1"):
        tasks.check_limit(task, 0, 100)


@pytest.fixture
def datafiles(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATAFILES", tmp_path)
    items._arithmetic.cache_clear()
    items.xsum.cache_clear()
    yield tmp_path
    items._arithmetic.cache_clear()
    items.xsum.cache_clear()


def test_missing_data_file_says_how_to_rebuild_it(datafiles) -> None:
    with pytest.raises(QkitError, match=r"bigbench-arithmetic.jsonl.gz is missing.*vendor_data.py"):
        items.arithmetic()


@pytest.mark.parametrize("content, why", [
    (b"not gzip at all", "malformed"),
    (gzip.compress(b'{"id": "x", "document": "d"}\n'), "lacks one of id, document, summary"),
    (gzip.compress(b'{"id": 1,\n'), "malformed"),
    (gzip.compress(b""), "holds no items"),
])
def test_malformed_data_file_is_named(datafiles, content, why) -> None:
    (datafiles / items.XSUM_FILE).write_bytes(content)
    with pytest.raises(QkitError, match=f"bigbench-xsum.jsonl.gz is malformed.*{why}|{why}.*vendor_data.py"):
        items.xsum()


# ------------------------------------------------------------------ scorers


@pytest.mark.parametrize("text, expected", [
    ("She has 5 left, so 18 in all.\n#### 18", "18"),
    ("3 + 4 = 7. The answer is 1,234.", "1234"),
    ("so 12.50 dollars", "12.5"),
    ("He had 3 apples and then 4", "4"),
    ("no digits", None),
])
def test_final_number(text, expected) -> None:
    assert scoring.final_number(text) == expected


def test_exact_match_scorers() -> None:
    assert scoring.gsm8k({"answer": "18"}, [" 2 * 9 = 18.0\n#### 18"]) == {"exact_match": 1.0}
    assert scoring.gsm8k({"answer": "18"}, [" It is 17"]) == {"exact_match": 0.0}
    assert scoring.arithmetic({"answer": "-37"}, [" -37\n"]) == {"exact_match": 1.0}
    assert scoring.arithmetic({"answer": "37"}, [" -37"]) == {"exact_match": 0.0}
    assert scoring.arithmetic({"answer": "109"}, [" 109 is more than 100"]) == {"exact_match": 1.0}
    assert scoring.passkey({"answer": "68231"}, [" 68231. Remember"]) == {"exact_match": 1.0}
    assert scoring.passkey({"answer": "68231"}, [" 6823"]) == {"exact_match": 0.0}


def test_humaneval_scorer_runs_the_tests() -> None:
    problem = items.humaneval()[0]
    assert scoring.humaneval(problem, [problem["canonical_solution"]]) == {"pass@1": 1.0}
    assert scoring.humaneval(problem, ["    return True\n"]) == {"pass@1": 0.0}


def test_rouge_and_likelihood_scorers() -> None:
    same = scoring.xsum({"summary": "The cat sat on the mat."}, [" The cat sat on the mat.\n"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert scoring.xsum({"summary": "The cat sat."}, ["Dogs run."])["rougeL"] == 0.0
    # -ll over the bytes of " " + summary
    assert scoring.xsum_ll({"summary": "abc"}, [(-8.0, False)]) == {"nll_per_byte": 2.0}


# ------------------------------------------------------------------ passkey


def test_passkey_items_fit_their_lengths_and_hide_the_key_at_the_depth(tiny) -> None:
    tok = tiny.tokenizer
    got = items.passkey(tok, context_lengths=(512, 1024), depths=(0.0, 1.0), per_cell=2)
    assert len(got) == 8 and len({g["id"] for g in got}) == 8
    for g in got:
        n = len(tok(g["prompt"], add_special_tokens=False)["input_ids"])
        assert n == g["prompt_tokens"] <= g["context_length"] - items.PASSKEY_ANSWER_TOKENS
        assert n >= g["context_length"] - items.PASSKEY_ANSWER_TOKENS - 24  # filled, not short
        assert g["prompt"].count(g["answer"]) == 2  # "The pass key is K. ... K is the pass key."
        where = g["prompt"].index(g["answer"]) / len(g["prompt"])
        assert (where < 0.15) if g["depth"] == 0 else (where > 0.85)
    assert items.passkey(tok, context_lengths=(512, 1024), depths=(0.0, 1.0), per_cell=2) == got  # seeded


def test_multi_key_passkey_asks_for_one_of_three_doors(tiny) -> None:
    (g,) = items.passkey(tiny.tokenizer, keys=3, context_lengths=(512,), depths=(0.5,), per_cell=1)
    assert g["prompt"].count(". Remember it. ") == 3
    door = g["prompt"].rsplit("pass key for the ", 1)[1].split(" door")[0]
    assert f"The pass key for the {door} door is {g['answer']}." in g["prompt"]


def test_basic_arithmetic_is_every_item_of_its_kinds_and_none_other() -> None:
    basic, every = items.arithmetic("test", items.BASIC_ARITHMETIC), items.arithmetic("test")
    assert {r["subtask"] for r in basic} == set(items.BASIC_ARITHMETIC)
    assert [r for r in every if r["subtask"] in items.BASIC_ARITHMETIC] == list(basic) and len(basic) == 98
    assert tasks.get_task("arithmetic_basic").family == "arithmetic"


def test_passkey_context_length_above_the_model_maximum(tiny) -> None:
    with pytest.raises(QkitError, match="4096 is above the model's maximum of 2048 tokens"):
        items.passkey(tiny.tokenizer, context_lengths=(1024, 4096), max_len=2048)


# ------------------------------------------------------------------ through lm-eval


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_runs_through_lm_eval_and_qkit_agrees_with_its_score(tiny, name) -> None:
    task = tasks.get_task(name)
    options = {"context_lengths": [256], "depths": [0.0, 1.0], "per_cell": 1} if task.needs_tokenizer else {}
    records, aggregate = tasks.evaluate(tiny.model, tiny.tokenizer, task, [0, 1], options=options, batch_size=2,
                                        max_length=tiny.info["max_length"], max_gen_toks=16)
    assert [r["index"] for r in records] == [0, 1]
    docs = tasks.load_items(task, tiny.tokenizer, **options, max_len=tiny.info["max_length"])
    assert [r["id"] for r in records] == [docs[0]["id"], docs[1]["id"]]
    assert np.mean([r["score"] for r in records]) == pytest.approx(aggregate, abs=1e-12)
    generative = name not in ("qkit_xsum_ll", "qkit_hellaswag", "qkit_truthfulqa_mc1")  # scored by likelihood
    assert all(isinstance(r.get("output"), str) == generative for r in records)


def test_generation_is_capped_and_scored_on_the_real_output(tiny) -> None:
    """A generation re-scored by hand gives the score lm-eval logged for it."""
    task = tasks.get_task("qkit_arithmetic")
    records, _ = tasks.evaluate(tiny.model, tiny.tokenizer, task, [0, 100, 200], batch_size=3,
                                max_length=tiny.info["max_length"], max_gen_toks=4)
    docs = items.arithmetic()
    for r in records:
        assert len(tiny.tokenizer(r["output"], add_special_tokens=False)["input_ids"]) <= 4
        assert r["score"] == scoring.arithmetic(docs[r["index"]], [r["output"]])["exact_match"]


@pytest.mark.slow
def test_lm_eval_cli_runs_a_task_directly(tiny, tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny.path}",
           "--include_path", str(tasks.TASK_DIR), "--tasks", "qkit_arithmetic", "--limit", "3",
           "--output_path", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "qkit_arithmetic" in out.stdout and "exact_match" in out.stdout
