"""Webhooks: every alert of a tenant, POSTed to the tenant's endpoints, signed per Standard Webhooks,
delivered from the alert stream through Redis consumer groups, with retries and dead letters.

Redis layout (the ``{tenant}`` hash tag keeps a tenant's keys in one cluster slot):

- ``vphooks:{<tenant>}``: a HASH endpoint id → the endpoint (JSON: url, events, secret, …);
- ``vphooks:tenants``: the SET of tenants that have endpoints, so a gateway finds the streams to read;
- one consumer group per endpoint, ``webhook:<endpoint id>``, on the tenant's alert stream
  ``vpalerts:{<tenant>}``: each endpoint keeps its own place and its own pending deliveries, so a failing
  endpoint never holds back another; created at ``$`` (a new endpoint gets the alerts from then on);
- ``vphooks-dead:{<tenant>}``: a LIST of deliveries that failed every attempt (newest first, bounded).

Delivery. Every gateway runs a ``WebhookWorker``: one task per enabled endpoint, reading new entries with
XREADGROUP (one at a time, so an entry is attempted the moment it is read). 2xx is delivered (XACK). A
failure leaves the entry pending: the stream's own pending-entries list is the retry state — its
delivery count is the number of attempts made, its idle time the time since the last one — so a retry
is due when the entry has been idle for the schedule's delay, and whichever gateway claims it first
(XCLAIM with that minimum idle time, atomic) makes the next attempt. An entry whose gateway died is
claimed the same way, so deliveries resume after a crash or a restart. An attempt in flight is never
claimed by another gateway: the minimum idle time is at least the request timeout plus a margin.
After the last retry the delivery goes to the dead letters; ``410 Gone`` disables the endpoint.

Exactly once, for a receiver: ``webhook-id`` is derived from the endpoint and the stream entry, so every
attempt of one alert to one endpoint carries the same id; a receiver that keeps the ids it has handled
(Standard Webhooks asks it to) handles each alert once even if a gateway died between the receiver's
2xx and the XACK and the entry was sent again.

Event types: ``alert.<kind>`` (``alert.takeover``), ``notice.<kind>`` (``notice.agent_not_enrolled``),
and, for endpoints that ask for ``ack``, ``alert.acknowledged``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
import redis.asyncio as aredis

from streamer.feeds import ACK, ALERT, NOTICE, FeedEntry, alerts_key
from streamer.redis_clients import REDIS_ERRORS, REDIS_UNAVAILABLE
from streamer.store import check_tenant
from streamer.webhook_verify import new_secret, signature_header
from verifier.errors import InvalidValueError, NotFoundError

log = logging.getLogger("vpmon.webhooks")

EVENT_KINDS = (ALERT, NOTICE, ACK)
DEFAULT_EVENTS = (ALERT, NOTICE)
TENANTS_KEY = "vphooks:tenants"
DEAD_LETTERS_KEPT = 1000
ROTATION_OVERLAP_SECONDS = 24 * 3600  # the previous secret still signs for this long after a rotation
JITTER = 0.1  # each retry delay is moved by up to ±10 %
IN_FLIGHT_MARGIN_S = 2.0
USER_AGENT = "vpmon-webhooks/0.1"


def endpoints_key(tenant: str) -> str:
    return f"vphooks:{{{tenant}}}"


def dead_letters_key(tenant: str) -> str:
    return f"vphooks-dead:{{{tenant}}}"


def group_name(endpoint_id: str) -> str:
    return f"webhook:{endpoint_id}"


# --- the pure core ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    id: str
    url: str
    events: tuple[str, ...]
    description: str
    secret: str
    created_at: str
    previous_secret: str | None = None
    previous_secret_expires_at: float | None = None  # unix time
    disabled_at: str | None = None
    disabled_reason: str | None = None

    @property
    def enabled(self) -> bool:
        return self.disabled_at is None

    def signing_secrets(self, now: float) -> list[str]:
        """The current secret, and during a rotation's overlap the previous one too."""
        expires = self.previous_secret_expires_at
        if self.previous_secret and expires is not None and now < expires:
            return [self.secret, self.previous_secret]
        return [self.secret]

    def wants(self, kind: str) -> bool:
        return kind in self.events

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Endpoint:
        fields = json.loads(text)
        return cls(**{**fields, "events": tuple(fields["events"])})

    def public(self) -> dict[str, Any]:
        """What the API shows: everything but the secrets, which are masked."""
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "description": self.description,
            "secret": mask_secret(self.secret),
            "created_at": self.created_at,
            "previous_secret_expires_at": _iso(self.previous_secret_expires_at)
            if self.previous_secret
            else None,
            "disabled_at": self.disabled_at,
            "disabled_reason": self.disabled_reason,
        }


def mask_secret(secret: str) -> str:
    return f"whsec_…{secret[-4:]}"


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidValueError(f"webhook url {url!r}: use an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise InvalidValueError("webhook url: no credentials in the URL; verify the signature instead")
    if len(url) > 2048:
        raise InvalidValueError("webhook url: at most 2048 characters")
    return url


def check_events(events: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(events) - set(EVENT_KINDS))
    if unknown or not events:
        raise InvalidValueError(
            f"webhook events {list(events)!r}: choose one or more of {', '.join(EVENT_KINDS)}"
        )
    return tuple(kind for kind in EVENT_KINDS if kind in events)


def webhook_id(endpoint_id: str, stream_id: str) -> str:
    """Stable for one alert and one endpoint: every attempt, from any gateway, carries the same id."""
    return f"msg_{endpoint_id}_{stream_id}"


def event_type(kind: str, data: Mapping[str, Any]) -> str:
    if kind == ACK:
        return "alert.acknowledged"
    return f"{kind}.{data.get('kind', 'unknown')}"


def stream_time(stream_id: str) -> str:
    """When Redis stored the entry: the milliseconds part of its id, as ISO 8601."""
    millis = int(stream_id.partition("-")[0])
    return (
        datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def build_payload(tenant: str, entry: FeedEntry) -> bytes:
    """The body, the same bytes on every attempt: type, when the event happened, the alert's id (as the
    alert feed and ``POST /v1/alerts/{id}/ack`` use it), the tenant, and the alert itself."""
    payload = {
        "type": event_type(entry.kind, entry.data),
        "timestamp": stream_time(entry.id),
        "event_id": entry.id,
        "tenant": tenant,
        "data": entry.data,
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def retry_delay(
    schedule: Sequence[float], attempts_made: int, webhook: str, jitter: float = JITTER
) -> float | None:
    """Seconds to wait after ``attempts_made`` failed attempts, or None when there is no retry left.
    The jitter is a fixed function of the webhook id and the attempt, so every gateway agrees on when a
    retry is due, and retries of alerts that failed together spread out."""
    if attempts_made < 1 or attempts_made > len(schedule):
        return None
    digest = hashlib.sha256(f"{webhook}:{attempts_made}".encode()).digest()
    unit = int.from_bytes(digest[:4], "big") / 2**32  # in [0, 1)
    return schedule[attempts_made - 1] * (1 + jitter * (2 * unit - 1))


def delivery_headers(endpoint: Endpoint, webhook: str, body: bytes, now: float) -> dict[str, str]:
    timestamp = int(now)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": webhook,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(endpoint.signing_secrets(now), webhook, timestamp, body),
    }


DELIVERED, RETRY, GONE = "delivered", "retry", "gone"


def outcome(status_code: int) -> str:
    """Standard Webhooks: 2xx is delivered (redirects are not followed), 410 asks us to stop, and
    anything else is a failure to retry."""
    if 200 <= status_code < 300:
        return DELIVERED
    return GONE if status_code == 410 else RETRY


def _iso(unix: float | None) -> str | None:
    return None if unix is None else datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _new_id() -> str:
    return "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))


# --- endpoints (admin API and CLI; synchronous Redis, like the key store) -------------------------------
@dataclass(frozen=True)
class NewEndpoint:
    """An endpoint just created or rotated: the only time its secret is shown."""

    endpoint: Endpoint
    secret: str


class WebhookStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def create(
        self, tenant: str, url: str, events: Sequence[str] = DEFAULT_EVENTS, description: str = ""
    ) -> NewEndpoint:
        check_tenant(tenant)
        endpoint = Endpoint(
            id=_new_id(), url=check_url(url), events=check_events(events), description=description,
            secret=new_secret(), created_at=_now_iso(),
        )  # fmt: skip
        # The group first: an alert stored from now on is delivered once the record below is seen.
        self.client.xgroup_create(alerts_key(tenant), group_name(endpoint.id), id="$", mkstream=True)
        self.client.hset(endpoints_key(tenant), endpoint.id, endpoint.to_json())
        self.client.sadd(TENANTS_KEY, tenant)
        return NewEndpoint(endpoint, endpoint.secret)

    def list(self, tenant: str) -> list[Endpoint]:
        found = self.client.hgetall(endpoints_key(check_tenant(tenant)))
        return sorted((Endpoint.from_json(v) for v in found.values()), key=lambda e: e.created_at)

    def get(self, tenant: str, endpoint_id: str) -> Endpoint:
        found = self.client.hget(endpoints_key(check_tenant(tenant)), endpoint_id)
        if found is None:
            raise NotFoundError(f"no webhook {endpoint_id!r} in tenant {tenant!r}")
        return Endpoint.from_json(found)

    def delete(self, tenant: str, endpoint_id: str) -> None:
        self.get(tenant, endpoint_id)
        self.client.hdel(endpoints_key(tenant), endpoint_id)
        with contextlib.suppress(redis.ResponseError):  # the stream may be gone already
            self.client.xgroup_destroy(alerts_key(tenant), group_name(endpoint_id))
        if not self.client.hlen(endpoints_key(tenant)):
            self.client.srem(TENANTS_KEY, tenant)

    def rotate_secret(self, tenant: str, endpoint_id: str) -> NewEndpoint:
        """A new secret; the previous one keeps signing too (a second signature) for a day, so receivers
        can switch without missing a delivery."""
        old = self.get(tenant, endpoint_id)
        rotated = replace(
            old, secret=new_secret(), previous_secret=old.secret,
            previous_secret_expires_at=time.time() + ROTATION_OVERLAP_SECONDS,
        )  # fmt: skip
        self.client.hset(endpoints_key(tenant), endpoint_id, rotated.to_json())
        return NewEndpoint(rotated, rotated.secret)

    def enable(self, tenant: str, endpoint_id: str) -> Endpoint:
        """Deliver again to an endpoint that was disabled (it answered 410 Gone)."""
        enabled = replace(self.get(tenant, endpoint_id), disabled_at=None, disabled_reason=None)
        self.client.hset(endpoints_key(tenant), endpoint_id, enabled.to_json())
        return enabled

    def dead_letters(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        found = self.client.lrange(dead_letters_key(check_tenant(tenant)), 0, limit - 1)
        return [json.loads(item) for item in found]


# --- delivery (the gateway's background task) -----------------------------------------------------------
def _feed_entry(stream_id: bytes, fields: Mapping[bytes, bytes]) -> FeedEntry:
    return FeedEntry(stream_id.decode(), fields[b"kind"].decode(), json.loads(fields[b"data"]))


class WebhookWorker:
    """Delivers every tenant's alerts to its endpoints; any number of gateways may run one at once."""

    def __init__(
        self,
        client: aredis.Redis,
        consumer: str,
        retry_schedule: Sequence[float],
        timeout_s: float,
        poll_s: float = 1.0,
        refresh_s: float = 2.0,
    ) -> None:
        self.client = client
        self.consumer = consumer  # this gateway's name in every group
        self.retry_schedule = list(retry_schedule)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.refresh_s = refresh_s
        # Never claim an entry another gateway may still be sending: wait out its timeout first.
        self.in_flight_s = timeout_s + IN_FLIGHT_MARGIN_S
        self.http = httpx.AsyncClient(
            timeout=timeout_s, follow_redirects=False, headers={"user-agent": USER_AGENT}
        )

    async def run(self) -> None:
        """Keep one delivery task per enabled endpoint, as endpoints come and go."""
        tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        try:
            while True:
                try:
                    wanted = await self._enabled_endpoints()
                except (*REDIS_ERRORS, ValueError) as exc:  # Redis away, or a record it cannot read
                    log.warning("webhooks: cannot list endpoints (%s); retrying", exc)
                    wanted = set(tasks)
                for key in set(tasks) - wanted:
                    tasks.pop(key).cancel()
                for key, task in list(tasks.items()):
                    if task.done():  # ended on its own (deleted, disabled) or failed: start afresh below
                        tasks.pop(key)
                        if not task.cancelled() and task.exception() is not None:
                            log.error("webhook %s stopped: %r", key[1], task.exception())
                for key in wanted - set(tasks):
                    tasks[key] = asyncio.create_task(self._endpoint_loop(*key), name=f"webhook {key[1]}")
                await asyncio.sleep(self.refresh_s)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await self.http.aclose()

    async def _enabled_endpoints(self) -> set[tuple[str, str]]:
        wanted: set[tuple[str, str]] = set()
        for tenant in await self.client.smembers(TENANTS_KEY):
            tenant = tenant.decode()
            for endpoint_id, record in (await self.client.hgetall(endpoints_key(tenant))).items():
                if Endpoint.from_json(record).enabled:
                    wanted.add((tenant, endpoint_id.decode()))
        return wanted

    async def _endpoint(self, tenant: str, endpoint_id: str) -> Endpoint | None:
        record = await self.client.hget(endpoints_key(tenant), endpoint_id)
        return None if record is None else Endpoint.from_json(record)

    async def _endpoint_loop(self, tenant: str, endpoint_id: str) -> None:
        while True:
            endpoint = None
            try:
                # Read every round: a rotated secret or a deletion takes effect at once.
                endpoint = await self._endpoint(tenant, endpoint_id)
                if endpoint is None or not endpoint.enabled:
                    return
                await self._deliver_new(tenant, endpoint)
                await self._retry_due(tenant, endpoint)
            except REDIS_ERRORS as exc:
                # A reply refused (but not a cluster's CLUSTERDOWN, an outage like a refused connection).
                if isinstance(exc, redis.ResponseError) and not isinstance(exc, REDIS_UNAVAILABLE):
                    if "NOGROUP" not in str(exc) or endpoint is None:
                        raise
                    # The stream was deleted, and its groups with it: what it holds now was never delivered.
                    with contextlib.suppress(redis.ResponseError):
                        await self.client.xgroup_create(
                            alerts_key(tenant), group_name(endpoint_id), id="0", mkstream=True
                        )
                    continue
                log.warning(
                    "webhook %s: Redis error (%s); retrying", endpoint_id, exc, extra={"tenant": tenant}
                )
                await asyncio.sleep(self.poll_s)

    async def _deliver_new(self, tenant: str, endpoint: Endpoint) -> None:
        # One entry at a time: an entry read is attempted at once, so it cannot sit unattempted long
        # enough to look abandoned to another gateway.
        reply = await self.client.xreadgroup(
            group_name(endpoint.id), self.consumer, {alerts_key(tenant): ">"},
            count=1, block=int(self.poll_s * 1000),
        )  # fmt: skip
        for _, entries in reply or []:
            for stream_id, fields in entries:
                await self._attempt(tenant, endpoint, _feed_entry(stream_id, fields), attempt=1)

    async def _retry_due(self, tenant: str, endpoint: Endpoint) -> None:
        key, group = alerts_key(tenant), group_name(endpoint.id)
        pending = await self.client.xpending_range(
            key, group, min="-", max="+", count=100, idle=int(self.in_flight_s * 1000)
        )
        for item in pending:
            stream_id = item["message_id"].decode()
            attempts_made = int(item["times_delivered"])
            delay = retry_delay(self.retry_schedule, attempts_made, webhook_id(endpoint.id, stream_id))
            min_idle = max(delay or 0.0, self.in_flight_s)
            if item["time_since_delivered"] < min_idle * 1000:
                continue
            # Atomic across gateways: only one claims it (and the claim counts the attempt).
            claimed = await self.client.xclaim(key, group, self.consumer, int(min_idle * 1000), [stream_id])
            if not claimed:
                continue  # another gateway was first
            claimed_id, fields = claimed[0]
            if not fields:  # trimmed from the stream meanwhile: nothing left to send
                await self.client.xack(key, group, claimed_id)
                continue
            entry = _feed_entry(claimed_id, fields)
            if delay is None:  # the last attempt's gateway died before recording its end
                await self._dead_letter(tenant, endpoint, entry, attempts_made, "gateway stopped mid-attempt")
                continue
            await self._attempt(tenant, endpoint, entry, attempt=attempts_made + 1)

    async def _attempt(self, tenant: str, endpoint: Endpoint, entry: FeedEntry, attempt: int) -> None:
        key, group = alerts_key(tenant), group_name(endpoint.id)
        if not endpoint.wants(entry.kind):
            await self.client.xack(key, group, entry.id)
            return
        webhook = webhook_id(endpoint.id, entry.id)
        body = build_payload(tenant, entry)
        headers = delivery_headers(endpoint, webhook, body, time.time())
        try:
            response = await self.http.post(endpoint.url, content=body, headers=headers)
            result, detail = outcome(response.status_code), f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            result, detail = RETRY, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        extra = {"tenant": tenant}
        if result == DELIVERED:
            await self.client.xack(key, group, entry.id)
            log.info("webhook %s delivered to %s (attempt %d)", webhook, endpoint.id, attempt, extra=extra)
        elif result == GONE:
            await self._disable(tenant, endpoint.id, f"{endpoint.url} answered 410 Gone")
            await self._dead_letter(tenant, endpoint, entry, attempt, detail)
        elif retry_delay(self.retry_schedule, attempt, webhook) is None:
            await self._dead_letter(tenant, endpoint, entry, attempt, detail)
        else:
            # Claim it again without counting an attempt: its idle time restarts, and the back-off with it.
            await self.client.xclaim(key, group, self.consumer, 0, [entry.id], justid=True)
            log.warning("webhook %s to %s failed (attempt %d): %s", webhook, endpoint.id, attempt, detail,
                        extra=extra)  # fmt: skip

    async def _dead_letter(
        self, tenant: str, endpoint: Endpoint, entry: FeedEntry, attempts: int, last_error: str
    ) -> None:
        webhook = webhook_id(endpoint.id, entry.id)
        letter = {
            "webhook_id": webhook, "endpoint_id": endpoint.id, "url": endpoint.url, "event_id": entry.id,
            "type": event_type(entry.kind, entry.data), "attempts": attempts, "last_error": last_error,
            "dead_at": _now_iso(), "payload": json.loads(build_payload(tenant, entry)),
        }  # fmt: skip
        # Both keys share the tenant's hash tag: one transaction, so a delivery is never both lost and acked.
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(dead_letters_key(tenant), json.dumps(letter, separators=(",", ":")))
        pipe.ltrim(dead_letters_key(tenant), 0, DEAD_LETTERS_KEPT - 1)
        pipe.xack(alerts_key(tenant), group_name(endpoint.id), entry.id)
        await pipe.execute()
        log.error("webhook %s to %s failed %d times (%s): dead letter", webhook, endpoint.id, attempts,
                  last_error, extra={"tenant": tenant})  # fmt: skip

    async def _disable(self, tenant: str, endpoint_id: str, reason: str) -> None:
        endpoint = await self._endpoint(tenant, endpoint_id)
        if endpoint is not None:
            disabled = replace(endpoint, disabled_at=_now_iso(), disabled_reason=reason)
            await self.client.hset(endpoints_key(tenant), endpoint_id, disabled.to_json())
            log.warning("webhook %s disabled: %s", endpoint_id, reason, extra={"tenant": tenant})
