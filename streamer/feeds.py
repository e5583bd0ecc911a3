"""Alerts and live call state in Redis: written first, read by every feed.

- ``vpalerts:{<tenant>}``: a Redis Stream of alerts (takeovers) and notices (agent not enrolled, voiceprint
  of another model). An alert is added here before anything else happens to it; the SSE feed replays it
  from any id (``Last-Event-ID``), webhooks (``streamer/webhooks.py``) read it through a consumer group
  per endpoint. Bounded by ``MAXLEN ~ alert_retention`` entries.
- ``vpverdicts:{<tenant>}``: a Redis Stream of verdicts and call starts/ends, for live views; short
  (``MAXLEN ~ verdict_retention``).
- ``vpcalls:{<tenant>}``: a HASH call id → the call's latest state (JSON); an ended call's field expires
  (HEXPIRE) ``ended_call_ttl`` seconds after the end, so the list shows recent calls too.
- ``vpbind:{<tenant>}:<call id>``: the agent bound to a call through the API (a HASH with a TTL), and the
  pub/sub channel ``vpbind:{<tenant>}`` that tells the gateway holding the call.
- ``vpalert-ids:{<tenant>}``: a HASH alert id (the gateway's, in the alert's data) → its stream id, each
  field expiring ``ALERT_ID_TTL_S`` after it was written: the stream takes each alert once, however often
  it is written (a retry after an ambiguous failure, a spool flushed twice: streamer/spool.py).
- ``vpacks:{<tenant>}``: a HASH alert event id → who acknowledged it and when (JSON), written once; the
  same acknowledgement is added to the alert stream as an ``ack`` entry, so every supervisor's feed shows
  it live and replays it after a reconnect. Readers of the stream that want alerts only (webhooks) skip
  ``ack`` entries.

The ``{tenant}`` hash tag keeps a tenant's keys in one Redis Cluster slot.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aredis

ALERT = "alert"
NOTICE = "notice"
VERDICT = "verdict"
CALL = "call"
ACK = "ack"
# A feed's XREAD blocks for less than the Redis client's socket timeout (redis-py's default, 5 s, which
# the gateway keeps: streamer/app.py), else a quiet feed's read times out and breaks the SSE response.
FOLLOW_BLOCK_MS = 4_000


def alerts_key(tenant: str) -> str:
    return f"vpalerts:{{{tenant}}}"


def verdicts_key(tenant: str) -> str:
    return f"vpverdicts:{{{tenant}}}"


def calls_key(tenant: str) -> str:
    return f"vpcalls:{{{tenant}}}"


def alert_ids_key(tenant: str) -> str:
    return f"vpalert-ids:{{{tenant}}}"


def acks_key(tenant: str) -> str:
    return f"vpacks:{{{tenant}}}"


def binding_key(tenant: str, call_id: str) -> str:
    return f"vpbind:{{{tenant}}}:{call_id}"


def binding_channel(tenant: str) -> str:
    return f"vpbind:{{{tenant}}}"


@dataclass(frozen=True)
class FeedEntry:
    id: str  # the Redis Stream id: the SSE event id
    kind: str  # alert | notice | verdict | call
    data: dict[str, Any]

    def sse(self) -> str:
        return f"id: {self.id}\nevent: {self.kind}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class Retention:
    alerts: int = 100_000
    verdicts: int = 10_000
    ended_call_ttl: int = 3600


# The acknowledgement and its feed entry in one step (both keys share the tenant's hash tag, so this
# works in a cluster too): only the first acknowledgement of an alert is recorded and announced.
_ACKNOWLEDGE_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'kind', 'ack', 'data', ARGV[2])
  return 1
end
return 0
"""


# Longer than any outage a spool is expected to outlast: an alert written once, then again from a spool
# after this long, would be added twice.
ALERT_ID_TTL_S = 7 * 24 * 3600

# An alert and the record of its id in one step (both keys share the tenant's hash tag; AOF keeps a
# script's writes together): the first write of an id adds the entry, any later one returns its stream id.
# Not XADD with an id of our own: entries flushed after an outage must come after everything a feed or a
# webhook consumer group has read already, so they take the stream's next ids.
_ADD_ALERT_ONCE = """
local found = redis.call('HGET', KEYS[1], ARGV[1])
if found then return found end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'kind', ARGV[3], 'data', ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], id)
redis.call('HEXPIRE', KEYS[1], ARGV[5], 'FIELDS', 1, ARGV[1])
return id
"""


class Feeds:
    def __init__(self, client: aredis.Redis, retention: Retention = Retention()) -> None:
        self.client = client
        self.retention = retention
        self._acknowledge_once = client.register_script(_ACKNOWLEDGE_ONCE)
        self._add_alert_once = client.register_script(_ADD_ALERT_ONCE)

    # --- writing --------------------------------------------------------------------------------
    async def add_alert(self, tenant: str, kind: str, data: Mapping[str, Any]) -> str:
        """Durable: returns the stream id once Redis has it (AOF, fsync every second). An alert whose data
        carries an ``alert_id`` is added once, however often it is written: a repeat returns the first
        write's stream id."""
        text = json.dumps(data, separators=(",", ":"))
        alert_id = data.get("alert_id")
        if alert_id is None:
            entry = {"kind": kind, "data": text}
            stream_id = await self.client.xadd(
                alerts_key(tenant), entry, maxlen=self.retention.alerts, approximate=True
            )
        else:
            stream_id = await self._add_alert_once(
                keys=[alert_ids_key(tenant), alerts_key(tenant)],
                args=[alert_id, self.retention.alerts, kind, text, ALERT_ID_TTL_S],
            )
        return stream_id.decode()

    async def add_verdict(self, tenant: str, kind: str, data: Mapping[str, Any]) -> str:
        entry = {"kind": kind, "data": json.dumps(data, separators=(",", ":"))}
        stream_id = await self.client.xadd(
            verdicts_key(tenant), entry, maxlen=self.retention.verdicts, approximate=True
        )
        return stream_id.decode()

    async def acknowledge(self, tenant: str, event_id: str, by: Mapping[str, str]) -> dict[str, Any]:
        """Record that ``by`` (a key's id and name) acknowledged the alert ``event_id``, unless someone
        did before; returns the acknowledgement that stands."""
        ack = {
            "event_id": event_id,
            "acknowledged_by": dict(by),
            "acknowledged_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        await self._acknowledge_once(
            keys=[acks_key(tenant), alerts_key(tenant)],
            args=[event_id, json.dumps(ack, separators=(",", ":")), self.retention.alerts],
        )
        stored = await self.client.hget(acks_key(tenant), event_id)
        return json.loads(stored)

    async def set_call(
        self, tenant: str, call_id: str, state: Mapping[str, Any], ended: bool = False
    ) -> None:
        key = calls_key(tenant)
        await self.client.hset(key, call_id, json.dumps(state, separators=(",", ":")))
        if ended:
            await self.client.hexpire(key, self.retention.ended_call_ttl, call_id)

    # --- reading --------------------------------------------------------------------------------
    async def calls(self, tenant: str) -> list[dict[str, Any]]:
        found = await self.client.hgetall(calls_key(tenant))
        return sorted((json.loads(v) for v in found.values()), key=lambda c: c.get("started_at", ""))

    async def call(self, tenant: str, call_id: str) -> dict[str, Any] | None:
        found = await self.client.hget(calls_key(tenant), call_id)
        return None if found is None else json.loads(found)

    async def recent_alerts(self, tenant: str, count: int = 100) -> list[FeedEntry]:
        """The newest ``count`` alerts and notices, newest first (acknowledgements left out)."""
        found: list[FeedEntry] = []
        before = "+"
        while len(found) < count:
            page = await self.client.xrevrange(alerts_key(tenant), max=before, count=count)
            for stream_id, fields in page:
                entry = _entry(stream_id, fields)
                before = f"({entry.id}"
                if entry.kind != ACK:
                    found.append(entry)
            if len(page) < count:
                break
        return found[:count]

    async def alert(self, tenant: str, event_id: str) -> FeedEntry | None:
        """One alert or notice by its stream id, if the tenant's stream holds it."""
        found = await self.client.xrange(alerts_key(tenant), min=event_id, max=event_id, count=1)
        entry = _entry(*found[0]) if found else None
        return entry if entry is not None and entry.kind in (ALERT, NOTICE) else None

    async def acks(self, tenant: str, event_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The acknowledgements of these alerts, by event id (unacknowledged ones left out)."""
        ids = list(event_ids)
        if not ids:
            return {}
        found = await self.client.hmget(acks_key(tenant), ids)
        return {i: json.loads(v) for i, v in zip(ids, found, strict=True) if v is not None}

    async def follow(
        self, key: str, after: str | None, block_ms: int = FOLLOW_BLOCK_MS
    ) -> AsyncIterator[FeedEntry | None]:
        """With ``after`` (a stream id, e.g. an SSE ``Last-Event-ID``): every retained entry after it,
        then new ones as they come; without: new ones only. Yields None after ``block_ms`` without
        news, so the caller can send a keep-alive."""
        last = after or "$"
        if last != "$":
            # Replay what was missed, in order, in pages (XRANGE with an exclusive start).
            while True:
                page = await self.client.xrange(key, min=f"({last}", count=500)
                for stream_id, fields in page:
                    last = stream_id.decode()
                    yield _entry(stream_id, fields)
                if len(page) < 500:
                    break
        else:
            newest = await self.client.xrevrange(key, count=1)
            last = newest[0][0].decode() if newest else "0-0"
        while True:
            reply = await self.client.xread({key: last}, block=block_ms, count=500)
            if not reply:
                yield None
                continue
            for stream_id, fields in reply[0][1]:
                last = stream_id.decode()
                yield _entry(stream_id, fields)


def _entry(stream_id: bytes, fields: Mapping[bytes, bytes]) -> FeedEntry:
    return FeedEntry(stream_id.decode(), fields[b"kind"].decode(), json.loads(fields[b"data"]))
