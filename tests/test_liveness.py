"""Gateway leases (streamer/liveness.py) against a real Redis: a gateway that stops renewing has its live
calls ended by another, once, and only the calls still its own; a gateway that just (re)connected does not
judge others; a clean release leaves nothing to sweep. The end-to-end case (a SIGKILLed ``vpmon serve``)
is tests/test_gateway_restart.py."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aredis

from streamer.feeds import Feeds, calls_key
from streamer.liveness import GATEWAYS_KEY, LOST_REASON, GatewayLease, gateway_calls_key
from streamer.redis_server import RedisServer

LEASE_S = 1.0


def live(tenant: str, call_id: str, gateway: str) -> dict:
    return {"tenant": tenant, "call_id": call_id, "state": "verified", "gateway": gateway}


async def stored_call(client: aredis.Redis, tenant: str, call_id: str) -> dict:
    return json.loads(await client.hget(calls_key(tenant), call_id))


def test_a_lost_gateways_calls_are_ended_once_by_one_survivor(redis_to_kill: RedisServer) -> None:
    async def scenario() -> None:
        client = aredis.Redis(
            host="127.0.0.1", port=redis_to_kill.port, password=redis_to_kill.password, protocol=2
        )
        feeds = Feeds(client)
        dying, first, second = (GatewayLease(client, feeds, g, LEASE_S) for g in ("gw-dying", "gw-1", "gw-2"))
        # The dying gateway holds three calls in two tenants; one of them ends normally, one reconnects to
        # gw-1 under the same id before the sweep.
        for tenant, call_id in (("a", "c1"), ("a", "c2"), ("b", "c3")):
            await feeds.set_call(tenant, call_id, live(tenant, call_id, "gw-dying"))
            await dying.track(tenant, call_id)
        await dying.renew([("a", "c1"), ("a", "c2"), ("b", "c3")])
        await feeds.set_call("a", "c2", {**live("a", "c2", "gw-dying"), "state": "ended"}, ended=True)
        await feeds.set_call("b", "c3", live("b", "c3", "gw-1"))
        await second.renew([])

        await asyncio.sleep(1.5 * LEASE_S)  # the dying gateway stops renewing; gw-2 goes on; gw-1 starts
        now = await first.renew([("b", "c3")])
        # gw-1 has only just connected: it does not judge others yet, however late their leases.
        assert await first.sweep(now) == 0
        assert await second.sweep(await second.renew([])) == 1  # ends c1 only: c2 ended, c3 moved
        await asyncio.sleep(1.5 * LEASE_S)
        await second.renew([])
        assert await first.sweep(await first.renew([("b", "c3")])) == 0  # claimed already: not twice

        c1, c2, c3 = [await stored_call(client, t, c) for t, c in (("a", "c1"), ("a", "c2"), ("b", "c3"))]
        assert (c1["state"], c1["ended_reason"]) == ("ended", LOST_REASON)
        assert c2["state"] == "ended" and "ended_reason" not in c2  # had ended on its own
        assert c3["state"] == "verified" and c3["gateway"] == "gw-1"  # streaming on another gateway
        [ttl] = await client.httl(calls_key("a"), "c1")
        assert 0 < ttl <= feeds.retention.ended_call_ttl
        events = [json.loads(fields[b"data"]) for _, fields in await client.xrange("vpverdicts:{a}")]
        assert [(e["call_id"], e["ended_reason"]) for e in events] == [("c1", LOST_REASON)]
        assert not await client.exists(gateway_calls_key("gw-dying"))
        assert sorted(await client.zrange(GATEWAYS_KEY, 0, -1)) == [b"gw-1", b"gw-2"]

        # Calls that ended leave the survivor's list at its next renewal; a release clears the rest.
        await first.renew([])
        assert not await client.smembers(gateway_calls_key("gw-1"))
        await first.track("b", "c4")
        assert await client.smembers(gateway_calls_key("gw-1")) == {b"b\x1fc4"}
        await first.renew([])  # c4 ended before this renewal: it goes too
        assert not await client.smembers(gateway_calls_key("gw-1"))
        await first.release()
        assert await client.zrange(GATEWAYS_KEY, 0, -1) == [b"gw-2"]
        await client.aclose()

    asyncio.run(scenario())
