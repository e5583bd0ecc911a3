"""Every Redis client vpmon makes, made here: one standalone server, or a Redis Cluster.

Which one is a setting, ``VPMON_REDIS_CLUSTER=true``, next to an ordinary ``redis://`` (or ``rediss://``)
URL of any one node: that is redis-py's own convention (the same URL, another client class), and a
managed Redis in cluster mode gives exactly that, one endpoint. The cluster client asks that node for
the slot map and talks to every master itself.

The rest of vpmon does not care which it got: every key carries its tenant's hash tag
(``vp:{tenant}``, ``vpalerts:{tenant}``, …), so each multi-key command, Lua script and transaction
touches one slot; the pipelines that span tenants or keys without a common tag are non-transactional
(redis-py's cluster pipeline splits those by node). Pub/sub is classic PUBLISH, which a cluster sends to
every node, so the binding listener's PSUBSCRIBE on whichever node redis-py picks hears every gateway.

Both clients speak RESP2 with bytes replies: streamer/store.py needs that for VSIM and vectors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aredis
import redis.asyncio.cluster
import redis.cluster

from streamer.redis_server import embedded_url
from streamer.settings import Settings
from verifier.errors import StoreError

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = aredis.Redis | redis.asyncio.cluster.RedisCluster

DEFAULT_TIMEOUT_S = 5.0


def is_cluster(client: object) -> bool:
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


def sync_client(url: str, *, cluster: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> SyncClient:
    """A blocking client (the store, keys, archive, webhooks admin, the CLI)."""
    options: dict[str, Any] = {
        "protocol": 2,
        "decode_responses": False,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    if not cluster:
        return redis.Redis.from_url(url, **options)
    return _cluster(redis.cluster.RedisCluster, url, options)


def async_client(
    url: str,
    *,
    cluster: bool = False,
    max_connections: int,
    pool_wait_s: float,
    socket_timeout: float = DEFAULT_TIMEOUT_S,
    on_connect: Callable[[Any], Awaitable[None]] | None = None,
) -> AsyncClient:
    """The gateway's asyncio client (streams, feeds, webhooks, pub/sub).

    Standalone: a blocking pool of ``max_connections``: when every connection is busy (hundreds of calls
    starting at once, SSE readers blocked in XREAD) a command waits up to ``pool_wait_s`` for one instead
    of failing the call; ``on_connect`` runs for each new connection (a metric). Cluster: redis-py's
    cluster client keeps ``max_connections`` per node and fails a command beyond them at once (it has no
    blocking pool), and has no per-connection hook, so ``pool_wait_s`` and ``on_connect`` do not apply.
    """
    options: dict[str, Any] = {
        "protocol": 2,
        "socket_connect_timeout": DEFAULT_TIMEOUT_S,
        "socket_timeout": socket_timeout,
        "max_connections": max_connections,
    }
    if cluster:
        return _cluster(redis.asyncio.cluster.RedisCluster, url, options)
    if on_connect is not None:
        options["redis_connect_func"] = on_connect
    pool = aredis.BlockingConnectionPool.from_url(url, timeout=pool_wait_s, **options)
    return aredis.Redis(connection_pool=pool)


def _cluster(cls: Any, url: str, options: dict[str, Any]) -> Any:
    try:
        return cls.from_url(url, **options)
    except redis.exceptions.RedisClusterException as exc:
        # e.g. a URL with a database number: a cluster has database 0 only.
        raise StoreError(f"cannot use {_without_password(url)} as a Redis Cluster: {exc}") from exc


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    _credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{host}" if at else url


async def pubsub(client: AsyncClient) -> Any:
    """A pub/sub connection. The cluster client learns the slot map on its first command, and picks the
    node for a (P)SUBSCRIBE from it: learn it first. Any node will do for classic pub/sub."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        await client.initialize()
    return client.pubsub()


def redis_url(settings: Settings) -> str:
    """The configured Redis URL, or the embedded server's (started if it is not running)."""
    url = settings.redis_url_value()
    if url is not None:
        return url
    if settings.redis_cluster:
        raise StoreError(
            "VPMON_REDIS_CLUSTER=true needs VPMON_REDIS_URL (any node of the cluster): "
            "the embedded Redis is a single server"
        )
    return embedded_url()
