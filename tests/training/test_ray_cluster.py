"""A real two-node Ray cluster on 127.0.0.1 forms, spreads work over both nodes and listens on loopback only."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.helpers.ray_cluster import two_node_cluster

pytestmark = pytest.mark.slow


def _loopback(ip: str) -> bool:
    return ip == "::1" or ip.startswith("127.") or ip.startswith("::ffff:127.")


def _listeners_of_tree(root_pids: list[int]) -> list[str]:
    pids = set()
    for pid in root_pids:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        pids.add(pid)
        pids.update(c.pid for c in proc.children(recursive=True))
    bad = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid in pids and conn.status == psutil.CONN_LISTEN and not _loopback(conn.laddr.ip):
            bad.append(f"pid {conn.pid} listens on {conn.laddr.ip}:{conn.laddr.port}")
    return bad


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
            raylets = [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"]
            assert not _listeners_of_tree(raylets), _listeners_of_tree(raylets)
        finally:
            ray.shutdown()
