"""The vpmon server: one FastAPI app on uvicorn (websockets' sans-I/O implementation for websockets),
one port for the REST API and, as later issues add them, live call audio, alerts and the supervisor page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio as aredis
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamer import metrics, problems
from streamer.api import router
from streamer.archive import AudioArchive, TenantSettingsStore
from streamer.auth import KeyStore
from streamer.calls_api import binding_listener
from streamer.calls_api import router as calls_router
from streamer.embedding import embedding_service
from streamer.feeds import Feeds
from streamer.gateway import CallRegistry
from streamer.gateway import router as gateway_router
from streamer.logs import log_config
from streamer.redis_server import embedded_url
from streamer.service import AudioLimits, VoiceprintService
from streamer.settings import Settings
from streamer.state import AppState
from streamer.store import connect, open_store
from streamer.supervisor import mount_supervisor_page
from streamer.webhooks import WebhookWorker
from streamer.webhooks_api import router as webhooks_router
from streamer.whip import WhipSessions
from streamer.whip import router as whip_router
from verifier.calibration import Calibration, packaged_calibration
from verifier.embedder import Embedder
from verifier.errors import CalibrationError
from verifier.models import provision
from verifier.scoring import Scorer

log = logging.getLogger("vpmon.server")


REDIS_POOL_WAIT_S = 10.0  # for a free connection, before the command fails as Redis unavailable


def redis_client(settings: Settings) -> redis.Redis:  # for the CLI
    """The configured Redis, or the embedded one (started if it is not running)."""
    return connect(settings.redis_url_value() or embedded_url())


def build_service(settings: Settings, client: redis.Redis) -> VoiceprintService:
    embedder = Embedder.load(settings.model, threads=settings.embed_threads)
    card = provision.read_card(embedder.spec)
    calibration = Calibration.from_dict(card.calibration) if card and card.calibration else None
    calibration = calibration or packaged_calibration(embedder.model_id)
    if calibration is None:
        raise CalibrationError(
            f"model {embedder.model_id} has no calibration: "
            f"run `vpmon calibrate TRIALS --model {settings.model}`"
        )
    scorer = Scorer(embedder.model_id, calibration, min_net_speech=settings.min_net_speech)
    store = open_store(client, settings.store_backend, quantization=settings.store_quantization)
    limits = AudioLimits(settings.max_audio_seconds, settings.min_sample_rate, settings.max_sample_rate)
    return VoiceprintService(
        store, embedder, scorer, AudioArchive(client), TenantSettingsStore(client), limits=limits
    )


class BodySizeLimit:
    """413 for request bodies over ``max_bytes``: by Content-Length before reading, and by counting
    for chunked bodies, so a huge upload never sits in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problems.problem(
            413, "too-large", "Request too large",
            f"the request body is over the {self.max_bytes} bytes this server accepts "
            "(VPMON_MAX_UPLOAD_BYTES); send shorter or compressed (FLAC) recordings",
        )  # fmt: skip
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.redis_url_value() or embedded_url()
        client = connect(url)
        # A blocking pool: when every connection is busy (hundreds of calls starting at once, SSE readers
        # blocked in XREAD) a command waits for one instead of failing the call.
        pool = aredis.BlockingConnectionPool.from_url(
            url,
            protocol=2,
            socket_connect_timeout=5.0,
            max_connections=settings.redis_max_connections,
            timeout=REDIS_POOL_WAIT_S,
            redis_connect_func=metrics.redis_connected,
        )
        async_client = aredis.Redis(connection_pool=pool)
        service = build_service(settings, client)
        state = AppState(
            settings,
            service,
            KeyStore(client),
            redis=async_client,
            feeds=Feeds(async_client),
            embeddings=embedding_service(service.embedder, settings),
            calls=CallRegistry(),
        )
        app.state.vpmon = state
        app.state.whip = WhipSessions(settings)
        metrics.BUILD.info({"version": app.version, "model": service.model_id})
        metrics.WHIP_PEER_CONNECTIONS.set_function(lambda: len(app.state.whip.peer_connections))
        listener = asyncio.create_task(binding_listener(state))
        webhooks = WebhookWorker(
            async_client, state.gateway_id, settings.webhook_retry_schedule, settings.webhook_timeout_seconds
        )
        webhook_worker = asyncio.create_task(webhooks.run())
        log.info("serving model %s, store %s", service.model_id, service.store.backend)
        try:
            yield
        finally:
            await app.state.whip.close_all()  # their ends go to Redis: before the client closes
            await state.embeddings.close()
            for task in (listener, webhook_worker):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await async_client.aclose()
            client.close()

    app = FastAPI(
        title="vpmon",
        summary="Real-time voiceprint monitor for call centres: voiceprints, 1:1 and 1:N, live calls.",
        version="0.1.0",
        lifespan=lifespan,
        # The schema is served by a route that needs a key, like every other; the interactive docs
        # pages are off: they load their scripts from a CDN, which an offline site cannot reach.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    problems.install(app)
    app.include_router(router)
    app.include_router(calls_router)
    app.include_router(gateway_router)
    app.include_router(whip_router)
    app.include_router(webhooks_router)
    mount_supervisor_page(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)  # type: ignore[arg-type]
    return app


def serve(settings: Settings, **uvicorn_options: Any) -> None:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        ws_max_size=1024 * 1024,  # the adapters refuse much less; this bounds what uvicorn buffers
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        log_level="info",
        log_config=log_config("info"),
        proxy_headers=False,
        server_header=False,
        **uvicorn_options,
    )
    uvicorn.Server(config).run()
