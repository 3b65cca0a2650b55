"""Where a study's independent cells run: here, or in worker processes on this machine.

A cell writes its results into the store; the study then reads every cell back in its own process, so a
cell's return value is not used and a rerun after a failure computes only the cells that are missing.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch
from tqdm.auto import tqdm


def default_workers() -> int:
    """Worker processes for a study's cells on this machine.

    On CPU, GPTQ spends its time in a per-column Python loop (~50 s per run on SmolLM2 whatever the
    calibration size) that one thread runs as fast as two, and two one-thread processes on 2 cores each
    kept their single-process speed: two workers halve a sweep's time. Each holds a model copy (~1.5 GB
    peak on SmolLM2), hence the cap. With an accelerator, one process owns it."""
    return 1 if torch.accelerator.is_available() else max(1, min(2, os.cpu_count() or 1))


def run_in_workers(cell: Callable[..., Any], cells: Sequence[tuple], workers: int, *,
                   init: Callable[..., None], init_args: tuple, desc: str) -> None:
    """``cell(*args)`` for every ``args`` in `cells`, in `workers` spawned processes, each prepared once by
    ``init(*init_args)``. The first failure cancels what has not started and is raised here (a
    QkitError keeps its fix across the process boundary)."""
    # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool can hang.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=init_args) as pool:
        futures = [pool.submit(cell, *args) for args in cells]
        try:
            for f in tqdm(as_completed(futures), total=len(futures), desc=f"{desc} ({workers} workers)", unit="cell"):
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()  # what finished is cached; a rerun resumes from there
            raise
