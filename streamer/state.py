"""What the running server holds: settings, the voiceprint service, the key store, and the worker
threads that keep CPU and blocking Redis calls off the event loop."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import redis.asyncio as aredis

from streamer.auth import ApiKey, KeyStore
from streamer.embedding import EmbeddingService
from streamer.feeds import Feeds
from streamer.limits import KeyLimits
from streamer.liveness import GatewayLease
from streamer.service import VoiceprintService
from streamer.settings import Settings
from streamer.spool import Outbox
from verifier.decision import DecisionPolicy

T = TypeVar("T")


@dataclass
class AppState:
    settings: Settings
    service: VoiceprintService
    keys: KeyStore
    redis: aredis.Redis  # the asyncio client, for streams and pub/sub
    feeds: Feeds
    embeddings: EmbeddingService
    calls: Any  # streamer.gateway.CallRegistry (imported there: the gateway imports this module)
    outbox: Outbox  # what live calls write to Redis, spooled or coalesced while it is away
    lease: GatewayLease  # this gateway's lease in Redis, and the sweep of gateways that lost theirs
    decision_policy: DecisionPolicy = field(default_factory=DecisionPolicy)
    gateway_id: str = field(default_factory=lambda: secrets.token_hex(6))
    # API keys this gateway verified lately (SHA-256 of the token → the key, when), and when Redis last
    # verified one: streamer/api.py's ``authenticate`` during a Redis outage.
    verified_keys: dict[bytes, tuple[ApiKey, float]] = field(default_factory=dict)
    keys_checked_at: float = 0.0
    stopping: bool = False  # the server got SIGTERM/SIGINT: long-lived responses (SSE) end
    # Embedding uploads is CPU-bound: a few at a time, so live calls keep their share of the cores.
    cpu_limiter: anyio.CapacityLimiter = field(init=False)
    # Redis calls are short but blocking (redis-py is synchronous here).
    io_limiter: anyio.CapacityLimiter = field(init=False)
    # Each key's request rate and live calls on this gateway (VPMON_KEY_*).
    limits: KeyLimits = field(init=False)

    def __post_init__(self) -> None:
        self.cpu_limiter = anyio.CapacityLimiter(self.settings.embed_workers)
        self.io_limiter = anyio.CapacityLimiter(32)
        s = self.settings
        self.limits = KeyLimits.create(s.key_requests_per_second, s.key_request_burst, s.key_max_calls)

    async def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """CPU-heavy work (decode, VAD, embedding) in a worker thread."""
        return await anyio.to_thread.run_sync(partial(func, *args, **kwargs), limiter=self.cpu_limiter)

    async def run_io(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking Redis call in a worker thread."""
        return await anyio.to_thread.run_sync(partial(func, *args, **kwargs), limiter=self.io_limiter)
