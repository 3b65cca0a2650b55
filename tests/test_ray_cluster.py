"""The ray executor on a two-node cluster on this machine (`ray.cluster_utils.Cluster`): cells spread over
both nodes, and a cell that asks for a resource one node has runs there. Each node records itself in the
provenance of what its cells build."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from qkit.core import provenance
from qkit.core.store import Kind, Store
from qkit.studies import cells

ray = pytest.importorskip("ray")
ENTRY = Kind("ray_cluster_test", 1)


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
    cluster.add_node(num_cpus=1, resources={"gpu_box": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    yield ray
    ray.shutdown()
    cluster.shutdown()


def _nothing() -> None:
    pass


def _cell(root: str, name: str) -> None:
    def build(tmp: Path) -> None:
        time.sleep(1)  # long enough that one node alone would not take every cell
        (tmp / "node.json").write_text(json.dumps(provenance.node()))

    Store(root).get_dir(ENTRY, {"cell": name}, build)


@pytest.mark.slow
def test_cells_spread_over_both_nodes_and_a_custom_resource_picks_its_node(two_nodes, tmp_path) -> None:
    store = Store(tmp_path / "cache")
    todo = [cells.Cell(f"c{i}", (str(store.root), f"c{i}")) for i in range(6)]
    todo.append(cells.Cell("needs the gpu box", (str(store.root), "pinned"), cells.Resources(custom=(("gpu_box", 1),))))
    cells.RayExecutor(address="auto").run(_cell, todo, init=_nothing, init_args=(), desc="test")

    ran_on = {name: Store.manifest(store.path(ENTRY, {"cell": name}))["provenance"]["node"]["ray_node_id"]
              for name in [f"c{i}" for i in range(6)] + ["pinned"]}
    by_resource = {r: n["NodeID"] for n in ray.nodes() for r in ("head", "gpu_box") if r in n["Resources"]}
    assert set(ran_on.values()) == set(by_resource.values())  # both nodes ran cells
    assert ran_on["pinned"] == by_resource["gpu_box"]
    # what each node's process wrote itself agrees with the manifest
    assert json.loads((store.path(ENTRY, {"cell": "pinned"}) / "node.json").read_text())["ray_node_id"] == \
        by_resource["gpu_box"]
