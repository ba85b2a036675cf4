"""A real two-node Ray cluster on 127.0.0.1 forms, spreads work over both nodes and listens on loopback only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.listeners import is_loopback, listening_sockets
from tests.helpers.ray_cluster import two_node_cluster

pytestmark = pytest.mark.slow


def test_two_node_loopback_cluster_spreads_tasks(tmp_path: Path) -> None:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    with two_node_cluster(tmp_path / "ray") as address:
        ray.init(address=address, log_to_driver=False)
        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            assert len(nodes) == 2
            assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
            pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
            ray.get(pg.ready(), timeout=60)

            @ray.remote(num_cpus=1)
            def where() -> tuple[str, int]:
                import os

                return ray.get_runtime_context().get_node_id(), os.getpid()

            results = ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=i)).remote() for i in range(2)], timeout=60)
            assert len({node for node, _ in results}) == 2
            # every process this test started: both nodes (GCS, raylets, agents, workers) and this driver
            listeners = listening_sockets([os.getpid()])
            assert sum(1 for item in listeners if item.process.endswith("raylet")) >= 2, sorted(map(str, listeners))
            assert all(is_loopback(item.ip) for item in listeners), sorted(map(str, listeners))
        finally:
            ray.shutdown()
