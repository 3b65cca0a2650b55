"""The ray executor on a local Ray instance: the same tables and cache keys as the local executor, a cell
retried after its worker was killed, one entry built once for two cells, and requests no node can meet
refused before any cell starts. One `ray.init` for the module: each costs seconds."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from qkit.core.errors import QkitError
from qkit.core.store import BUILDING, Kind, Store
from qkit.studies import calibration_data as C
from qkit.studies import cells
from qkit.studies import quantization_methods as M

ray = pytest.importorskip("ray")
ENTRY = Kind("ray_test", 1)


def test_missing_ray_and_an_address_that_does_not_answer_are_one_line_errors(monkeypatch) -> None:
    assert not ray.is_initialized(), "runs before this module's Ray instance starts"
    with pytest.raises(QkitError, match="unknown executor 'dask'.*use one of local, ray"):
        cells.executor("dask")
    start = time.monotonic()
    with pytest.raises(QkitError, match="no Ray cluster answers at '127.0.0.1:1'.*ray start --head"):
        cells.executor("ray", address="127.0.0.1:1")
    assert time.monotonic() - start < 10  # ray.init itself would retry for minutes
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(QkitError, match="needs Ray, which is not installed.*pip install"):
        cells.executor("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    yield ray
    ray.shutdown()


def _nothing() -> None:
    pass


def _build_entry(root: str, log: str, spec: str, die_once: str | None) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        (tmp / "model.bin").write_bytes(b"half")
        if die_once and not Path(die_once).exists():
            Path(die_once).touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies in the middle of the cell
        time.sleep(1)
        (tmp / "model.bin").write_bytes(b"weights")

    Store(root).get_dir(ENTRY, {"spec": spec}, build)


def _run(cell_args, needs=cells.Resources()):
    return cells.RayExecutor().run(_build_entry, [cells.Cell(f"cell {i}", a, needs) for i, a in enumerate(cell_args)],
                                   init=_nothing, init_args=(), desc="test")


def test_a_cell_whose_worker_is_killed_is_retried_and_no_half_entry_is_read(local_ray, tmp_path) -> None:
    store, log = Store(tmp_path / "cache"), tmp_path / "log"
    _run([(str(store.root), str(log), "k", str(tmp_path / "died"))])
    assert len(log.read_text().split()) == 2  # the first attempt died, Ray ran it again
    path = store.lookup(ENTRY, {"spec": "k"})
    assert path is not None and (path / "model.bin").read_bytes() == b"weights"
    assert not any(store.root.rglob(f"*{BUILDING}*"))  # the retry removed the dead attempt's directory


def test_two_cells_that_need_one_entry_build_it_once(local_ray, tmp_path) -> None:
    store, log = Store(tmp_path / "cache"), tmp_path / "log"
    _run([(str(store.root), str(log), "same", None)] * 2)
    assert len(log.read_text().split()) == 1


def test_a_cell_that_no_node_can_run_is_refused_before_any_cell_starts(local_ray, tmp_path) -> None:
    log = tmp_path / "log"
    todo = [cells.Cell("fits", (str(tmp_path), str(log), "a", None)),
            cells.Cell("w4a16_gptq on 8 GPUs", (str(tmp_path), str(log), "b", None), cells.Resources(num_gpus=8))]
    with pytest.raises(QkitError, match=r"cell w4a16_gptq on 8 GPUs asks for CPU 1, GPU 8, which no node .*CPU 2"):
        cells.RayExecutor().run(_build_entry, todo, init=_nothing, init_args=(), desc="test")
    assert not log.exists()
    with pytest.raises(QkitError, match=r"cell 70B asks for CPU 1, memory 560.40 GB, which no node .*memory \d"):
        cells.check_placeable([cells.Cell("70B", (), cells.quantization_resources(70e9))],
                              [n["Resources"] for n in ray.nodes()])


# Equal numbers need equal torch thread counts (a reduction's order changes its last bits): Ray gives a
# one-CPU cell one thread, so the local runs here get one too.
@pytest.mark.slow
def test_methods_study_through_ray_gives_the_local_tables(local_ray, store_with_tiny, tmp_path,
                                                          one_torch_thread) -> None:
    config = M.config("quick", model="tiny", methods=["fp8_dynamic", "w8a8_int8"], samples=4, seq_len=64,
                      eval_tokens=512, ctx=128)
    here = M.run(config, store=store_with_tiny(tmp_path / "local"))
    there = M.run(M.config(config, executor="ray"), store=store_with_tiny(tmp_path / "ray"))
    same = lambda r: r.tables()["results"].drop(columns="quantize (s)")  # noqa: E731 - every number but the time
    assert same(here).equals(same(there))
    assert [Path(p).name for p in here.rows["checkpoint"]] == [Path(p).name for p in there.rows["checkpoint"]]
    node = ray.get_runtime_context().get_node_id()
    assert all(node in n for n in there.provenance()["node"])  # where each cell ran


@pytest.mark.slow
def test_calibration_sweep_through_ray_gives_the_local_tables(local_ray, store_with_tiny, tmp_path,
                                                              one_torch_thread) -> None:
    grid = C.Config(model="tiny", methods=("fp8_static",), sources=("prose", "chat"), samples=(2,), seq_lens=(32,),
                    seeds=(0, 1), center=(2, 32), eval_tokens=256, ctx=128)
    here = C.run(C.config(grid, workers=1), store=store_with_tiny(tmp_path / "local"))
    there = C.run(C.config(grid, executor="ray"), store=store_with_tiny(tmp_path / "ray"))
    cols = ["method", "source", "seed", "eval_domain", "kld_mean", "ppl_quant", "top1_pct"]
    assert here.rows[cols].equals(there.rows[cols])
    assert [Path(p).name for p in here.rows["checkpoint"]] == [Path(p).name for p in there.rows["checkpoint"]]


@pytest.mark.slow
def test_report_runs_notebooks_as_ray_tasks_whose_studies_use_the_same_cluster(local_ray, store_with_tiny, tmp_path,
                                                                                monkeypatch) -> None:
    from qkit import report

    store = store_with_tiny(tmp_path / "cache")
    monkeypatch.setenv("QKIT_CACHE", str(store.root))
    params = {"model": "tiny", "methods": ["fp8_dynamic", "w8a8_int8"], "samples": 4, "seq_len": 64,
              "eval_tokens": 512, "ctx": 128}
    [ray_run] = report.run_report(["02"], params, tmp_path / "ray", executor="ray", timeout=600)
    assert ray_run["status"] == "ok", ray_run["error"]
    assert ray_run["params"]["executor"] == "ray" and (tmp_path / "ray" / "02_quantization_methods.html").exists()
    node = ray.get_runtime_context().get_node_id()
    checkpoints = list(store.root.glob("checkpoint/*/manifest.json"))
    assert len(checkpoints) == 2 and all(Store.manifest(p.parent)["provenance"]["node"].get("ray_node_id") == node
                                         for p in checkpoints)  # built in the study's Ray cells
    [local] = report.run_report(["02"], params, tmp_path / "local", timeout=600)  # reads what Ray built
    assert local["summary"] == ray_run["summary"]
