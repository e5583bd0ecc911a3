"""WebRTC calls over WHIP (RFC 9725): the thin asyncio shell around aiortc and streamer/protocols/whip.py.

Routes (one port with the REST API; every one needs a monitor or admin key, ``Authorization: Bearer``):

    POST   /v1/whip        the SDP offer (``Content-Type: application/sdp``); the call id, agent id and
                           tenant in ``Vpmon-Call-Id`` / ``Vpmon-Agent-Id`` / ``Vpmon-Tenant`` headers or
                           ``call_id`` / ``agent_id`` / ``tenant`` query parameters (all optional: the
                           server names the call, the key decides the tenant, the agent may be bound
                           through ``PUT /v1/calls/{call_id}/agent``). → ``201 Created``, ``Location:
                           /v1/whip/<session id>``, the SDP answer with every candidate (no trickle).
    DELETE /v1/whip/{id}   ends the call: its last windows' verdicts are published (and sent on the data
                           channel) first; → ``200`` with the call's final state. Any gateway answers it:
                           one that does not hold the session asks its owner through Redis (below).
    GET    /v1/whip        the tenant's sessions on this gateway and its live peer connections.

A call runs through the websocket gateway's own functions (``start_call``, ``handle_event``,
``verdict_loop``, ``end_call``): verdicts and alerts go to Redis and the SSE feeds exactly as for a
websocket call, and to the publisher's data channel when it opened one. A session also ends when ICE fails
or the connection closes, or after ``VPMON_WS_IDLE_SECONDS`` without audio. A refusal is an RFC 9457
problem and leaves nothing behind: the peer connection is closed before the answer goes out.

Refusals: 401 no or bad key, 403 a key without the monitor role or of another tenant than ``tenant``
(DELETE of another tenant's session: 404, as for one that does not exist), 415 not ``application/sdp``,
413 an offer over 64 KiB, 400 an offer that is not SDP or has no audio track the publisher sends in Opus
or PCMU (or has video), 422 ``agent-not-enrolled`` (the agent named has no voiceprint: the websocket
protocols close with 4004 for it), 409 ``model-mismatch`` (the voiceprint is another model's: 4009) or
``conflict`` (the call id is already streaming here), 429 the key holds ``VPMON_KEY_MAX_CALLS`` calls on
this gateway already, 404 an unknown session.

A session lives in the gateway process that answered its offer (its peer connection, its call), but the
DELETE may reach another: a sibling worker of ``vpmon serve --workers N`` behind the same port, or another
gateway behind a load balancer. A session id starts with its gateway's id, so the gateway that gets the
DELETE publishes it on the owner's channel ``vpwhip:<gateway id>`` (Redis pub/sub) with a reply channel;
the owner ends the session as for its own DELETE and publishes the call's final state back. No owner
listening (the publish reached nobody): 404, the session ended with its gateway; no answer within
``FORWARD_TIMEOUT_S``: 504. ``GET /v1/whip`` lists the sessions of the gateway process that answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any

from aiortc import MediaStreamTrack, RTCDataChannel, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse

from streamer import metrics, problems
from streamer.api import Monitor, state
from streamer.gateway import LiveCall, drain, end_call, flush, handle_event, ids, start_call, verdict_loop
from streamer.protocols._common import Phase
from streamer.protocols.events import CLOSE_NORMAL, CLOSE_POLICY_VIOLATION, CallStarted
from streamer.protocols.whip import (
    MAX_OFFER_BYTES,
    Codec,
    WhipCall,
    WhipRefusal,
    call_identity,
    check_offer,
    is_sdp,
)
from streamer.redis_clients import REDIS_ERRORS, is_cluster
from streamer.redis_clients import pubsub as redis_pubsub
from streamer.settings import Settings
from streamer.state import AppState
from streamer.webrtc import ice_configuration, include_loopback_candidates

log = logging.getLogger("vpmon.whip")
router = APIRouter()

PENDING_MESSAGES = 256  # verdicts waiting for the publisher's data channel to open
CHANNEL_CLOSE_SECONDS = 2.0  # for the data channel's close to reach the publisher after the last verdict
SESSION_PATH = "/v1/whip/{session_id}"
FORWARD_TIMEOUT_S = 30.0  # for the owner of a session to end it (its last windows) and answer
RESUBSCRIBE_S = 1.0  # after Redis dropped the forwarded DELETEs' subscription


def new_session_id(gateway_id: str) -> str:
    """Its gateway's id (hex), a dash, a random part: any gateway can tell whose session it is."""
    return f"{gateway_id}-{secrets.token_urlsafe(16)}"


def session_owner(session_id: str) -> str | None:
    """The id of the gateway that made the session, or None for an id no gateway made."""
    owner = session_id.partition("-")[0]
    return owner if re.fullmatch(r"[0-9a-f]{12}", owner) else None  # secrets.token_hex(6)


def forward_channel(gateway_id: str) -> str:
    return f"vpwhip:{gateway_id}"


class DataChannelTransport:
    """A call's ``CallTransport``: verdict and alert messages to the data channel the publisher opened.

    Messages before the channel opens wait (a bounded few); without a channel they are dropped, as the
    telephony protocols drop them: the feeds have everything."""

    def __init__(self) -> None:
        self.channel: RTCDataChannel | None = None
        self.pending: deque[str | bytes] = deque(maxlen=PENDING_MESSAGES)
        self.closed = asyncio.Event()

    def attach(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:
            return  # the first channel the publisher opened carries the call's messages
        self.channel = channel
        channel.on("close", self.closed.set)
        if channel.readyState == "open":
            self._send_pending()
        else:
            channel.on("open", self._send_pending)

    def _send_pending(self) -> None:
        while self.pending and self._open:
            self.channel.send(self.pending.popleft())  # type: ignore[union-attr]

    @property
    def _open(self) -> bool:
        return self.channel is not None and self.channel.readyState == "open"

    async def send(self, data: str | bytes) -> None:
        if self._open:
            self.channel.send(data)  # type: ignore[union-attr]
        else:
            self.pending.append(data)

    async def close(self, code: int, reason: str) -> None:
        """Close the channel after what was sent: SCTP sends queued messages before the stream reset, so
        the publisher sees the channel close after the last verdict."""
        if not self._open:
            return
        self.channel.close()  # type: ignore[union-attr]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), CHANNEL_CLOSE_SECONDS)


@dataclass
class WhipSession:
    id: str
    tenant: str
    pc: RTCPeerConnection
    track: MediaStreamTrack
    protocol: WhipCall
    transport: DataChannelTransport
    call: LiveCall | None = None
    task: asyncio.Task[None] | None = None
    # Why the session ends, when something other than the audio ends it: "deleted", "lost", "shutdown".
    ending: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def end(self, reason: str) -> None:
        if not self.ending.done():
            self.ending.set_result(reason)

    def describe(self) -> dict[str, Any]:
        session = self.call.session if self.call is not None else None
        return {
            "id": self.id,
            "call_id": self.protocol.call_id,
            "codec": self.protocol.codec,
            "connection_state": self.pc.connectionState,
            "call": session.describe() if session is not None else None,
        }


class WhipSessions:
    """The WHIP sessions and peer connections of this gateway. A peer connection is counted from its
    creation until ``close()`` has finished, so a test (``GET /v1/whip``) sees any that a refusal or an
    ended call left open."""

    def __init__(self, settings: Settings) -> None:
        self.configuration = ice_configuration(settings.whip_ice_servers)
        if settings.whip_loopback_candidates:
            include_loopback_candidates()
        self.sessions: dict[str, WhipSession] = {}
        self.peer_connections: dict[RTCPeerConnection, str] = {}  # → tenant
        self.forwarded: set[asyncio.Task[None]] = set()  # DELETEs other gateways passed on, being done

    def peer_connection(self, tenant: str) -> RTCPeerConnection:
        pc = RTCPeerConnection(self.configuration)
        self.peer_connections[pc] = tenant
        self._count_peer_connections()
        return pc

    async def close_peer_connection(self, pc: RTCPeerConnection) -> None:
        try:
            await pc.close()
        finally:
            self.peer_connections.pop(pc, None)
            self._count_peer_connections()

    def _count_peer_connections(self) -> None:
        # With several workers the gauge is otherwise written once a second (streamer/metrics.py): a
        # scrape right after a call must not see its peer connection still open. (In one process the
        # scrape reads the dict itself.)
        metrics.WHIP_PEER_CONNECTIONS.set(len(self.peer_connections))

    def live_peer_connections(self, tenant: str) -> int:
        return sum(1 for owner in self.peer_connections.values() if owner == tenant)

    async def open(
        self, app: AppState, tenant: str, call_id: str, agent_id: str | None, offer: str, codec: Codec
    ) -> tuple[WhipSession, str]:
        """Answer the offer and start the call; returns the session and the SDP answer. On any refusal
        or error the peer connection is closed before this returns."""
        pc = self.peer_connection(tenant)
        call: LiveCall | None = None
        try:
            # The transceiver exists before the offer is applied, so aiortc matches the offer's audio
            # track to it and answers with the one codec chosen: the audio format is known from here on.
            transceiver = pc.addTransceiver("audio", direction="recvonly")
            capabilities = RTCRtpReceiver.getCapabilities("audio")
            assert capabilities is not None
            transceiver.setCodecPreferences(
                [c for c in capabilities.codecs if c.mimeType.lower() == f"audio/{codec.lower()}"]
            )
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            except Exception as exc:  # aiortc's own checks (RTCP mux, BUNDLE, codecs)
                raise WhipRefusal(400, f"the SDP offer was not accepted: {exc}") from None
            await pc.setLocalDescription(await pc.createAnswer())
            answer = pc.localDescription.sdp
            protocol = WhipCall(call_id, codec, agent_id)
            transport = DataChannelTransport()
            pc.on("datachannel", transport.attach)
            track = transceiver.receiver.track
            session = WhipSession(new_session_id(app.gateway_id), tenant, pc, track, protocol, transport)

            @pc.on("connectionstatechange")
            def on_state() -> None:
                if pc.connectionState in ("failed", "closed"):
                    session.end("lost")

            protocol.start()
            started = next(e for e in protocol.events_received() if isinstance(e, CallStarted))
            call = await start_call(app, transport, protocol, tenant, "whip", started)
            if call is None:  # start_call refused it: the call id went live here meanwhile
                reason = protocol.close_requested.reason if protocol.close_requested else "call refused"
                raise WhipRefusal(409, reason, slug="conflict", title="Conflict")
        except BaseException:
            try:
                if call is not None:
                    await end_call(app, call, None)
            finally:
                await self.close_peer_connection(pc)
            raise
        session.call = call
        self.sessions[session.id] = session
        session.task = asyncio.create_task(self._run(app, session))
        return session, answer

    async def _run(self, app: AppState, session: WhipSession) -> None:
        call, protocol, transport = session.call, session.protocol, session.transport
        assert call is not None
        consumer: asyncio.Task[None] | None = asyncio.create_task(verdict_loop(app, call))
        try:
            await receive_audio(app, session)
            close = protocol.close_requested
            if close is not None and close.code == CLOSE_NORMAL:
                # DELETE: finish the windows first, so their verdicts and any alert reach the publisher.
                await drain(call, consumer)  # type: ignore[arg-type]
                consumer = None
            await flush(transport, protocol, call)
            await transport.close(close.code if close else CLOSE_NORMAL, close.reason if close else "")
        except Exception:
            log.exception("WHIP session failed", extra=ids(call))
        finally:
            try:
                await end_call(app, call, consumer)
            finally:
                self.sessions.pop(session.id, None)
                await self.close_peer_connection(session.pc)
                close = protocol.close_requested
                metrics.CALL_CLOSES.labels("whip", metrics.close_code(close.code if close else None)).inc()
                log.info(
                    "WHIP session ended (%s): %d frames, %.2f s of audio missing",
                    close.reason if close is not None else "connection lost",
                    protocol.frames,
                    protocol.discarded_seconds,
                    extra=ids(call),
                )

    async def end(self, session: WhipSession, reason: str) -> None:
        """End a session and wait until its call has ended (its last verdicts published)."""
        session.end(reason)
        if session.task is not None:
            await asyncio.shield(session.task)

    async def close_all(self) -> None:
        """At shutdown: end every call (their ends are published), then close what is left."""
        sessions = list(self.sessions.values())
        await asyncio.gather(*(self.end(s, "shutdown") for s in sessions), return_exceptions=True)
        for pc in list(self.peer_connections):
            await self.close_peer_connection(pc)
        await asyncio.gather(*self.forwarded, return_exceptions=True)  # their answers, then Redis closes

    async def serve_forwarded(self, app: AppState) -> None:
        """DELETEs of this gateway's sessions that reached another gateway, until cancelled; subscribed
        again whenever Redis drops the subscription."""
        while True:
            try:
                pubsub = await redis_pubsub(app.redis)
                try:
                    await pubsub.subscribe(forward_channel(app.gateway_id))
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            task = asyncio.create_task(self._answer_forwarded(app, message["data"]))
                            self.forwarded.add(task)
                            task.add_done_callback(self.forwarded.discard)
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            except REDIS_ERRORS as exc:
                log.warning("forwarded WHIP DELETEs: Redis unavailable (%s); subscribing again", exc)
            await asyncio.sleep(RESUBSCRIBE_S)

    async def _answer_forwarded(self, app: AppState, data: bytes) -> None:
        try:
            request = json.loads(data)
            session_id, tenant, reply = request["session_id"], request["tenant"], request["reply"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed forwarded WHIP DELETE: %s", exc)
            return
        session = self.sessions.get(session_id)
        answer: dict[str, Any] = {"status": 404}
        if session is not None and session.tenant == tenant:
            await self.end(session, "deleted")
            assert session.call is not None
            answer = {"status": 200, "call": session.call.session.describe()}
        try:
            await app.redis.publish(reply, json.dumps(answer, default=str))
        except REDIS_ERRORS as exc:  # the other gateway answers 503 or 504 to its client
            log.warning("could not answer a forwarded WHIP DELETE: %s", exc)


async def forward_end(app: AppState, owner: str, session_id: str, tenant: str) -> dict[str, Any] | None:
    """End a session another gateway holds: its final call state, or None if it has no such session
    (or runs no more). TimeoutError if it does not answer within ``FORWARD_TIMEOUT_S``."""
    reply = f"vpwhip-reply:{secrets.token_urlsafe(12)}"
    request = json.dumps({"session_id": session_id, "tenant": tenant, "reply": reply})
    pubsub = await redis_pubsub(app.redis)
    try:
        await pubsub.subscribe(reply)  # before the request goes out: the answer cannot come first
        receivers = await app.redis.publish(forward_channel(owner), request)
        # A cluster counts only the node's own subscribers: there, wait for the answer in any case.
        if receivers == 0 and not is_cluster(app.redis):
            return None
        async with asyncio.timeout(FORWARD_TIMEOUT_S):
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    answer = json.loads(message["data"])
                    return answer.get("call") if answer.get("status") == 200 else None
        return None
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()


async def receive_audio(app: AppState, session: WhipSession) -> None:
    """Frames from the track into the call until it ends: DELETE, a lost connection, no audio for
    ``ws_idle_seconds``, or the call failing (an agent that cannot be verified)."""
    call, protocol, track = session.call, session.protocol, session.track
    assert call is not None
    idle = app.settings.ws_idle_seconds
    while protocol.phase is Phase.LIVE:
        receiving = asyncio.ensure_future(track.recv())
        done, _ = await asyncio.wait(
            {receiving, session.ending}, timeout=idle, return_when=asyncio.FIRST_COMPLETED
        )
        if receiving in done:
            try:
                frame = receiving.result()
            except MediaStreamError:  # the track ended: the peer connection closed
                protocol.connection_lost()
            else:
                late_before = protocol.frames_late
                protocol.receive_audio(
                    frame.to_ndarray().tobytes(),
                    sample_format=frame.format.name,
                    sample_rate=frame.sample_rate,
                    channels=frame.layout.nb_channels,
                    pts=frame.pts,
                    time_base=frame.time_base,
                )
                metrics.FRAMES_LATE.labels("whip").inc(protocol.frames_late - late_before)
        else:
            receiving.cancel()
            if session.ending.done():
                reason = session.ending.result()
                if reason == "deleted":
                    protocol.stop()
                elif reason == "shutdown":
                    protocol.stop("the server is shutting down")
                else:
                    protocol.connection_lost()
            else:
                protocol.fail(CLOSE_POLICY_VIOLATION, f"no audio for {idle:.0f} s")
        for event in protocol.events_received():
            await handle_event(app, call, event)
        await flush(session.transport, protocol, call)


# --- routes -----------------------------------------------------------------------------------------
def whip_sessions(request: Request) -> WhipSessions:
    return request.app.state.whip


def refusal(exc: WhipRefusal) -> JSONResponse:
    if exc.slug is not None:
        return problems.problem(exc.status, exc.slug, exc.title or exc.slug, exc.detail)
    return problems.http_problem(exc.status, exc.detail)


async def read_offer(request: Request) -> str:
    """The body, refused with 413 past ``MAX_OFFER_BYTES`` (counted, not trusted from Content-Length)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_OFFER_BYTES:
            raise WhipRefusal(413, f"the SDP offer is over {MAX_OFFER_BYTES} bytes: send the offer alone")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise WhipRefusal(400, "the SDP offer is not UTF-8 text") from None


async def check_agent(app: AppState, tenant: str, agent_id: str) -> None:
    """Refuse an agent that cannot be verified before any peer connection exists."""
    voiceprint = await app.run_io(app.service.store.get, tenant, agent_id)
    if voiceprint is None:
        raise WhipRefusal(
            422,
            f"agent {agent_id!r} is not enrolled in tenant {tenant!r}: enrol it first, or publish without "
            "an agent and bind one with PUT /v1/calls/{call_id}/agent",
            slug="agent-not-enrolled",
            title="Agent not enrolled",
        )
    if voiceprint.model_id != app.embeddings.model_id:
        raise WhipRefusal(
            409,
            f"agent {agent_id!r} was enrolled with {voiceprint.model_id}, the gateway runs "
            f"{app.embeddings.model_id}: re-embed the tenant's voiceprints (vpmon reembed)",
            slug="model-mismatch",
            title="Voiceprint made by another model",
        )


@router.post(
    "/v1/whip",
    status_code=201,
    tags=["calls"],
    response_class=Response,
    responses={201: {"content": {"application/sdp": {}}, "description": "The SDP answer."}},
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/sdp": {"schema": {"type": "string"}}}}
    },
)
async def publish(request: Request, key: Monitor) -> Response:
    """Start a WebRTC call (WHIP, RFC 9725): the SDP offer in, the SDP answer out."""
    app, sessions = state(request), whip_sessions(request)
    try:
        if not is_sdp(request.headers.get("content-type")):
            raise WhipRefusal(
                415,
                "send the SDP offer with Content-Type: application/sdp",
                slug="unsupported-media-type",
                title="Unsupported media type",
            )
        offer = await read_offer(request)
        identity = call_identity(request.headers, request.query_params)
        if identity.tenant is not None and identity.tenant != key.tenant:
            raise WhipRefusal(403, f"the key belongs to another tenant than {identity.tenant!r}")
        audio = check_offer(offer)
        call_id = identity.call_id or str(uuid.uuid4())
        if app.calls.get(key.tenant, call_id) is not None:
            raise WhipRefusal(
                409, f"call {call_id} is already streaming on this gateway", "conflict", "Conflict"
            )
        if identity.agent_id is not None:
            await check_agent(app, key.tenant, identity.agent_id)
        slot = app.limits.calls.acquire(f"key:{key.key_id}")
        if slot is None:
            limit = app.limits.calls.limit
            detail = f"too many calls at once for this key: {limit} on this gateway (VPMON_KEY_MAX_CALLS)"
            raise WhipRefusal(429, detail)
        try:
            session, answer = await sessions.open(
                app, key.tenant, call_id, identity.agent_id, offer, audio.codec
            )
        except BaseException:
            slot.release()
            raise
        # The session's task ends however the call does (DELETE, a lost peer, idle, shutdown), and
        # frees the slot; its done callbacks run before any DELETE awaiting it answers.
        release = slot.release
        assert session.task is not None
        session.task.add_done_callback(lambda _: release())
    except WhipRefusal as exc:
        log.info("WHIP publish refused (%d): %s", exc.status, exc.detail, extra={"tenant": key.tenant})
        return refusal(exc)
    log.info(
        "WHIP session %s: %s, data channel %s",
        session.id,
        audio.codec,
        "offered" if audio.data_channel else "none",
        extra=ids(session.call),
    )
    location = SESSION_PATH.format(session_id=session.id)
    return Response(answer, 201, {"Location": location}, media_type="application/sdp")


SessionId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="From the Location header.")]


@router.delete(
    SESSION_PATH,
    tags=["calls"],
    response_model=None,
    responses={
        504: {
            "description": "The gateway holding the session did not answer within 30 s: retry.",
            "content": {problems.PROBLEM_JSON: {"schema": problems.PROBLEM_SCHEMA_REF}},
        }
    },
)
async def end_session(request: Request, key: Monitor, session_id: SessionId) -> JSONResponse:
    """End a WebRTC call; answers once its last verdicts are published, with the call's final state."""
    app, sessions = state(request), whip_sessions(request)
    session = sessions.sessions.get(session_id)
    not_found = f"no WHIP session {session_id}: it ended, or never existed"
    owner = session_owner(session_id)
    if session is None and owner is not None and owner != app.gateway_id:
        try:
            call = await forward_end(app, owner, session_id, key.tenant)
        except TimeoutError:
            detail = (
                f"the gateway holding WHIP session {session_id} did not answer within "
                f"{FORWARD_TIMEOUT_S:.0f} s; retry the DELETE"
            )
            return problems.problem(504, "gateway-timeout", "Gateway timeout", detail)
        outcome = "ended" if call is not None else "no such session there"
        log.info("WHIP session %s: DELETE passed to gateway %s: %s", session_id, owner, outcome)
        return JSONResponse(call) if call is not None else problems.http_problem(404, not_found)
    # Another tenant's session answers as one that does not exist: a 403 would confirm the id.
    if session is None or session.tenant != key.tenant:
        return problems.http_problem(404, not_found)
    await sessions.end(session, "deleted")
    assert session.call is not None
    return JSONResponse(session.call.session.describe())


@router.get("/v1/whip", tags=["calls"])
async def list_sessions(request: Request, key: Monitor) -> dict[str, Any]:
    """The tenant's WHIP sessions on this gateway, and its peer connections still open (each session
    has one; a refused publish or an ended session leaves none)."""
    sessions = whip_sessions(request)
    return {
        "sessions": [s.describe() for s in sessions.sessions.values() if s.tenant == key.tenant],
        "peer_connections": sessions.live_peer_connections(key.tenant),
    }
