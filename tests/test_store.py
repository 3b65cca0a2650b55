import json
import os

import pytest

from qkit.core.store import MANIFEST, Kind, Store, write_json_atomic

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


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra", "manifest"])
def test_damaged_entry_is_rebuilt_not_used(store, damage):
    calls = []
    path = store.get_dir(CKPT, {"m": 1}, _builder(calls))
    Store._verified.clear()
    f = path / "model.bin"
    if damage == "truncate":
        f.write_bytes(b"wei")
    elif damage == "flip":
        f.write_bytes(b"weightz")
    elif damage == "delete":
        f.unlink()
    elif damage == "extra":
        (path / "stray.tmp").write_text("?")
    else:
        (path / MANIFEST).write_text("{not json")
    assert store.lookup(CKPT, {"m": 1}) is None
    path = store.get_dir(CKPT, {"m": 1}, _builder(calls))
    assert len(calls) == 2 and (path / "model.bin").read_bytes() == b"weights"


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
