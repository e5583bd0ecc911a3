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

A cluster fails in ways a single server does not (tests/test_cluster_outage.py): a master that dies
refuses connections to its slots at once; once the other masters have failed it (``cluster-node-timeout``)
and no replica takes its slots, the cluster serves no slot at all (``cluster-require-full-coverage``, the
default) and every command is answered CLUSTERDOWN, a ``ResponseError``; and when no node answers,
redis-py raises its own ``RedisClusterException``, which is not a ``RedisError``. Code that must outlive
an outage catches ``REDIS_ERRORS``; code that tells "Redis cannot serve" (503) from a bug catches
``REDIS_UNAVAILABLE``.
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

# Any failed Redis command, a cluster's included: what keeps a call or a background task alive through an
# outage (a live call's writes are spooled, a listener subscribes again, a worker retries).
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
# Redis cannot serve now, and retrying later may succeed: answered with 503, as a single server's refused
# connection is. RedisClusterException is also what redis-py raises for a command it cannot route (keys
# in different slots); vpmon's keys share their tenant's hash tag, so here it means no node answered.
REDIS_UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
)

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


class _AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """redis-py's asyncio cluster client, whose commands fail with Redis errors only.

    On CLUSTERDOWN it closes every connection of every node, while other commands of the same client may
    be using them: those fail with whatever the torn-down transport raises (``'NoneType' object has no
    attribute 'writelines'``, uvloop's ``RuntimeError: ... the handler is closed``; a ``TypeError`` on
    Python 3.12, redis-py issue #4287), which no code that rides out an outage expects. Here they are
    what they mean: the connection was lost under the command.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, RuntimeError, TypeError) as exc:
            raise redis.ConnectionError(f"connection closed under {args[0]!r}: {exc!r}") from exc


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
        return _cluster(_AsyncCluster, url, options)
    if on_connect is not None:
        options["redis_connect_func"] = on_connect
    pool = aredis.BlockingConnectionPool.from_url(url, timeout=pool_wait_s, **options)
    return aredis.Redis(connection_pool=pool)


def _cluster(cls: Any, url: str, options: dict[str, Any]) -> Any:
    try:
        client = cls.from_url(url, **options)
    except redis.exceptions.RedisClusterException as exc:
        # e.g. a URL with a database number: a cluster has database 0 only.
        raise StoreError(f"cannot use {_without_password(url)} as a Redis Cluster: {exc}") from exc
    # PING is how the spool's flusher and /readyz ask "does Redis answer?". redis-py sends it to one node,
    # which answers even while another master is dead and its slots unserved: ask every master instead.
    client.command_flags["PING"] = cls.PRIMARIES
    return client


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
