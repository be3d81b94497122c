"""The brokers of a cluster on a three-node Redis Cluster (real valkey-server
processes, slots split over three masters): the fleet, its deployments and
the ledger work as on one Redis (every key shares one hash slot)."""

from __future__ import annotations

import pytest

from fleet import NEW, OLD, ScriptLog, ask, deployment_script, steps, todos, wait_deployment, wait_until, web
from test_cluster_e2e import cluster_of, held, wait_holders
from valkey_server import ValkeyCluster, running

pytest.importorskip("coredis")


@pytest.fixture
def redis_cluster(tmp_path):
    with running(ValkeyCluster(tmp_path / "valkey")) as nodes:
        yield nodes


async def test_brokers_on_a_three_node_redis_cluster(tmp_path, redis_cluster):
    # Each broker is given another node: a Redis Cluster is found from any of them.
    with cluster_of(tmp_path, [node.url for node in redis_cluster.nodes[:2]], ("a", "b")) as (a, b):
        assert [e for e in a.events() if e["event"] == "broker listening"][0]["redis"] == "cluster"
        log = ScriptLog()
        async with todos(a.url, OLD, []), todos(b.url, NEW, []), web(a.url) as client:
            await wait_holders(a, "todos", {"a", "b"})
            async with deployment_script(a.url, log):
                d = await wait_deployment(a.port, lambda d: d["finished"], "the deployment to finish", timeout=15)
                assert steps(d) == {"offline": ("done", 1), "online": ("done", 1)}
            await wait_until(lambda: held(a, "b") == {NEW: "live"}, "a to see b's version live")
            assert await ask(client, "pinned", version="2") == NEW  # from a, through the stream of b
