"""What the running server holds: settings, the voiceprint service, the key store, and the worker
threads that keep CPU and blocking Redis calls off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from streamer.auth import KeyStore
from streamer.service import VoiceprintService
from streamer.settings import Settings

T = TypeVar("T")


@dataclass
class AppState:
    settings: Settings
    service: VoiceprintService
    keys: KeyStore
    # Embedding uploads is CPU-bound: a few at a time, so live calls keep their share of the cores.
    cpu_limiter: anyio.CapacityLimiter = field(init=False)
    # Redis calls are short but blocking (redis-py is synchronous here).
    io_limiter: anyio.CapacityLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.cpu_limiter = anyio.CapacityLimiter(self.settings.embed_workers)
        self.io_limiter = anyio.CapacityLimiter(32)

    async def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """CPU-heavy work (decode, VAD, embedding) in a worker thread."""
        return await anyio.to_thread.run_sync(partial(func, *args, **kwargs), limiter=self.cpu_limiter)

    async def run_io(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking Redis call in a worker thread."""
        return await anyio.to_thread.run_sync(partial(func, *args, **kwargs), limiter=self.io_limiter)
