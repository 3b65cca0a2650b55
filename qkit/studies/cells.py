"""Where a study's independent cells run: the ``local`` executor (spawned worker processes on this machine,
or the study's own process) or the ``ray`` executor (tasks on a Ray cluster, or on a local Ray instance).

A cell writes its results into the store; the study then reads every cell back in its own process, so a
cell's return value is not used, a rerun after a failure computes only the cells that are missing, and
both executors give the same tables from the same cache keys. The store's leases make a cell that Ray
retries after its worker died, or two cells that need one entry, safe: nothing is built twice and no
half-built entry is read.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from qkit import models
from qkit.core.errors import QkitError, lookup
from qkit.core.store import Store
from qkit.plan import hardware, memory

EXECUTORS = ("local", "ray")
# Ray tasks whose worker died (a node lost, a process killed) run again this many times; a cell that raised
# is not retried, since it would raise again.
RAY_RETRIES = 3
PROBE_SECONDS = 5


@dataclass(frozen=True)
class Resources:
    """What one cell asks of the node it runs on; Ray places it only where all of it is free."""

    num_cpus: float = 1
    num_gpus: float = 0
    memory: int = 0  # bytes of host memory; 0 asks for none
    custom: tuple[tuple[str, float], ...] = ()  # a cluster's own resources, e.g. (("a100", 1),)

    def ray_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            out["memory"] = int(self.memory)
        if self.custom:
            out["resources"] = dict(self.custom)
        return out

    def as_dict(self) -> dict[str, float]:
        return {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory, **dict(self.custom)}


# A cell's own process (Python, torch, tokenizer) before it loads a model, in bytes.
PROCESS_BYTES = 400e6


def quantization_resources(n_params: int, overrides: Mapping[str, float] | Sequence[tuple[str, float]] = ()
                           ) -> Resources:
    """What a cell that quantizes and evaluates a model of `n_params` asks for: one CPU (GPTQ's and AWQ's
    loops run no faster on two), the accelerator if this machine has one, and host memory for the process,
    the float model in fp32 and the copy being quantized: 4 x its BF16 weights. On SmolLM2 that is 1.5 GB,
    the peak RSS measured per calibration cell. `overrides` (a study's ``cell_resources``) sets any of
    ``num_cpus``, ``num_gpus``, ``memory`` (bytes) and names a cluster's custom resources."""
    given = dict(overrides)
    fields = {f.name for f in dataclasses.fields(Resources)} - {"custom"}
    base = Resources(num_gpus=1 if torch.accelerator.is_available() else 0,
                     memory=int(PROCESS_BYTES + 4 * memory.weight_bytes(n_params, "bf16")))
    return dataclasses.replace(base, **{k: v for k, v in given.items() if k in fields},
                               custom=tuple(sorted((k, float(v)) for k, v in given.items() if k not in fields)))


@dataclass(frozen=True)
class Cell:
    """One unit of a study: `label` names it in errors, `args` are its function's arguments."""

    label: str
    args: tuple
    needs: Resources = Resources()


class Executor(Protocol):
    def offloads(self, n_cells: int) -> bool:
        """Whether `n_cells` cells run elsewhere than the study's own process (which otherwise computes
        them as it reads the results back)."""
        ...

    def run(self, fn: Callable[..., Any], cells: Sequence[Cell], *, init: Callable[..., None],
            init_args: tuple, desc: str, keep_going: bool = False) -> dict[str, BaseException]:
        """``fn(*cell.args)`` for every cell, in processes each prepared once by ``init(*init_args)``. The
        first failure cancels what has not started and is raised here; with `keep_going`, failures are
        returned by cell label instead, except a QkitError (bad input fails every cell alike)."""
        ...


def default_workers() -> int:
    """Worker processes for a study's cells on this machine.

    On CPU, GPTQ spends its time in a per-column Python loop (~50 s per run on SmolLM2 whatever the
    calibration size) that one thread runs as fast as two, and two one-thread processes on 2 cores each
    kept their single-process speed: two workers halve a sweep's time. Each holds a model copy (~1.5 GB
    peak on SmolLM2), hence the cap. With an accelerator, one process owns it."""
    return 1 if torch.accelerator.is_available() else max(1, min(2, os.cpu_count() or 1))


def memory_workers(needs: Resources) -> int:
    """:func:`default_workers`, fewer where the memory available now holds fewer cells of `needs` (each
    worker loads its own model copy beside the study's): 1 means the cells run in the study's own process."""
    available = hardware.available_ram_bytes()
    fit = default_workers() if not needs.memory or available is None else int(available // needs.memory)
    return max(1, min(default_workers(), fit))


class LocalExecutor:
    """Spawned worker processes on this machine; one worker means the study's own process."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = default_workers() if workers is None else workers

    def offloads(self, n_cells: int) -> bool:
        return self.workers > 1 and n_cells > 1

    def run(self, fn: Callable[..., Any], cells: Sequence[Cell], *, init: Callable[..., None],
            init_args: tuple, desc: str, keep_going: bool = False) -> dict[str, BaseException]:
        workers = min(self.workers, len(cells))
        failed: dict[str, BaseException] = {}
        # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool can hang.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=init_args) as pool:
            futures = {pool.submit(fn, *c.args): c for c in cells}
            try:
                for f in tqdm(as_completed(futures), total=len(futures), desc=f"{desc} ({workers} workers)",
                              unit="cell"):
                    _settle(futures[f], f.exception(), keep_going, failed)
            except BaseException:
                for f in futures:
                    f.cancel()  # what finished is cached; a rerun resumes from there
                raise
        return failed


def _settle(cell: Cell, error: BaseException | None, keep_going: bool, failed: dict[str, BaseException]) -> None:
    if error is None:
        return
    if isinstance(error, QkitError) or not keep_going:
        raise error
    failed[cell.label] = error


class RayExecutor:
    """Ray tasks, one per cell, each asking for its :class:`Resources`: on the cluster at `address`, or
    on a local Ray instance when `address` is None (one already started in this process is reused)."""

    def __init__(self, address: str | None = None) -> None:
        self.ray = connect(address)

    def offloads(self, n_cells: int) -> bool:
        return n_cells > 0

    def run(self, fn: Callable[..., Any], cells: Sequence[Cell], *, init: Callable[..., None],
            init_args: tuple, desc: str, keep_going: bool = False) -> dict[str, BaseException]:
        ray = self.ray
        check_placeable(cells, [n["Resources"] for n in ray.nodes() if n["Alive"]])
        task = ray.remote(max_retries=RAY_RETRIES, retry_exceptions=False)(_prepared_call)
        refs = {task.options(**c.needs.ray_options()).remote(init, init_args, fn, c.args): c for c in cells}
        failed: dict[str, BaseException] = {}
        pending = list(refs)
        try:
            with tqdm(total=len(refs), desc=f"{desc} (Ray)", unit="cell") as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    try:
                        ray.get(done[0])
                        error = None
                    except ray.exceptions.RayTaskError as e:
                        error = e.cause if isinstance(e.cause, BaseException) else e
                    _settle(refs[done[0]], error, keep_going, failed)
                    bar.update()
        except BaseException:
            for ref in pending:
                ray.cancel(ref)  # what finished is cached; a rerun resumes from there
            raise
        return failed


def check_placeable(cells: Sequence[Cell], nodes: Sequence[Mapping[str, float]]) -> None:
    """A cell that no node could ever run (its request exceeds every node's total) is a QkitError naming the
    cell and what it asked for, before any cell starts."""
    for cell in cells:
        asked = {k: v for k, v in cell.needs.as_dict().items() if v}
        if not any(all(node.get(k, 0) >= v for k, v in asked.items()) for node in nodes):
            # Ray's bookkeeping resources (node:<ip>, the object store) are nothing a cell asks for.
            offered = "; ".join(_fmt({k: v for k, v in sorted(n.items()) if not k.startswith(("node:", "object_"))})
                                for n in nodes) or "no live node"
            raise QkitError(f"cell {cell.label} asks for {_fmt(asked)}, which no node of the Ray cluster offers "
                            f"(nodes: {offered})",
                            "lower the study's cell_resources, or add a node that has them (`ray start "
                            "--address ... --num-gpus N --resources '{\"name\": N}'`)")


def _fmt(asked: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v / 1e9:.2f} GB" if k == "memory" else f"{k} {v:g}" for k, v in asked.items())


_PREPARED: dict[Callable[..., None], tuple] = {}


def _prepared_call(init: Callable[..., None], init_args: tuple, fn: Callable[..., Any], args: tuple) -> None:
    # A Ray worker process runs many tasks: prepare it (load the model) once per study, not once per cell.
    if _PREPARED.get(init) != init_args:
        init(*init_args)
        _PREPARED[init] = init_args
    fn(*args)


def connect(address: str | None = None):
    """The `ray` module, connected to the cluster at `address` (None: a local instance, started here
    unless this process already has one). Ray missing, or an address that does not answer, is a QkitError."""
    try:
        import ray
    except ImportError:
        raise QkitError("the ray executor needs Ray, which is not installed",
                        "pip install 'qkit[ray]' (or ray==2.60.0), or use executor=local") from None
    if not ray.is_initialized():
        try:
            if address not in (None, "auto", "local"):
                _probe(address)
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (OSError, RuntimeError, ValueError) as e:
            raise QkitError(f"no Ray cluster answers at {address!r} ({str(e).splitlines()[0]})",
                            "start one with `ray start --head` there and pass its address (host:6379), "
                            "or leave ray_address out for a local Ray instance") from None
    return ray


def _probe(address: str) -> None:
    """ray.init retries an address that does not answer for minutes, logging as it goes; one TCP connect
    tells within seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()


_MODEL_WORKER: dict[str, Any] = {}


def model_worker(model: str, root: str, trust_remote_code: bool = False) -> None:
    """An ``init`` for cells that need the study's model: one torch thread (a cell's process shares the
    cores with the other cells), the model loaded once per process and the store at `root`; a cell gets
    them from :func:`worker`."""
    torch.set_num_threads(1)
    store = Store(root)
    _MODEL_WORKER.update(store=store, loaded=models.resolve_model(model, store=store,
                                                                  trust_remote_code=trust_remote_code))


def worker() -> tuple[models.LoadedModel, Store]:
    """The model and store :func:`model_worker` prepared in this process."""
    return _MODEL_WORKER["loaded"], _MODEL_WORKER["store"]


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where a study's cells run, a part of every study's config; it changes no result. ``executor``
    ``local``: ``workers`` processes on this machine (None: :func:`default_workers`; 1: one after another in
    the study's own process); ``ray``: a Ray task per cell at ``ray_address`` (None: a local instance),
    each asking for :func:`quantization_resources` with ``cell_resources`` over them."""

    executor: str = "local"
    workers: int | None = None
    ray_address: str | None = None
    cell_resources: tuple[tuple[str, float], ...] = ()


def offload(place: Placement, fn: Callable[..., Any], todo: Sequence[tuple[str, tuple]], *, model: str,
            loaded: models.LoadedModel, store: Store, desc: str, trust_remote_code: bool = False,
            before: Callable[[], Any] | None = None, keep_going: bool = False) -> dict[str, BaseException]:
    """``fn(*args)`` for each ``(label, args)`` of `todo`, as cells of `place`'s executor, in processes
    prepared by :func:`model_worker` (the study's `model`, its store). Nothing runs when the executor would
    run them in this process: the study then computes them as it reads the results back. `before` runs
    here first, once, for what every cell needs (a baseline), rather than waited for by all cells but one.
    Returns the failures by label, with `keep_going` (see :meth:`Executor.run`)."""
    if not todo:
        return {}
    needs = quantization_resources(loaded.info["n_params"], place.cell_resources)
    workers = place.workers
    if place.executor == "local" and workers is None:
        workers = memory_workers(needs)
    ex = executor(place.executor, workers=workers, address=place.ray_address)
    if not ex.offloads(len(todo)):
        return {}
    if before is not None:
        before()
    return ex.run(fn, [Cell(label, args, needs) for label, args in todo], init=model_worker,
                  init_args=(model, str(store.root), trust_remote_code), desc=desc, keep_going=keep_going)


def executor(name: str, *, workers: int | None = None, address: str | None = None) -> Executor:
    """The executor a study's config names: ``local`` (`workers` processes) or ``ray`` (at `address`)."""
    lookup(dict.fromkeys(EXECUTORS), name, "executor")
    return RayExecutor(address) if name == "ray" else LocalExecutor(workers)
