"""Calls of a gateway that stopped without ending them (SIGKILL, a lost host) end in Redis too.

A gateway that stops cleanly ends its calls itself. One that dies leaves them "live" in
``vpcalls:{tenant}`` (streamer/feeds.py) for ever: the calls list and every supervisor page would show
calls nobody is monitoring. So each gateway holds a lease:

- ``vpgateways``: a sorted set, gateway id → the Redis server's time of its last renewal (the server's
  clock, so gateways whose clocks disagree still agree on who is late);
- ``vpgateway-calls:<gateway id>``: a set of the gateway's live calls (tenant and call id), rewritten at
  every renewal and added to when a call starts.

Every ``lease / 3`` seconds each gateway renews its own lease and looks for leases older than ``lease``.
The first gateway to remove such a lease from ``vpgateways`` (ZREM answers 1 to exactly one of them) ends
each of the lost gateway's calls that is still that gateway's (a call may have reconnected to another
gateway since, under the same id): its state becomes ``ended`` with ``ended_reason: gateway_lost``, and a
``call`` event goes to the tenant's verdict stream, so live pages update. A gateway only judges others
after its own renewals have succeeded for a whole lease: after a Redis outage every gateway gets a lease's
time to renew before anyone is declared lost.

Every key here is used by single-key commands only, so this works on a Redis Cluster as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable

import redis.asyncio as aredis

from streamer.feeds import Feeds, calls_key
from streamer.redis_clients import REDIS_ERRORS

log = logging.getLogger("vpmon.liveness")

GATEWAYS_KEY = "vpgateways"
LOST_REASON = "gateway_lost"
_SEPARATOR = "\x1f"  # unit separator: in neither a tenant name nor a call id


def gateway_calls_key(gateway_id: str) -> str:
    return f"vpgateway-calls:{gateway_id}"


def _member(tenant: str, call_id: str) -> str:
    return f"{tenant}{_SEPARATOR}{call_id}"


class GatewayLease:
    def __init__(self, client: aredis.Redis, feeds: Feeds, gateway_id: str, lease_seconds: float) -> None:
        self.client = client
        self.feeds = feeds
        self.gateway_id = gateway_id
        self.lease_seconds = lease_seconds
        self._healthy_since: float | None = None  # Redis time of the first renewal of the current run
        self._listed: set[str] = set()  # the calls listed in Redis since the last renewal

    async def now(self) -> float:
        seconds, microseconds = await self.client.time()
        return seconds + microseconds / 1e6

    async def track(self, tenant: str, call_id: str) -> None:
        """A call started here: listed before its first renewal (best effort; the renewal lists it too)."""
        member = _member(tenant, call_id)
        self._listed.add(member)  # so that a renewal removes it once it has ended
        with contextlib.suppress(*REDIS_ERRORS):
            await self.client.sadd(gateway_calls_key(self.gateway_id), member)

    async def renew(self, live_calls: Iterable[tuple[str, str]]) -> float:
        """List this gateway's live calls, then renew its lease (in that order: a lease never vouches for
        an older list). Returns the Redis time of the renewal."""
        key = gateway_calls_key(self.gateway_id)
        members = {_member(tenant, call_id) for tenant, call_id in live_calls}
        # Add, then remove the calls that ended: never a moment when a live call is missing from the list,
        # whenever this gateway dies. (Every renewal adds all of them: Redis may have lost the list.)
        listed, self._listed = self._listed, set(members)  # before any await: calls may start meanwhile
        if members:
            await self.client.sadd(key, *members)
        if ended := listed - members:
            await self.client.srem(key, *ended)
        now = await self.now()
        await self.client.zadd(GATEWAYS_KEY, {self.gateway_id: now})
        if self._healthy_since is None:
            self._healthy_since = now
        return now

    async def sweep(self, now: float) -> int:
        """End the calls of every gateway whose lease ran out; returns how many calls were ended."""
        if self._healthy_since is None or now - self._healthy_since < self.lease_seconds:
            return 0
        lost = await self.client.zrangebyscore(GATEWAYS_KEY, "-inf", now - self.lease_seconds)
        ended = 0
        for raw_id in lost:
            gateway_id = raw_id.decode()
            if gateway_id == self.gateway_id or not await self.client.zrem(GATEWAYS_KEY, gateway_id):
                continue  # another gateway claimed it first
            members = await self.client.smembers(gateway_calls_key(gateway_id))
            ended_here = 0
            for member in sorted(m.decode() for m in members):
                tenant, _, call_id = member.partition(_SEPARATOR)
                ended_here += await self._end_lost_call(tenant, call_id, gateway_id)
            await self.client.delete(gateway_calls_key(gateway_id))
            log.warning("gateway %s stopped renewing its lease: %d live calls ended", gateway_id, ended_here)
            ended += ended_here
        return ended

    async def _end_lost_call(self, tenant: str, call_id: str, gateway_id: str) -> int:
        found = await self.client.hget(calls_key(tenant), call_id)
        if found is None:
            return 0
        call = json.loads(found)
        if call.get("state") == "ended" or call.get("gateway") != gateway_id:
            return 0  # ended after all, or streaming again on another gateway
        call = {**call, "state": "ended", "ended_reason": LOST_REASON}
        await self.feeds.set_call(tenant, call_id, call, ended=True)
        await self.feeds.add_verdict(tenant, "call", call)
        return 1

    async def release(self) -> None:
        """A clean stop: this gateway's calls have ended; nothing for another gateway to sweep."""
        await self.client.zrem(GATEWAYS_KEY, self.gateway_id)
        await self.client.delete(gateway_calls_key(self.gateway_id))

    async def run(self, live_calls: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Renew and sweep every ``lease / 3`` seconds for as long as the gateway runs."""
        while True:
            try:
                now = await self.renew(live_calls())
                await self.sweep(now)
            except REDIS_ERRORS as exc:
                if self._healthy_since is not None:
                    # Redis away, or every pooled connection busy for longer than the pool's wait.
                    log.warning("gateway lease not renewed (%s); trying again", exc)
                self._healthy_since = None
            await asyncio.sleep(self.lease_seconds / 3)
