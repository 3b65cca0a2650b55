"""The user's own lm-eval tasks: the YAML files in a folder, as ``lm_eval --include_path DIR`` reads them.

Each task is loaded once through lm-eval's own TaskManager, so that a task qkit accepts is one lm-eval
runs as it is; qkit adds only what a study needs to compare per item: the per-item score is the task's
first metric, and it is a right/wrong score (flips are counted) when that metric is one of
:data:`BINARY_METRICS`. Its data must be local: a task whose dataset would have to be downloaded is
refused with the dataset's name and how to point the YAML at a local file instead.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qkit.core.errors import QkitError
from qkit.evaluation.tasks import USER_TASKS, Task, register

# lm-eval metrics that are 1 or 0 per item.
BINARY_METRICS = frozenset({"acc", "acc_norm", "exact_match", "pass@1", "pass_at_1", "em", "f1_binary"})
# lm-eval's rolling-likelihood metrics and how it aggregates their (log-likelihood, units) pairs.
ROLLING_AGGREGATION = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                       "bits_per_byte": "bits_per_byte"}
# `datasets` builders that read local files named in dataset_kwargs.data_files.
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
_LOCAL_FIX = ("make its data local, e.g. dataset_path: json with dataset_kwargs: {data_files: {test: "
              "/path/items.jsonl}} and test_split: test")


def _task_names(manager: Any, root: Path) -> list[str]:
    return sorted(name for name, entry in manager.task_index.items() if entry.kind.name == "TASK"
                  and entry.yaml_path and Path(entry.yaml_path).resolve().is_relative_to(root))


def _download(cfg: dict) -> str | None:
    """The dataset a task would fetch from the Hub or a URL, or None when its data is local."""
    path = cfg.get("dataset_path")
    if cfg.get("custom_dataset") or not path:
        return None
    if path in LOCAL_BUILDERS:
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
        files = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
        remote = [f for f in files if isinstance(f, str) and "://" in f]
        return remote[0] if remote else None
    return None if Path(str(path)).expanduser().exists() else str(path)


def _docs(lm_task: Any) -> list[dict]:
    docs = list(lm_task.eval_docs)
    return [{**doc, "id": str(doc.get("id", i))} for i, doc in enumerate(docs)]


def _task(name: str, lm_task: Any, root: Path, family: str | None) -> Task:
    metrics = lm_task.config.metric_list or []
    if not metrics or not metrics[0].get("metric"):
        raise QkitError(f"the task {name} in {root} has no per-item metric",
                        "give it a metric_list whose first metric is scored per item (acc, exact_match, ...)")
    first = metrics[0]
    metric = first["metric"] if isinstance(first["metric"], str) else str(first["metric"])
    docs = _docs(lm_task)
    if not docs:
        raise QkitError(f"the task {name} in {root} has no items in its test (or validation) split",
                        "check its test_split and its data file")
    source = lm_task.config.dataset_path or "custom_dataset"
    if lm_task.OUTPUT_TYPE == "loglikelihood_rolling":
        if metric not in ROLLING_AGGREGATION:
            raise QkitError(f"the task {name} in {root} is scored by {metric}, which qkit cannot split per item",
                            f"make its first metric one of {', '.join(ROLLING_AGGREGATION)}")
        # Lower is better, on another scale than accuracies: shown on its own, never pooled in a family.
        return Task(name, family or name, metric, f"{source} (from {root})", "the user's", lambda **_: docs,
                    binary=False, higher_is_better=False, in_family_score=False, include_path=root,
                    aggregation=ROLLING_AGGREGATION[metric])
    return Task(name, family or name, metric, f"{source} (from {root})", "the user's", lambda **_: docs,
                binary=metric in BINARY_METRICS, higher_is_better=bool(first.get("higher_is_better", True)),
                include_path=root)


def include(path: str | Path | None, families: Mapping[str, str] | None = None) -> list[Task]:
    """Register the tasks of the lm-eval YAML files under ``path`` and return them; ``families`` maps a
    task's name to its family (otherwise it is its own family). None includes nothing."""
    if path is None:
        return []
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise QkitError(f"the include path {path} is not a folder", "pass the folder that holds your task YAMLs")
    if not any(root.rglob("*.yaml")):
        raise QkitError(f"the include path {root} holds no .yaml files", "put lm-eval task YAMLs in it")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(root), include_defaults=False)
    names = _task_names(manager, root)
    if not names:
        raise QkitError(f"the include path {root} holds no lm-eval tasks (no YAML with a task: name)",
                        "write task YAMLs as for lm_eval --include_path")
    families = dict(families or {})
    unknown = sorted(set(families) - set(names))
    if unknown:
        raise QkitError(f"--family names {', '.join(unknown)}, not a task of {root}",
                        f"use one of {', '.join(names)}")
    out = []
    for name in names:
        if name in USER_TASKS and USER_TASKS[name].include_path == root and name not in families:
            out.append(USER_TASKS[name])
            continue
        entry = manager.task_index[name]
        remote = _download(entry.cfg)
        if remote:
            raise QkitError(f"the task {name} ({entry.yaml_path}) needs {remote!r} downloaded, and qkit works offline",
                            _LOCAL_FIX)
        try:
            lm_task = manager.load([name])["tasks"][name]
        except Exception as e:  # noqa: BLE001 - datasets and lm-eval raise many kinds on bad data
            message = " ".join(str(e).split())[:200]
            raise QkitError(f"the task {name} ({entry.yaml_path}) could not load its data "
                            f"{entry.cfg.get('dataset_path')!r}: {type(e).__name__}: {message}",
                            _LOCAL_FIX) from None
        out.append(register(_task(name, lm_task, root, families.get(name))))
    return out


def parse_families(specs: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``["code=my_task", ...]`` (the CLI's --family) as {task: family}."""
    out = {}
    for spec in specs or ():
        family, sep, task = spec.partition("=")
        if not sep or not family.strip() or not task.strip():
            raise QkitError(f"--family expects FAMILY=TASK, got {spec!r}", "write e.g. --family code=my_task")
        out[task.strip()] = family.strip()
    return out
