"""Live calls and alerts over HTTP: bind an agent to a call, list calls, and the SSE feeds.

- ``PUT /v1/calls/{call_id}/agent``: the telephony integration says who the agent is (AudioHook carries
  no agent; a transfer changes it). Stored in Redis for a call that has not started yet, and published
  to every gateway for a call that is live.
- ``GET /v1/calls``: the tenant's live and recently ended calls with their latest state.
- ``GET /v1/alerts``: recent alerts and notices; ``GET /v1/alerts/stream``: the same as Server-Sent
  Events, replayed from ``Last-Event-ID``; ``GET /v1/calls/stream``: verdicts and call starts/ends.
- ``POST /v1/alerts/{event_id}/ack``: a supervisor acknowledges an alert (once; who and when are kept),
  which every supervisor's alert feed shows as an ``ack`` event.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from streamer.api import Monitor, state
from streamer.feeds import alerts_key, binding_channel, binding_key, verdicts_key
from streamer.gateway import apply_binding
from streamer.redis_clients import REDIS_ERRORS, is_cluster
from streamer.redis_clients import pubsub as redis_pubsub
from streamer.state import AppState
from streamer.store import SPEAKER_RE, check_speaker

log = logging.getLogger("vpmon.calls")
router = APIRouter()

BINDING_TTL_SECONDS = 24 * 3600
# Call ids and agent ids share the speaker-id alphabet of the store.
_CALL_ID = f"^{SPEAKER_RE.pattern}$"


class AgentBinding(BaseModel):
    agent_id: str = Field(pattern=_CALL_ID)
    agent_channel: int | None = Field(
        None, ge=0, le=7, description="Channel index of the agent, if not the default."
    )


class BindingOut(BaseModel):
    call_id: str
    agent_id: str
    agent_channel: int | None
    live: bool = Field(description="The call is streaming now (on some gateway) and switched at once.")


class CallOut(BaseModel):
    call_id: str
    agent_id: str | None
    site: str | None
    protocol: str
    model_id: str
    state: str
    started_at: str
    net_speech_seconds: float
    score: float | None
    threshold: float | None
    alerts: int
    ended_reason: str | None = Field(
        None, description="stop (the stream ended), or gateway_lost (its gateway stopped without ending it)."
    )
    gateway: str | None = Field(None, description="The gateway holding (or that held) the call.")


class AckBy(BaseModel):
    key_id: str
    name: str


class AckOut(BaseModel):
    event_id: str = Field(description="The acknowledged alert's id (its stream id).")
    acknowledged_by: AckBy = Field(description="The key that acknowledged it first.")
    acknowledged_at: str


class AlertOut(BaseModel):
    id: str = Field(description="The stream id: pass it as Last-Event-ID to resume after it.")
    type: str = Field(description="alert (a takeover) or notice (agent not enrolled, model mismatch).")
    data: dict[str, Any]
    acknowledged: AckOut | None = None


@router.put("/v1/calls/{call_id}/agent", tags=["calls"])
async def bind_agent(
    request: Request,
    key: Monitor,
    call_id: Annotated[
        str, Path(pattern=_CALL_ID, description="The telephony call id (callSid, conversationId…).")
    ],
    body: AgentBinding,
) -> BindingOut:
    """Tell vpmon who the agent on a call is: before the stream starts, during it, or on a transfer."""
    app = state(request)
    voiceprint = await app.run_io(app.service.store.get, key.tenant, check_speaker(body.agent_id))
    if voiceprint is None:
        raise HTTPException(
            404, f"agent {body.agent_id!r} is not enrolled in tenant {key.tenant!r}: enrol it first"
        )
    record = {
        "agent_id": body.agent_id,
        "agent_channel": "" if body.agent_channel is None else str(body.agent_channel),
    }
    await app.redis.hset(binding_key(key.tenant, call_id), mapping=record)
    await app.redis.expire(binding_key(key.tenant, call_id), BINDING_TTL_SECONDS)
    live = await apply_binding(app, key.tenant, call_id, body.agent_id, body.agent_channel)
    message = {"gateway": app.gateway_id, "call_id": call_id, **record}
    receivers = await app.redis.publish(binding_channel(key.tenant), json.dumps(message))
    # Every gateway subscribes, this one included; another gateway holding the call makes it live too.
    # A Redis Cluster counts only the subscribers on the node that took the PUBLISH: ask the call's state.
    others = receivers > 1 or is_cluster(app.redis)
    live = live or (others and await _live_elsewhere(app, key.tenant, call_id))
    return BindingOut(call_id=call_id, agent_id=body.agent_id, agent_channel=body.agent_channel, live=live)


async def _live_elsewhere(app: AppState, tenant: str, call_id: str) -> bool:
    call = await app.feeds.call(tenant, call_id)
    return call is not None and call["state"] != "ended"


@router.get("/v1/calls", tags=["calls"])
async def list_calls(request: Request, key: Monitor) -> list[CallOut]:
    """Live calls and calls that ended within the last hour, oldest first."""
    return [CallOut(**call) for call in await state(request).feeds.calls(key.tenant)]


@router.get("/v1/alerts", tags=["calls"])
async def recent_alerts(
    request: Request, key: Monitor, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[AlertOut]:
    """The newest alerts and notices first, each with its acknowledgement if it has one."""
    feeds = state(request).feeds
    entries = await feeds.recent_alerts(key.tenant, limit)
    acks = await feeds.acks(key.tenant, (e.id for e in entries))
    return [
        AlertOut(
            id=e.id, type=e.kind, data=e.data, acknowledged=AckOut(**acks[e.id]) if e.id in acks else None
        )
        for e in entries
    ]


# Redis stream ids are two 64-bit numbers; at most 19 digits each keeps them in range (a larger one
# makes Redis refuse the id, which would be a server error).
_STREAM_ID = r"^[0-9]{1,19}-[0-9]{1,19}$"


@router.post("/v1/alerts/{event_id}/ack", tags=["calls"])
async def acknowledge_alert(
    request: Request,
    key: Monitor,
    event_id: Annotated[
        str, Path(pattern=_STREAM_ID, description="The alert's id, as GET /v1/alerts gives it.")
    ],
) -> AckOut:
    """Acknowledge an alert or notice: the first acknowledgement stands (who and when), repeating it
    changes nothing. Every supervisor's ``/v1/alerts/stream`` gets it as ``event: ack``."""
    feeds = state(request).feeds
    if await feeds.alert(key.tenant, event_id) is None:
        raise HTTPException(
            404, f"no alert {event_id} in tenant {key.tenant!r}: take the id from GET /v1/alerts"
        )
    ack = await feeds.acknowledge(key.tenant, event_id, {"key_id": key.key_id, "name": key.name})
    return AckOut(**ack)


def _sse(app: AppState, key: str, after: str | None) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        try:
            async for entry in app.feeds.follow(key, after):
                if app.stopping:
                    return  # the client resumes from its Last-Event-ID on the next gateway
                yield ": keep-alive\n\n" if entry is None else entry.sse()
        except REDIS_ERRORS as exc:
            # The response has started, so no problem body can follow: end the stream. The client
            # reconnects after the retry delay and resumes with Last-Event-ID once Redis is back.
            log.warning("event stream ended: Redis failed (%s); the client will resume", exc)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# What the OpenAPI document says of the feeds' 200: an event stream, not JSON.
_SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-Sent Events, until the client disconnects.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}
LastEventId = Annotated[str | None, Header(pattern=_STREAM_ID, description="Resume after this event id.")]


@router.get("/v1/alerts/stream", tags=["calls"], response_class=StreamingResponse, responses=_SSE_RESPONSE)
async def alert_stream(
    request: Request, key: Monitor, last_event_id: LastEventId = None
) -> StreamingResponse:
    """Alerts and notices as Server-Sent Events (``event: alert|notice``, ``id`` = stream id), and
    acknowledgements (``event: ack``, data as ``POST /v1/alerts/{event_id}/ack`` returns). With
    ``Last-Event-ID`` every retained event after it is replayed first; without, only new ones."""
    return _sse(state(request), alerts_key(key.tenant), last_event_id)


@router.get("/v1/calls/stream", tags=["calls"], response_class=StreamingResponse, responses=_SSE_RESPONSE)
async def call_stream(request: Request, key: Monitor, last_event_id: LastEventId = None) -> StreamingResponse:
    """Verdicts and call starts/ends as Server-Sent Events (``event: verdict|call``)."""
    return _sse(state(request), verdicts_key(key.tenant), last_event_id)


async def binding_listener(app: AppState) -> None:
    """Bindings published by other gateways, applied to the calls this gateway holds."""
    pubsub = await redis_pubsub(app.redis)
    await pubsub.psubscribe("vpbind:{*}")
    try:
        async for message in pubsub.listen():
            if message.get("type") != "pmessage":
                continue
            try:
                data = json.loads(message["data"])
                if data.get("gateway") == app.gateway_id:
                    continue
                tenant = message["channel"].decode().partition("{")[2].rstrip("}")
                channel = int(data["agent_channel"]) if data.get("agent_channel") else None
                await apply_binding(app, tenant, data["call_id"], data["agent_id"], channel)
            except (ValueError, KeyError) as exc:
                log.warning("ignoring a malformed binding message: %s", exc)
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
