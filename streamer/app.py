"""The vpmon server: one FastAPI app on uvicorn (websockets' sans-I/O implementation for websockets, with
streamer/ws_protocol.py's extension for live audio), one port for the REST API and, as later issues add
them, live call audio, alerts and the supervisor page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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
from streamer.liveness import GatewayLease
from streamer.logs import log_config
from streamer.redis_clients import REDIS_ERRORS, SyncClient, redis_url, sync_client
from streamer.redis_clients import async_client as async_client_for
from streamer.service import AudioLimits, VoiceprintService
from streamer.settings import Settings
from streamer.spool import Outbox, redis_dir_name
from streamer.state import AppState
from streamer.store import open_store
from streamer.supervisor import mount_supervisor_page
from streamer.webhooks import WebhookWorker
from streamer.webhooks_api import router as webhooks_router
from streamer.whip import WhipSessions
from streamer.whip import router as whip_router
from streamer.ws_protocol import DirectReceiveProtocol
from verifier.embedder import Embedder
from verifier.errors import CalibrationError
from verifier.models import provision
from verifier.scoring import Scorer

log = logging.getLogger("vpmon.server")


REDIS_POOL_WAIT_S = 10.0  # for a free connection, before the command fails as Redis unavailable
REDIS_SOCKET_TIMEOUT_S = 5.0  # for a reply; the SSE feeds block for less (streamer/feeds.py)


def redis_client(settings: Settings) -> SyncClient:  # for the CLI
    """The configured Redis (or Redis Cluster), or the embedded one (started if it is not running)."""
    return sync_client(redis_url(settings), cluster=settings.redis_cluster)


def build_service(settings: Settings, client: SyncClient) -> VoiceprintService:
    embedder = Embedder.load(settings.model, threads=settings.embed_threads)
    calibration = provision.run_time_calibration(embedder.spec)
    if calibration is None:
        raise CalibrationError(
            f"model {embedder.model_id} has no calibration: "
            f"run `vpmon calibrate TRIALS --model {settings.model}`"
        )
    scorer = Scorer(embedder.model_id, calibration, min_net_speech=settings.min_net_speech)
    store = open_store(client, settings.store_backend, quantization=settings.store_quantization)
    limits = AudioLimits(settings.max_audio_seconds, settings.min_sample_rate, settings.max_sample_rate)
    return VoiceprintService(
        store,
        embedder,
        scorer,
        AudioArchive(client),
        TenantSettingsStore(client),
        limits=limits,
        centring=settings.score_centring,
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


async def resubscribing(state: AppState) -> None:
    """The binding listener (streamer/calls_api.py), subscribed again whenever Redis drops it: an outage
    must not leave live calls deaf to bindings made on other gateways once Redis is back."""
    while True:
        try:
            await binding_listener(state)
        except REDIS_ERRORS as exc:
            log.warning("binding listener: Redis unavailable (%s); subscribing again", exc)
        await asyncio.sleep(1.0)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = redis_url(settings)
        client = redis_client(settings)
        async_client = async_client_for(
            url,
            cluster=settings.redis_cluster,
            max_connections=settings.redis_max_connections,
            pool_wait_s=REDIS_POOL_WAIT_S,
            socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            on_connect=metrics.redis_connected,
        )
        service = build_service(settings, client)
        feeds = Feeds(async_client)
        gateway_id = secrets.token_hex(6)
        spool_dir = (settings.spool_dir or provision.default_home() / "spool") / redis_dir_name(url)
        state = AppState(
            settings,
            service,
            KeyStore(client),
            redis=async_client,
            feeds=feeds,
            embeddings=embedding_service(service.embedder, settings),
            calls=CallRegistry(),
            outbox=Outbox(feeds, spool_dir, gateway_id),
            lease=GatewayLease(async_client, feeds, gateway_id, settings.gateway_lease_seconds),
            gateway_id=gateway_id,
        )
        app.state.vpmon = state
        app.state.whip = WhipSessions(settings)
        metrics.BUILD.info({"version": app.version, "model": service.model_id})
        metrics.WHIP_PEER_CONNECTIONS.set_function(lambda: len(app.state.whip.peer_connections))
        metrics.REDIS_UP.set_function(lambda: int(state.outbox.writable))
        metrics.SPOOLED_ALERTS.set_function(lambda: state.outbox.spooled)
        await state.outbox.flush()  # before serving: alerts that stopped gateways spooled come first
        flusher = asyncio.create_task(state.outbox.run())
        listener = asyncio.create_task(resubscribing(state))
        leaseholder = asyncio.create_task(state.lease.run(lambda: list(state.calls.calls)))
        whip_forwarded = asyncio.create_task(app.state.whip.serve_forwarded(state))  # DELETEs via Redis
        sampler = asyncio.create_task(metrics.keep_sampled_gauges())  # with several workers only
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
            for task in (listener, leaseholder, whip_forwarded, sampler, webhook_worker, flusher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(*REDIS_ERRORS):
                await state.lease.release()  # every call ended above: nothing for others to sweep
            await state.outbox.close()
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
    for routes in (router, calls_router, gateway_router, whip_router, webhooks_router):
        app.include_router(routes, responses=problems.RESPONSES)
    app.openapi = lambda: problems.openapi_components(FastAPI.openapi(app))  # type: ignore[method-assign]
    mount_supervisor_page(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)  # type: ignore[arg-type]
    return app


class _Server(uvicorn.Server):
    """uvicorn waits for every open response to end before it stops; the SSE feeds never end by
    themselves, so the gateway says it is stopping and they end at their next keep-alive (≤ 4 s)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        vpmon = getattr(self.config.app.state, "vpmon", None)
        if vpmon is not None:
            vpmon.stopping = True
        super().handle_exit(sig, frame)


def serve(settings: Settings, sockets: list[socket.socket] | None = None, **uvicorn_options: Any) -> None:
    """``sockets``: bound sockets to serve on instead of host and port (streamer/workers.py's workers)."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws=DirectReceiveProtocol,  # websockets-sansio, plus streamer/ws_protocol.py's extension
        ws_max_size=1024 * 1024,  # the adapters refuse much less; this bounds what uvicorn buffers
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),
        proxy_headers=False,
        server_header=False,
        **uvicorn_options,
    )
    _Server(config).run(sockets=sockets)
