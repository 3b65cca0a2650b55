"""Where a study's cells run locally: worker processes only where memory holds them."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from qkit.plan import hardware
from qkit.studies import cells

GB = 10**9


def test_available_ram_is_positive_and_below_the_machine_total() -> None:
    available = hardware.available_ram_bytes()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert available is not None and 0 < available <= total


@pytest.mark.parametrize("available, expected", [(1.6 * GB, 1), (100 * GB, None), (None, None)])
def test_local_workers_are_as_many_as_memory_holds(monkeypatch, available, expected) -> None:
    monkeypatch.setattr(hardware, "available_ram_bytes", lambda: available)
    got = cells.memory_workers(cells.Resources(memory=int(1.5 * GB)))
    assert got == (cells.default_workers() if expected is None else expected)


def test_cells_memory_cannot_hold_twice_run_in_the_study_process(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cells, "default_workers", lambda: 2)
    monkeypatch.setattr(hardware, "available_ram_bytes", lambda: 2 * GB)  # one SmolLM2 cell (1.5 GB), not two
    monkeypatch.setattr(cells.LocalExecutor, "run", lambda *a, **k: pytest.fail("workers started"))
    loaded = SimpleNamespace(info={"n_params": 135_000_000})
    before = []
    failed = cells.offload(cells.Placement(), print, [("a", ()), ("b", ())], model="m", loaded=loaded,
                           store=SimpleNamespace(root=tmp_path), desc="test", before=lambda: before.append(1))
    assert failed == {} and before == []  # nothing offloaded: the study computes the cells as it reads them
