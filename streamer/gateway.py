"""Live calls over websockets: the thin asyncio shell around the protocol adapters and ``CallSession``.

Per connection: authenticate the upgrade (API key, Twilio or AudioHook signature), then move frames
into the adapter and its events into the call; speech windows go to the embedder off the event loop and
come back in order to the call's decision; verdicts, alerts and notices go to Redis first
(``streamer/feeds.py``), then to the peer where its protocol can carry them. One bad call never touches
another: every failure ends only its own connection, with the protocol's close.

A Redis outage does not stop a live call: its agent's voiceprint is in its session, its alerts are spooled
locally and reach Redis when it returns, its verdicts still reach the peer (``streamer/spool.py``). What
needs Redis to begin — a new call's key, its agent's voiceprint, a transfer to another agent — is refused
while it is away (HTTP 503 at the upgrade, or close 1011).

Routes (one port with the REST API):
    /v1/streams/twilio/{tenant}   Twilio Media Streams; X-Twilio-Signature with the tenant's auth token
    /v1/streams/audiohook         Genesys AudioHook v2; X-API-KEY (a monitor key), optional signature
    /v1/streams/native            vpmon's protocol; Authorization: Bearer (a monitor key)

WebRTC calls (WHIP, ``streamer/whip.py``) run through the same functions here: ``start_call``, the events,
``verdict_loop`` and ``end_call``, with a data channel as their ``CallTransport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import numpy as np
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from streamer import metrics, problems
from streamer.auth import ApiKey, Permission
from streamer.embedding import may_shed
from streamer.feeds import binding_key
from streamer.limits import CallSlot
from streamer.protocols import audiohook, native, twilio
from streamer.protocols.events import (
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_UNKNOWN_AGENT,
    AgentChanged,
    AudioChunk,
    AudioDiscarded,
    CallEnded,
    CallPaused,
    CallProtocol,
    CallResumed,
    CallStarted,
    ProtocolViolation,
)
from streamer.redis_clients import REDIS_ERRORS
from streamer.session import CallSession, CallState, Output
from streamer.state import AppState
from streamer.store import TENANT_RE, check_speaker
from streamer.ws_protocol import EXTENSION as DIRECT_RECEIVE
from verifier.errors import VpmonError
from verifier.vad import SpeechWindow

log = logging.getLogger("vpmon.gateway")
router = APIRouter()

CLOSE_MODEL_MISMATCH = 4009
AUTH_FAILURE_DELAY_S = 0.5
SIGNATURE_MEMORY_S = 20  # longer than a signature stays valid (max age 10 s + 3 s of clock skew)
_WINDOW_QUEUE = 64  # windows waiting for embedding per call: ~3 minutes of speech at most
# A message taken as it arrives may close a few windows (a 20 ms frame one; a native frame of seconds a
# few): it is taken only while the call's window queue has room for them without waiting.
_DIRECT_ROOM = _WINDOW_QUEUE - 8


class CallTransport(Protocol):
    """Where a call's outgoing frames go: its websocket, or a WHIP session's data channel
    (streamer/whip.py). Both never raise when the peer has gone: the call ends through its input side."""

    async def send(self, data: str | bytes) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...


class WebSocketTransport:
    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def send(self, data: str | bytes) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            if isinstance(data, bytes):
                await self.websocket.send_bytes(data)
            else:
                await self.websocket.send_text(data)

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await self.websocket.close(code, reason)


class IdleWatch:
    """Cancels the current task's ``receive`` when nothing has arrived for ``seconds``.

    ``asyncio.wait_for`` around every receive creates a task and a timer per message: measured here on
    an asyncio.Queue, 9.6 µs a message instead of 3.8, i.e. 0.09 core at 300 calls of 50 frames a second.
    This keeps one timer per idle period and re-arms it from the time of the last message. It only ever
    interrupts the task while it waits in ``receive`` (never halfway through handling a frame).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last = self._loop.time()
        self._receiving = False
        self._expired = False
        self._timer = self._loop.call_at(self._last + seconds, self._check)

    async def receive(self, websocket: WebSocket) -> dict[str, Any] | None:
        """The next message, or None when the peer has been silent for ``seconds``."""
        self._receiving = True
        try:
            message = await websocket.receive()
        except asyncio.CancelledError:
            if not self._expired:
                raise
            self._expired = False
            assert self._task is not None
            self._task.uncancel()
            self.heard()
            return None
        finally:
            self._receiving = False
        self.heard()
        return message

    def expect_within(self, seconds: float) -> None:
        """A new limit, counted from now (AudioHook's close handshake: 10 s from our disconnect)."""
        if seconds != self.seconds:
            self.seconds = seconds
            self.heard()
            self._timer.cancel()
            self._timer = self._loop.call_at(self._last + seconds, self._check)

    def stop(self) -> None:
        self._timer.cancel()

    @property
    def receiving(self) -> bool:
        """Whether the task is waiting in ``receive`` (not handling a message)."""
        return self._receiving

    def heard(self) -> None:
        """A message arrived (also one taken by ``receive_directly``)."""
        self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self.seconds
        if self._loop.time() < due or not self._receiving:
            self._timer = self._loop.call_at(max(due, self._loop.time() + 0.1), self._check)
            return
        self._expired = True
        assert self._task is not None
        self._task.cancel()
        self._timer = self._loop.call_at(self._loop.time() + self.seconds, self._check)


@dataclass
class LiveCall:
    """A call on this gateway: its session, the peer's adapter and transport, and its pending embeddings."""

    session: CallSession
    protocol: CallProtocol
    transport: CallTransport
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Windows on their way to a verdict (with when each ended, on time.monotonic()), and agent changes, in
    # the order they happened on the call (a transfer must not be applied to windows spoken before it).
    # None stops the verdict loop.
    windows: asyncio.Queue[PendingWindow | Rebind | None] = field(
        default_factory=lambda: asyncio.Queue(_WINDOW_QUEUE)
    )
    windows_queued: int = 0  # numbers the call's windows, for the embedding pool's thinning (one in k)
    # The call's own counter child: ``labels()`` per 20 ms frame cost ≈ 1.8 µs, the child's inc 0.2 µs.
    frames_received: Any = field(init=False)
    # Alert ids: the call id, a token of this stream of the call (a call id may stream again, e.g. after a
    # reconnect, and its alerts are other alerts), and the alert's number in it. The alert stream takes
    # each id once, so a write retried after an outage is never a second alert.
    stream_token: str = field(default_factory=lambda: secrets.token_hex(4))
    alert_numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.frames_received = metrics.FRAMES_RECEIVED.labels(self.session.protocol)


@dataclass(frozen=True)
class PendingWindow:
    window: SpeechWindow
    embedding: asyncio.Task[np.ndarray | None]  # None: shed under load (streamer/embedding.py)
    ended_at: float  # time.monotonic() when the VAD closed the window


@dataclass(frozen=True)
class Rebind:
    agent_id: str
    agent_channel: int | None
    in_band: bool


class CallRegistry:
    """The calls this gateway holds, by (tenant, call id), for agent bindings that arrive mid-call."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], LiveCall] = {}

    def get(self, tenant: str, call_id: str) -> LiveCall | None:
        return self.calls.get((tenant, call_id))


def ids(call: LiveCall | None) -> dict[str, str]:
    """Log tags: every line about a call carries its id (streamer/logs.py)."""
    if call is None:
        return {}
    return {"call_id": call.session.call_id, "tenant": call.session.tenant, "protocol": call.session.protocol}


def app_state(websocket: WebSocket) -> AppState:
    return websocket.app.state.vpmon


# --- authentication of the upgrade ------------------------------------------------------------------
async def deny(websocket: WebSocket, status: int, detail: str) -> None:
    """Refuse the upgrade with an HTTP problem response (never a silent drop)."""
    challenge = {"WWW-Authenticate": 'Bearer realm="vpmon"'} if status == 401 else None
    response = problems.http_problem(status, detail, challenge)
    await websocket.send_denial_response(response)


async def key_for(websocket: WebSocket, token: str | None) -> ApiKey | None:
    state = app_state(websocket)
    if not token:
        return None
    key = await state.run_io(state.keys.authenticate, token)
    return key if key is not None and key.can(Permission.MONITOR) else None


def bearer(websocket: WebSocket) -> str | None:
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


@router.websocket("/v1/streams/native")
async def native_stream(websocket: WebSocket) -> None:
    key = await key_for(websocket, bearer(websocket))
    if key is None:
        await deny(websocket, 401, "send a monitor or admin API key: Authorization: Bearer vpk_…")
        return
    state = app_state(websocket)
    await websocket.accept()
    protocol = native.NativeStream(max_frame_bytes=state.settings.max_frame_bytes)
    await run_call(websocket, protocol, key.tenant, "native", limit_key=f"key:{key.key_id}")


@router.websocket("/v1/streams/twilio/{tenant}")
async def twilio_stream(websocket: WebSocket, tenant: str) -> None:
    state = app_state(websocket)
    token = (
        await state.run_io(state.service.tenants.twilio_auth_token, tenant) if _valid_tenant(tenant) else None
    )
    signature = websocket.headers.get("x-twilio-signature", "")
    url = public_url(websocket)
    if token is None or not signature or not twilio.validate_twilio_signature(token, url, signature):
        await deny(
            websocket,
            403,
            "X-Twilio-Signature is missing or wrong for this URL, or the tenant has no Twilio auth token "
            "(set it with PATCH /v1/tenant); check that the public URL matches VPMON_PUBLIC_URL",
        )
        return
    await websocket.accept()
    protocol = twilio.TwilioMediaStream(agent_track=state.settings.twilio_agent_track)
    await run_call(websocket, protocol, tenant, "twilio", limit_key=f"tenant:{tenant}")  # no key: per tenant


@router.websocket("/v1/streams/audiohook")
async def audiohook_stream(websocket: WebSocket) -> None:
    """AudioHook refuses after ``open`` with a ``disconnect`` (the client shows its reason), so the
    upgrade is accepted even when the key is wrong; missing AudioHook headers are refused at once."""
    state = app_state(websocket)
    headers = dict(websocket.headers)
    missing = audiohook.required_headers_missing(headers)
    if missing:
        await deny(websocket, 400, f"missing AudioHook headers: {', '.join(missing)}")
        return
    key = await key_for(websocket, headers.get("x-api-key"))
    auth_error = None if key is not None else "the X-API-KEY is not a valid vpmon monitor key"
    if key is not None:
        secret = await state.run_io(state.service.tenants.audiohook_client_secret, key.tenant)
        if secret is not None:
            auth_error = audiohook.verify_message_signature(
                "GET",
                headers.get("host", ""),
                websocket.url.path + _query(websocket),
                headers,
                secret,
                time.time(),
            )
            if auth_error is None and not await first_use(state, headers.get("signature", "")):
                auth_error = "this signature was used before (a replayed request)"
    if auth_error is not None:
        await asyncio.sleep(AUTH_FAILURE_DELAY_S)  # as the reference server does: slows guessing down
    await websocket.accept()
    protocol = audiohook.AudioHookSession(
        session_id=headers["audiohook-session-id"],
        auth_error=auth_error,
        organization_id=headers["audiohook-organization-id"],
    )
    tenant, limit_key = (key.tenant, f"key:{key.key_id}") if key is not None else (None, "")
    await run_call(websocket, protocol, tenant, "audiohook", limit_key=limit_key)


async def first_use(state: AppState, signature: str) -> bool:
    """True the first time a signature is seen (by any gateway) within its validity window."""
    digest = hashlib.sha256(signature.encode()).hexdigest()
    return bool(await state.redis.set(f"vpsig:{digest}", 1, nx=True, ex=SIGNATURE_MEMORY_S))


def _valid_tenant(tenant: str) -> bool:
    return bool(TENANT_RE.fullmatch(tenant))


def _query(websocket: WebSocket) -> str:
    return f"?{websocket.url.query}" if websocket.url.query else ""


def public_url(websocket: WebSocket) -> str:
    """The URL the telephony platform connected to (what Twilio signs): VPMON_PUBLIC_URL behind a proxy
    that terminates TLS, else the Host header and the scheme the server saw."""
    base = app_state(websocket).settings.public_url
    if base:
        # Twilio signs the wss:// URL it connects to; accept the setting written as https:// too.
        base = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return base.rstrip("/") + websocket.url.path + _query(websocket)
    return str(websocket.url)


# --- one call ---------------------------------------------------------------------------------------
async def run_call(
    websocket: WebSocket, protocol: CallProtocol, tenant: str | None, name: str, limit_key: str
) -> None:
    """``limit_key``: what the call counts against under VPMON_KEY_MAX_CALLS (``key:<key id>``, or
    ``tenant:<tenant>`` for Twilio, whose upgrade carries no key)."""
    state = app_state(websocket)
    transport = WebSocketTransport(websocket)
    call: LiveCall | None = None
    slot: CallSlot | None = None
    consumer: asyncio.Task[None] | None = None
    idle = state.settings.ws_idle_seconds
    watch = IdleWatch(idle)
    direct = websocket.scope.get("extensions", {}).get(DIRECT_RECEIVE)  # streamer/ws_protocol.py
    try:
        while protocol.close_requested is None:
            # AudioHook ends with a handshake: after our disconnect the client has 10 s to close.
            awaiting_close = getattr(protocol, "awaiting_close", False)
            watch.expect_within(min(idle, audiohook.CLOSE_TIMEOUT_SECONDS) if awaiting_close else idle)
            message = await watch.receive(websocket)
            if message is None:
                if awaiting_close:
                    protocol.close_timeout_expired()  # type: ignore[attr-defined]
                else:
                    protocol.fail(CLOSE_POLICY_VIOLATION, f"no message for {idle:.0f} s")
                continue
            if message["type"] == "websocket.disconnect":
                metrics.CALL_CLOSES.labels(name, metrics.close_code(message.get("code"))).inc()
                protocol.connection_lost()
                await handle_events(state, protocol, call)
                return
            events = message.get(DIRECT_EVENTS)  # parsed by receive_directly
            if events is None:
                parse(protocol, message)
                events = protocol.events_received()
            elif DIRECT_ERROR in message:
                raise message[DIRECT_ERROR]
            for event in events:
                if isinstance(event, CallStarted):
                    if tenant is None:  # AudioHook with a failed key: the adapter has disconnected
                        continue
                    slot = admit(state, protocol, tenant, limit_key)
                    if slot is None:
                        continue
                    call = await start_call(state, transport, protocol, tenant, name, event)
                    if call is not None:
                        consumer = asyncio.create_task(verdict_loop(state, call))
                        if direct is not None:
                            direct(partial(receive_directly, state, call, protocol, watch))
                else:
                    await handle_event(state, call, event)
            await flush(transport, protocol, call)
        close = protocol.close_requested
        if call is not None and consumer is not None and close is not None and close.code == CLOSE_NORMAL:
            # The peer ended the call: finish its windows first, so their verdicts and any alert still
            # reach it, then close.
            await drain(call, consumer)
            consumer = None
        await flush(transport, protocol, call)
        if close is not None:
            metrics.CALL_CLOSES.labels(name, metrics.close_code(close.code)).inc()
            if slot is not None:
                slot.release()  # before the peer hears the close: its next call may follow at once
            await transport.close(close.code, close.reason)
    except WebSocketDisconnect as exc:
        metrics.CALL_CLOSES.labels(name, metrics.close_code(exc.code)).inc()
        protocol.connection_lost()
        await handle_events(state, protocol, call)
    finally:
        if direct is not None:
            direct(None)
        watch.stop()
        if slot is not None:
            slot.release()  # however the call ended; a second release counts nothing
        if call is not None:
            await end_call(state, call, consumer)


DIRECT_EVENTS = "vpmon.events"  # in a message receive_directly hands on: its events, already parsed
DIRECT_ERROR = "vpmon.error"  # and what handling them raised, for the call's task to raise


def receive_directly(
    state: AppState, call: LiveCall, protocol: CallProtocol, watch: IdleWatch, message: dict[str, Any]
) -> dict[str, Any] | None:
    """A live call's message, taken as it arrives (streamer/ws_protocol.py) while the call's task waits
    for one: audio goes to the session at once, and its windows to the embedder, which spares each frame
    a task switch and the ASGI queue. Anything else (a control message, a close, a reply to send), and
    everything while the task is busy, goes on to the task, which handles it as before."""
    if not watch.receiving or protocol.close_requested is not None or call.windows.qsize() > _DIRECT_ROOM:
        return message
    try:
        parse(protocol, message)
        watch.heard()
        events = protocol.events_received()
        if (
            protocol.close_requested is not None
            or protocol.pending_output
            or not all(isinstance(event, AudioChunk) for event in events)
        ):
            return {"type": "websocket.receive", DIRECT_EVENTS: events}
        for event in events:
            for window in feed_audio(call, event):
                call.windows.put_nowait(pending_window(state, call, window))
    except Exception as exc:  # raised in the call's task, as if it had handled the message itself
        return {"type": "websocket.receive", DIRECT_EVENTS: [], DIRECT_ERROR: exc}
    return None


def parse(protocol: CallProtocol, message: dict[str, Any]) -> None:
    """A websocket message (ASGI ``websocket.receive``) into the protocol's adapter."""
    if message.get("text") is not None:
        protocol.receive_text(message["text"])
    elif message.get("bytes") is not None:
        protocol.receive_bytes(message["bytes"])


def admit(state: AppState, protocol: CallProtocol, tenant: str, limit_key: str) -> CallSlot | None:
    """A slot for a new call under VPMON_KEY_MAX_CALLS, or None: the call is refused the protocol's way
    (close 1008; AudioHook: a disconnect with reason "error", then the close)."""
    slot = state.limits.calls.acquire(limit_key)
    if slot is None:
        limit, kind = state.limits.calls.limit, limit_key.partition(":")[0]
        log.warning("call refused: %s holds %d calls here", limit_key, limit, extra={"tenant": tenant})
        protocol.fail(
            CLOSE_POLICY_VIOLATION,
            f"too many calls at once for this {kind}: {limit} on this gateway (VPMON_KEY_MAX_CALLS)",
        )
    return slot


async def handle_events(state: AppState, protocol: CallProtocol, call: LiveCall | None) -> None:
    for event in protocol.events_received():
        if not isinstance(event, CallStarted):
            await handle_event(state, call, event)


async def handle_event(state: AppState, call: LiveCall | None, event: Any) -> None:
    if isinstance(event, ProtocolViolation):
        log.warning("protocol violation: %s (close %d)", event.reason, event.code, extra=ids(call))
        return
    if call is None:
        return
    if isinstance(event, AudioChunk):
        for window in feed_audio(call, event):
            await queue_window(state, call, window)
        return
    session = call.session
    noisy_before = session.windows_too_noisy
    if isinstance(event, AudioDiscarded):
        metrics.AUDIO_DROPPED.labels(session.protocol).inc(event.seconds)
        for window in session.gap(event.seconds):
            await queue_window(state, call, window)
    elif isinstance(event, AgentChanged):
        await call.windows.put(Rebind(event.agent_id, event.agent_channel, in_band=True))
    elif isinstance(event, CallEnded):
        for window in session.finish():
            await queue_window(state, call, window)
    elif isinstance(event, CallPaused | CallResumed):
        pass  # no audio arrives while paused; the media clock does not run
    count_too_noisy(session.protocol, noisy_before, session.windows_too_noisy)


def feed_audio(call: LiveCall, chunk: AudioChunk) -> list[SpeechWindow]:
    """A chunk of the call's audio into its session → the speech windows it closed."""
    call.frames_received.inc()
    audio = call.session.audio  # per frame: its own counter, not the session's total (a property)
    if audio is None:
        return call.session.feed(chunk)
    noisy_before = audio.windows_too_noisy
    windows = call.session.feed(chunk)
    count_too_noisy(call.session.protocol, noisy_before, audio.windows_too_noisy)
    return windows


def count_too_noisy(protocol: str, before: int, after: int) -> None:
    if after != before:
        metrics.WINDOWS_TOO_NOISY.labels(protocol).inc(after - before)


async def queue_window(state: AppState, call: LiveCall, window: SpeechWindow) -> None:
    await call.windows.put(pending_window(state, call, window))


def pending_window(state: AppState, call: LiveCall, window: SpeechWindow) -> PendingWindow:
    # The task queues the window for the embedding pool at once; the verdict loop awaits tasks in order.
    # A call verified with confidence (its last verdict) may spare windows when the pool is behind.
    ended_at = time.monotonic()
    metrics.WINDOWS.labels(call.session.protocol).inc()
    sequence, sheddable = call.windows_queued, may_shed(call.session)
    call.windows_queued += 1
    task = asyncio.create_task(
        state.embeddings.embed(window.samples, ended_at, sheddable=sheddable, sequence=sequence)
    )
    return PendingWindow(window, task, ended_at)


async def verdict_loop(state: AppState, call: LiveCall) -> None:
    while True:
        item = await call.windows.get()
        if item is None:
            return
        if isinstance(item, Rebind):
            unbound = False
            try:
                await bind(state, call, item.agent_id, item.agent_channel, item.in_band)
            except REDIS_ERRORS as exc:
                # The new agent's voiceprint is out of reach: verifying the old one would accuse the new
                # agent, so the call ends (the peer may stream it again once Redis is back).
                metrics.REDIS_ERRORS.inc()
                log.warning("agent %s not bound: Redis unavailable (%s)", item.agent_id, exc, extra=ids(call))
                call.protocol.fail(problems.CLOSE_INTERNAL_ERROR, "Redis unavailable; retry later")
                unbound = True
            if unbound or (
                item.in_band and call.session.state in (CallState.NOT_ENROLLED, CallState.MODEL_MISMATCH)
            ):
                # The new agent cannot be verified (bind() failed the call): close it now
                await flush(call.transport, call.protocol, call)
                close = call.protocol.close_requested
                await call.transport.close(close.code, close.reason)
                return
            continue
        try:
            embedding = await item.embedding
        except VpmonError as exc:
            log.warning("window not embedded: %s", exc, extra=ids(call))
            continue
        if embedding is None:
            continue  # shed: the pool was behind and this call was verified with confidence (counted)
        try:
            await publish(state, call, call.session.observe(item.window, embedding))
            latency = time.monotonic() - item.ended_at
            metrics.VERDICT_LATENCY.labels(call.session.protocol).observe(latency)
        except Exception:
            log.exception("a verdict failed", extra=ids(call))
            raise


async def start_call(
    state: AppState,
    transport: CallTransport,
    protocol: CallProtocol,
    tenant: str,
    name: str,
    started: CallStarted,
) -> LiveCall | None:
    if started.tenant is not None and started.tenant != tenant:
        protocol.fail(CLOSE_POLICY_VIOLATION, f"tenant {started.tenant!r} does not match the key's tenant")
        return None
    key = (tenant, started.call_id)
    if key in state.calls.calls:
        protocol.fail(CLOSE_POLICY_VIOLATION, f"call {started.call_id} is already streaming on this gateway")
        return None
    session = CallSession(
        tenant=tenant,
        call_id=started.call_id,
        protocol=name,
        model_id=state.embeddings.model_id,
        calibration=state.service.scorer.calibration,  # type: ignore[arg-type]
        policy=state.decision_policy,
    )
    session.start(started)
    call = LiveCall(session, protocol, transport)
    state.calls.calls[key] = call
    metrics.CALLS_ACTIVE.labels(name).inc()
    log.info("call started", extra=ids(call))
    await state.lease.track(tenant, started.call_id)
    await publish(state, call, [Output("call", session.describe())])
    # Who is the agent? In-band first; else a binding made through the API before the stream began.
    agent_id, agent_channel = started.agent_id, None
    if agent_id is None:
        bound = await state.redis.hgetall(binding_key(tenant, started.call_id))
        if bound:
            agent_id = bound[b"agent_id"].decode()
            agent_channel = int(bound[b"agent_channel"]) if bound.get(b"agent_channel") else None
    if agent_id is not None:
        await bind(state, call, agent_id, agent_channel, in_band=started.agent_id is not None)
    return call


async def bind(
    state: AppState, call: LiveCall, agent_id: str, agent_channel: int | None, in_band: bool
) -> None:
    """Bind an agent (first time or transfer). An in-band agent that cannot be verified ends the call
    with a precise close; the notice goes to the feed either way, so supervisors see it."""
    session = call.session
    try:
        check_speaker(agent_id)
        voiceprint = await state.run_io(state.service.store.get, session.tenant, agent_id)
    except VpmonError:
        voiceprint = None
    mean = await state.run_io(state.service.centring_mean, voiceprint) if voiceprint is not None else None
    outputs = session.bind(agent_id, voiceprint, agent_channel, mean)
    await publish(state, call, outputs)
    if in_band and session.state is CallState.NOT_ENROLLED:
        call.protocol.fail(
            CLOSE_UNKNOWN_AGENT, f"agent {agent_id} is not enrolled in tenant {session.tenant}"
        )
    elif in_band and session.state is CallState.MODEL_MISMATCH:
        call.protocol.fail(CLOSE_MODEL_MISMATCH, f"agent {agent_id}'s voiceprint is another model's")


async def publish(state: AppState, call: LiveCall, outputs: list[Output]) -> None:
    """Redis first (alerts are never lost: while Redis is away they are spooled, on disk before the peer
    hears of them), then the peer."""
    session = call.session
    for output in outputs:
        if output.kind in ("alert", "notice"):
            data = {
                **output.data,
                "alert_id": f"{session.call_id}:{call.stream_token}:{next(call.alert_numbers)}",
                # When it happened, as it may reach the stream (and take its id there) much later.
                "raised_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
            stream_id = await state.outbox.alert(session.tenant, output.kind, data)
            metrics.ALERTS.labels(session.protocol, data["kind"]).inc()
            where = stream_id or "spooled"
            log.warning("%s %s %s (%s)", output.kind, data["kind"], data["alert_id"], where, extra=ids(call))
            call.protocol.send_alert(data)
        else:
            await state.outbox.verdict(session.tenant, output.kind, output.data)
            if output.kind == "verdict":
                metrics.VERDICTS.labels(session.protocol, output.data["state"]).inc()
                call.protocol.send_verdict(output.data)
    if outputs:
        await state.outbox.call_state(session.tenant, session.call_id, call_state(state, session))
        await flush(call.transport, call.protocol, call)


def call_state(state: AppState, session: CallSession, **ended: Any) -> dict[str, Any]:
    """The call as the calls list shows it, with the gateway holding it (streamer/liveness.py ends the
    calls of a gateway that dies)."""
    return {**session.describe(), "gateway": state.gateway_id, **ended}


async def flush(transport: CallTransport, protocol: CallProtocol, call: LiveCall | None) -> None:
    outgoing = protocol.data_to_send()
    if not outgoing:
        return
    lock = call.send_lock if call is not None else contextlib.nullcontext()
    async with lock:  # the receive loop and the verdict loop both send
        for data in outgoing:
            await transport.send(data)


async def drain(call: LiveCall, consumer: asyncio.Task[None], timeout: float = 30.0) -> None:
    """Let the verdict loop finish the windows already queued, then stop it."""
    await call.windows.put(None)
    try:
        await asyncio.wait_for(consumer, timeout=timeout)
    except TimeoutError:
        log.warning("the last windows' verdicts took over %.0f s; dropped", timeout, extra=ids(call))


async def end_call(state: AppState, call: LiveCall, consumer: asyncio.Task[None] | None) -> None:
    session = call.session
    if state.calls.calls.pop((session.tenant, session.call_id), None) is not None:
        metrics.CALLS_ACTIVE.labels(session.protocol).dec()
    if consumer is not None:
        await drain(call, consumer)
    ended = session.end("stop")
    log.info(
        "call ended: %d alerts, %.1f s of agent speech",
        session.alerts,
        session.net_speech_seconds,
        extra=ids(call),
    )
    await state.outbox.verdict(session.tenant, ended.kind, ended.data)
    reason = ended.data["ended_reason"]
    await state.outbox.call_state(
        session.tenant, session.call_id, call_state(state, session, ended_reason=reason), ended=True
    )
    await update_voiceprint(state, call)


async def update_voiceprint(state: AppState, call: LiveCall) -> None:
    """A confidently verified call updates its agent's voiceprint, for tenants that opted in
    (verifier/adaptation.py says what qualifies)."""
    session = call.session
    if session.decision is None or session.agent_id is None:
        return
    material = session.decision.material.result()
    try:
        if not (await state.run_io(state.service.tenants.get, session.tenant)).voiceprint_updates:
            return
        if isinstance(material, str):
            outcome = "not_eligible"
            log.info("voiceprint not updated: %s", material, extra=ids(call))
        else:
            updated = await state.run_io(
                state.service.update_from_call, session.tenant, session.agent_id, material
            )
            outcome = "updated" if updated is not None else "refused"
            log.info(
                "voiceprint %s from %.0f s of verified speech",
                "updated" if updated is not None else "not updated (changed meanwhile, or full)",
                material.speech_seconds,
                extra=ids(call),
            )
    except REDIS_ERRORS as exc:
        outcome = "redis_unavailable"
        log.warning("voiceprint not updated: Redis unavailable (%s)", exc, extra=ids(call))
    except VpmonError as exc:
        outcome = "refused"
        log.warning("voiceprint not updated: %s", exc, extra=ids(call))
    metrics.VOICEPRINT_UPDATES.labels(outcome).inc()


# --- bindings through the API -----------------------------------------------------------------------
async def apply_binding(
    state: AppState, tenant: str, call_id: str, agent_id: str, agent_channel: int | None
) -> bool:
    """A binding made through the API (on any gateway) reaches the call if it is live here."""
    call = state.calls.get(tenant, call_id)
    if call is None:
        return False
    await call.windows.put(Rebind(agent_id, agent_channel, in_band=False))
    return True
