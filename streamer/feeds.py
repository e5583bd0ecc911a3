"""Alerts and live call state in Redis: written first, read by every feed.

- ``vpalerts:{<tenant>}``: a Redis Stream of alerts (takeovers) and notices (agent not enrolled, voiceprint
  of another model). An alert is added here before anything else happens to it; the SSE feed replays it
  from any id (``Last-Event-ID``), webhooks (a later issue) read it through a consumer group. Bounded
  by ``MAXLEN ~ alert_retention`` entries.
- ``vpverdicts:{<tenant>}``: a Redis Stream of verdicts and call starts/ends, for live views; short
  (``MAXLEN ~ verdict_retention``).
- ``vpcalls:{<tenant>}``: a HASH call id → the call's latest state (JSON); an ended call's field expires
  (HEXPIRE) ``ended_call_ttl`` seconds after the end, so the list shows recent calls too.
- ``vpbind:{<tenant>}:<call id>``: the agent bound to a call through the API (a HASH with a TTL), and the
  pub/sub channel ``vpbind:{<tenant>}`` that tells the gateway holding the call.

The ``{tenant}`` hash tag keeps a tenant's keys in one Redis Cluster slot.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis

ALERT = "alert"
NOTICE = "notice"
VERDICT = "verdict"
CALL = "call"


def alerts_key(tenant: str) -> str:
    return f"vpalerts:{{{tenant}}}"


def verdicts_key(tenant: str) -> str:
    return f"vpverdicts:{{{tenant}}}"


def calls_key(tenant: str) -> str:
    return f"vpcalls:{{{tenant}}}"


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


class Feeds:
    def __init__(self, client: aredis.Redis, retention: Retention = Retention()) -> None:
        self.client = client
        self.retention = retention

    # --- writing --------------------------------------------------------------------------------
    async def add_alert(self, tenant: str, kind: str, data: Mapping[str, Any]) -> str:
        """Durable: returns the stream id once Redis has it (AOF, fsync every second)."""
        entry = {"kind": kind, "data": json.dumps(data, separators=(",", ":"))}
        stream_id = await self.client.xadd(
            alerts_key(tenant), entry, maxlen=self.retention.alerts, approximate=True
        )
        return stream_id.decode()

    async def add_verdict(self, tenant: str, kind: str, data: Mapping[str, Any]) -> str:
        entry = {"kind": kind, "data": json.dumps(data, separators=(",", ":"))}
        stream_id = await self.client.xadd(
            verdicts_key(tenant), entry, maxlen=self.retention.verdicts, approximate=True
        )
        return stream_id.decode()

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
        entries = await self.client.xrevrange(alerts_key(tenant), count=count)
        return [_entry(stream_id, fields) for stream_id, fields in entries]

    async def follow(
        self, key: str, after: str | None, block_ms: int = 15_000
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
