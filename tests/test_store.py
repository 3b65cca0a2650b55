import json
import os
import time

import pytest

from qkit.core import store as store_module
from qkit.core.errors import QkitError
from qkit.core.store import BUILDING, MANIFEST, Kind, Store, write_json_atomic

CKPT, RES = Kind("ckpt", 1), Kind("res", 1)


@pytest.fixture
def store(tmp_path):
    Store._verified.clear()
    return Store(tmp_path / "cache")


def _builder(calls, payload=b"weights"):
    def build(tmp):
        calls.append(tmp)
        (tmp / "model.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("x")
        return {"note": "built"}
    return build


def test_builds_once_and_records_spec_and_provenance(store):
    calls = []
    p1 = store.get_dir(CKPT, {"method": "fp8"}, _builder(calls))
    p2 = store.get_dir(CKPT, {"method": "fp8"}, _builder(calls))
    assert p1 == p2 and len(calls) == 1
    m = Store.manifest(p1)
    assert m["spec"] == {"method": "fp8"} and m["meta"] == {"note": "built"}
    assert set(m["files"]) == {"model.bin", "sub/a.txt"}
    assert m["provenance"]["libraries"]["torch"]


def test_key_depends_on_spec_kind_and_version(store):
    a, b = Kind("a", 1), Kind("b", 1)
    assert store.key(a, {"x": 1}) != store.key(a, {"x": 2})
    assert store.key(a, {"x": 1}) != store.key(b, {"x": 1})
    assert store.key(a, {"x": 1}) != store.key(Kind("a", 2), {"x": 1})  # a bumped version recomputes
    assert store.key(a, {"x": 1, "y": 2}) == store.key(a, {"y": 2, "x": 1})


def test_every_cached_kind_is_declared_once_by_name():
    """Two kinds with one name would share a folder, and one's version bump would not reach the other."""
    import importlib
    import pkgutil

    import qkit
    by_name: dict[str, set[Kind]] = {}
    for info in pkgutil.walk_packages(qkit.__path__, "qkit."):
        if info.name.endswith("__main__"):  # importing it runs the CLI
            continue
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, Kind):
                by_name.setdefault(value.name, set()).add(value)
    assert {"checkpoint", "evaluation", "baseline", "task_items", "task_kld", "kv_quality"} <= set(by_name)
    assert {name: kinds for name, kinds in by_name.items() if len(kinds) > 1} == {}


@pytest.mark.parametrize("stamped", [False, True], ids=["fresh", "stamped"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "flip_same_mtime", "delete", "extra", "manifest"])
def test_damaged_entry_is_rebuilt_not_used(store, damage, stamped):
    calls = []
    path = store.get_dir(CKPT, {"m": 1}, _builder(calls))
    if stamped:  # its builder stamped it; this process finds the stamp
        assert store_module._read_stamp(path)
        time.sleep(0.05)  # past the filesystem's timestamp tick, as any later damage is
    else:
        store_module._stamp_path(path).unlink()
    Store._verified.clear()
    f = path / "model.bin"
    if damage == "truncate":
        f.write_bytes(b"wei")
    elif damage == "flip":
        f.write_bytes(b"weightz")
    elif damage == "flip_same_mtime":  # as a copy that preserves times would leave it
        before = f.stat()
        f.write_bytes(b"weightz")
        os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif damage == "delete":
        f.unlink()
    elif damage == "extra":
        (path / "stray.tmp").write_text("?")
    else:
        (path / MANIFEST).write_text("{not json")
    assert store.lookup(CKPT, {"m": 1}) is None
    path = store.get_dir(CKPT, {"m": 1}, _builder(calls))
    assert len(calls) == 2 and (path / "model.bin").read_bytes() == b"weights"


def test_a_stamped_entry_is_not_hashed_again_by_the_next_process(store, monkeypatch):
    path = store.get_dir(CKPT, {"m": 1}, _builder([]))
    assert store_module._read_stamp(path)  # stamped by its builder
    store_module._stamp_path(path).unlink()
    Store._verified.clear()
    assert Store.verify(path) and store_module._read_stamp(path) is None  # a reader: files this young, no stamp

    monkeypatch.setattr(store_module, "_STAMP_AGE_NS", 0)
    Store._verified.clear()
    assert Store.verify(path) and store_module._read_stamp(path)
    hashed = []
    monkeypatch.setattr(store_module, "_sha256", lambda f: hashed.append(f) or "")
    Store._verified.clear()
    assert Store.verify(path) and hashed == []


def test_failed_build_leaves_nothing_that_looks_complete(store):
    def build(tmp):
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.get_dir(CKPT, {"m": 2}, build)
    assert store.lookup(CKPT, {"m": 2}) is None
    assert not any(store.root.rglob("half.bin"))


def test_get_json_computes_once(store):
    calls = []
    for _ in range(2):
        assert store.get_json(RES, {"a": 1}, lambda: calls.append(1) or {"ppl": 3.5}) == {"ppl": 3.5}
    assert calls == [1]


def test_write_json_atomic_replaces_whole_file(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"b": 2})
    assert json.loads(p.read_text()) == {"b": 2}
    assert os.listdir(tmp_path) == ["x.json"]


# ------------------------------------------------------------------ many processes on one store

WORKER = r"""
import sys, time
from pathlib import Path
from qkit.core import provenance, store as S
provenance.hardware = lambda: {}  # torch's import (4 s) is not what these tests are about
root, log, mode, spec = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
store = S.Store(root)
ready = Path(root).parent / f"ready.{spec}.{mode}.{sys.argv[5] if len(sys.argv) > 5 else ''}"
ready.touch()
while mode == "race" and len(list(Path(root).parent.glob(f"ready.{spec}.race.*"))) < 2:
    time.sleep(0.01)  # both start asking at once

def build(tmp):
    with open(log, "a") as f:
        f.write(f"{spec}\n")
    (tmp / "model.bin").write_bytes(b"half")
    if mode == "hang":
        Path(root, "..", f"hanging.{spec}").touch()
        time.sleep(600)
    time.sleep(1)
    (tmp / "model.bin").write_bytes(b"weights")

def compute(ids):
    with open(log, "a") as f:
        f.writelines(f"{i}\n" for i in ids)
    time.sleep(0.5)
    return {i: i.upper() for i in ids}

if mode == "items":
    print(store.get_items(S.Kind("items", 1), {"s": 1}, sys.argv[5].split(","), compute, batch=1))
else:
    print((store.get_dir(S.Kind("ckpt", 1), {"m": spec}, build) / "model.bin").read_text())
"""


def _workers(tmp_path, *argvs):
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    root = str(tmp_path / "cache")
    return [subprocess.Popen([sys.executable, "-c", WORKER, root, str(tmp_path / "log"), *a], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argvs]


def test_two_processes_asking_for_one_entry_build_it_once(store, tmp_path):
    procs = _workers(tmp_path, ("race", "a", "1"), ("race", "a", "2"))
    out = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], out
    assert [o.strip() for o, _ in out] == ["weights", "weights"]
    assert (tmp_path / "log").read_text() == "a\n"  # built once
    assert sum("is being built by" in err and "waiting for it" in err for _, err in out) == 1  # the other waited


def test_two_writers_of_one_spec_s_items_compute_each_item_once(store, tmp_path):
    procs = _workers(tmp_path, ("items", "s", "a,b"), ("items", "s", "b,c"))
    out = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], out
    assert sorted((tmp_path / "log").read_text().split()) == ["a", "b", "c"]
    done = json.loads(next(store.root.glob("items/*/items.json")).read_text())["items"]
    assert done == {"a": "A", "b": "B", "c": "C"}


def test_a_killed_builder_s_leftover_is_removed_and_its_lease_taken_over(store, tmp_path, capsys):
    import signal
    import time

    from qkit.cli.main import main

    procs = _workers(tmp_path, ("hang", "x"), ("hang", "y"))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"hanging.{s}").exists() for s in "xy"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    x, y = (store.path(CKPT, {"m": s}) for s in "xy")
    assert len(store.leftovers(x)) == len(store.leftovers(y)) == 1
    left_by_y = store.leftovers(y)[0]
    assert store.clean() == []  # their builders are alive
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.communicate()

    calls = []
    assert store.get_dir(CKPT, {"m": "x"}, _builder(calls)) == x and len(calls) == 1  # taken over
    assert store.leftovers(x) == [] and (x / "model.bin").read_bytes() == b"weights"

    assert main(["cache", "clean", "--root", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert f"removed {left_by_y}" in out
    assert not any(store.root.rglob(f"*{BUILDING}*"))
    assert "ckpt" in out and "total" in out


def test_a_store_that_cannot_be_written_says_so(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(QkitError, match="cannot write the store at .*Fix: point QKIT_CACHE"):
        Store(tmp_path / "file" / "cache").get_json(RES, {"a": 1}, lambda: 1)
