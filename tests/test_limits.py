"""Per-key limits end to end, on real servers with real clients, after the sans-I/O limiters alone
(streamer/limits.py, on an injected clock).

A key over its request rate gets 429 with a problem and Retry-After; a key (or, for Twilio, a tenant)
over its concurrent calls has the extra call refused with its protocol's own refusal; and a call's slot
is free again however the call ended: a normal stop, a protocol violation, a client that vanished, a
WHIP session deleted or gone idle.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from streamer.auth import Role
from streamer.limits import CallLimiter, KeyLimits, RateLimiter, TokenBucket, retry_after
from streamer.protocols.twilio import twilio_signature
from streamer.redis_server import RedisServer
from streamer.stream_client import stream_url
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_protocol_whip import CHROME_OFFER


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the limiters alone ------------------------------------------------------------------------------
def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token comes every 1/rate seconds
    assert bucket.take(0.25) == pytest.approx(0.25)  # a refusal takes nothing: the wait only shrinks
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(100.0) == 0.0 and bucket.tokens == 2.0  # refilled to the burst, never beyond
    assert bucket.take(50.0) == 0.0 and bucket.tokens == 1.0  # a clock read from the past adds nothing


def test_rate_limiter_keeps_one_bucket_per_key() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    assert [limiter.check("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.check("a") == pytest.approx(1.0)
    assert limiter.check("b") == 0.0  # another key is not slowed by the first
    clock.now += 1.0
    assert limiter.check("a") == 0.0
    assert limiter.check("a") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rate > 0"):
        RateLimiter(rate=0.0, burst=1)
    with pytest.raises(ValueError, match="burst >= 1"):
        RateLimiter(rate=1.0, burst=0)


def test_rate_limiter_forgets_idle_keys() -> None:
    """Memory follows the keys active lately: buckets full again are swept once the table has doubled."""
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    for n in range(1024):
        limiter.check(f"old-{n}")
    assert len(limiter) == 1024
    clock.now += 2.0  # every old bucket has refilled
    limiter.check("busy")
    assert len(limiter) == 1
    for n in range(5000):  # keys still empty (no time passes) are kept: their debt must not vanish
        limiter.check(f"new-{n}")
        assert limiter.check(f"new-{n}") > 0
    assert len(limiter) == 5001


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert [retry_after(s) for s in (0.0, 0.01, 1.0, 1.2, 59.9)] == ["1", "1", "1", "2", "60"]


def test_call_limiter_counts_per_key_and_releases_once() -> None:
    limiter = CallLimiter(limit=2)
    first, second = limiter.acquire("k"), limiter.acquire("k")
    assert first is not None and second is not None
    assert limiter.acquire("k") is None
    assert limiter.acquire("other") is not None  # per key
    first.release()
    first.release()  # a second release (another exit path) counts nothing
    assert limiter.active("k") == 1
    third = limiter.acquire("k")
    assert third is not None and limiter.acquire("k") is None
    second.release()
    third.release()
    assert limiter.active("k") == 0 and len(limiter) == 1  # no entry left for a key with no calls
    with pytest.raises(ValueError, match="limit >= 1"):
        CallLimiter(0)


def test_call_slot_is_released_on_every_exit_path() -> None:
    """A slot held with ``with`` is free after a normal end, an error, and a cancellation (shutdown)."""
    limiter = CallLimiter(limit=1)

    with limiter.acquire("k"):  # type: ignore[union-attr]
        assert limiter.acquire("k") is None
    assert limiter.active("k") == 0

    with pytest.raises(RuntimeError), limiter.acquire("k"):  # type: ignore[union-attr]
        raise RuntimeError("bad input")
    assert limiter.active("k") == 0

    async def cancelled() -> None:
        held = asyncio.Event()

        async def call() -> None:
            with limiter.acquire("k"):  # type: ignore[union-attr]
                held.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(call())
        await held.wait()
        assert limiter.active("k") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert limiter.active("k") == 0


def test_key_limits_from_settings_values() -> None:
    limits = KeyLimits.create(requests_per_second=5.0, request_burst=10, max_calls=3)
    assert (limits.requests.rate, limits.requests.burst, limits.calls.limit) == (5.0, 10, 3)


# --- a real server: request rate ---------------------------------------------------------------------
RATE = 0.5  # tokens per second: slow enough that no token comes back while the test runs its requests
BURST = 3


@pytest.fixture(scope="module")
def rate_server(tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer) -> Iterator[RunningServer]:
    server = start_vpmon(
        tmp_path_factory.mktemp("rate"), api_redis, key_requests_per_second=RATE, key_request_burst=BURST
    )
    try:
        yield server
    finally:
        stop_vpmon(server)


def test_a_key_over_its_request_rate_gets_429(rate_server: RunningServer) -> None:
    busy, other = rate_server.key("rate-tenant", Role.READ), rate_server.key("rate-tenant", Role.READ)
    with rate_server.client(busy) as client:
        statuses = [client.get("/v1/voiceprints").status_code for _ in range(BURST)]
        refused = client.get("/v1/voiceprints")
    assert statuses == [200] * BURST
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"] == "urn:vpmon:problem:too-many-requests" and problem["status"] == 429
    assert "VPMON_KEY_REQUESTS_PER_SECOND" in problem["detail"]
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= 1 / RATE

    # Another key of the same tenant is not slowed; an unknown key is not counted (it is a 401).
    with rate_server.client(other) as client:
        assert client.get("/v1/voiceprints").status_code == 200
    with rate_server.client("vpk_aaaaaaaaaaaa_" + "x" * 43) as client:
        assert [client.get("/v1/voiceprints").status_code for _ in range(BURST + 1)] == [401] * (BURST + 1)

    # Retry-After is honest: after waiting that long, the key is served again (a wait for a state with a
    # deadline, not a timing assertion).
    with rate_server.client(busy) as client:
        deadline = time.monotonic() + 30
        while (response := client.get("/v1/voiceprints")).status_code == 429:
            assert time.monotonic() < deadline, "the key was never served again"
            time.sleep(int(response.headers["retry-after"]))
        assert response.status_code == 200


# --- a real server: concurrent calls -----------------------------------------------------------------
MAX_CALLS = 2
TENANT = "limits"
TWILIO_TOKEN = "limits-twilio-auth-token"


@pytest.fixture(scope="module")
def calls_server(tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer) -> Iterator[RunningServer]:
    # A long idle limit: the held calls stay open on their own for as long as a test needs them.
    server = start_vpmon(
        tmp_path_factory.mktemp("calls"), api_redis, key_max_calls=MAX_CALLS, ws_idle_seconds=120
    )
    try:
        with server.client(server.key(TENANT)) as admin:
            admin.patch("/v1/tenant", json={"twilio_auth_token": TWILIO_TOKEN}).raise_for_status()
        yield server
    finally:
        stop_vpmon(server)


def ws_url(server: RunningServer, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


async def closed(ws: ClientConnection) -> websockets.frames.Close:
    """Read until the server closes; its close frame."""
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await ws.recv()
    assert ws.protocol.close_rcvd is not None, "the connection dropped without a close frame"
    return ws.protocol.close_rcvd


@asynccontextmanager
async def native(server: RunningServer, key: str, call_id: str) -> AsyncIterator[ClientConnection]:
    """A native call started (no agent: the server waits for a binding) and held open."""
    async with connect(
        ws_url(server, "/v1/streams/native"), additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        start = {"type": "start", "call_id": call_id, "encoding": "pcm16", "sample_rate": 8000, "channels": 1}
        await ws.send(json.dumps(start))
        assert json.loads(await ws.recv()) == {"type": "started", "call_id": call_id}
        # A refused call gets "started" too, then its refusal; only an accepted one is in the call list
        # (the gateway writes its state before it sends "started").
        assert await asyncio.to_thread(live, server, key, call_id), f"call {call_id} was not accepted"
        yield ws


async def refused_native(server: RunningServer, key: str, call_id: str) -> websockets.frames.Close:
    async with connect(
        ws_url(server, "/v1/streams/native"), additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        start = {"type": "start", "call_id": call_id, "encoding": "pcm16", "sample_rate": 8000, "channels": 1}
        await ws.send(json.dumps(start))
        assert json.loads(await ws.recv())["type"] == "started"
        error = json.loads(await ws.recv())
        close = await closed(ws)
        assert (error["type"], error["code"], error["reason"]) == ("error", close.code, close.reason)
        return close


def calls_state(server: RunningServer, key: str) -> dict[str, str]:
    with server.client(key) as client:
        return {c["call_id"]: c["state"] for c in client.get("/v1/calls").json()}


def live(server: RunningServer, key: str, call_id: str) -> bool:
    """The call is live (started, waiting for its agent), as the API says."""
    return calls_state(server, key).get(call_id) == "agent_unknown"


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"waited 60 s for {what}"
        await asyncio.sleep(0.2)


def assert_too_many(close: websockets.frames.Close, who: str) -> None:
    assert close.code == 1008, close
    assert close.reason.startswith(f"too many calls at once for this {who}"), close.reason
    assert f"{MAX_CALLS} on this gateway" in close.reason and "VPMON_KEY_MAX_CALLS" in close.reason


def test_native_calls_over_the_key_limit_are_refused_and_slots_come_back(calls_server: RunningServer) -> None:
    key, other = calls_server.key(TENANT, Role.MONITOR), calls_server.key(TENANT, Role.MONITOR)
    admin = calls_server.key(TENANT)
    run = uuid.uuid4().hex[:8]

    async def scenario() -> None:
        async with native(calls_server, key, f"a-{run}") as a, native(calls_server, key, f"b-{run}") as b:
            assert_too_many(await refused_native(calls_server, key, f"c-{run}"), "key")
            async with native(calls_server, other, f"other-{run}"):
                pass  # per key: another key of the same tenant has its own calls

            # A normal stop: the slot is free before the server's close reaches the client.
            await a.send(json.dumps({"type": "stop"}))
            assert (await closed(a)).code == 1000
            async with native(calls_server, key, f"d-{run}") as d:
                assert_too_many(await refused_native(calls_server, key, f"e-{run}"), "key")

                # Bad input (an odd byte count is not PCM16): the violation's close frees the slot too.
                await d.send(b"\x00" * 3)
                assert (await closed(d)).code == 1003
                async with native(calls_server, key, f"f-{run}"):
                    assert_too_many(await refused_native(calls_server, key, f"g-{run}"), "key")

                    # A client that vanishes without a close: the slot is free once the server has
                    # noticed (the call is "ended" in its state after the slot was released).
                    b.transport.abort()
                    await wait_until(
                        lambda: calls_state(calls_server, admin).get(f"b-{run}") == "ended", "call b to end"
                    )
                    async with native(calls_server, key, f"h-{run}"):
                        assert_too_many(await refused_native(calls_server, key, f"i-{run}"), "key")

    asyncio.run(scenario())


def test_audiohook_over_the_key_limit_is_a_disconnect(calls_server: RunningServer) -> None:
    key = calls_server.key(TENANT, Role.MONITOR)

    def headers(session: str, organization: str) -> dict[str, str]:
        return {
            "Audiohook-Organization-Id": organization, "Audiohook-Session-Id": session,
            "Audiohook-Correlation-Id": str(uuid.uuid4()), "X-API-KEY": key,
        }  # fmt: skip

    @asynccontextmanager
    async def session() -> AsyncIterator[tuple[ClientConnection, dict[str, Any]]]:
        session_id, organization, conversation = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
        async with connect(
            stream_url(calls_server.url, "audiohook"), additional_headers=headers(session_id, organization)
        ) as ws:
            await ws.send(json.dumps({
                "version": "2", "id": session_id, "type": "open", "seq": 1, "serverseq": 0,
                "position": "PT0S", "parameters": {
                    "organizationId": organization, "conversationId": conversation,
                    "participant": {"id": str(uuid.uuid4()), "ani": "", "aniName": "", "dnis": ""},
                    "media": [{"type": "audio", "format": "PCMU", "channels": ["internal"], "rate": 8000}],
                },
            }))  # fmt: skip
            assert json.loads(await ws.recv())["type"] == "opened"
            yield ws, {"id": session_id, "conversation": conversation}

    async def scenario() -> None:
        async with session() as (_, first), session() as (_, second):
            # "opened" goes out after the call's state is written: both are live.
            for ids in (first, second):
                assert await asyncio.to_thread(live, calls_server, key, ids["conversation"])
            async with session() as (ws, ids):  # one too many
                disconnect = json.loads(await ws.recv())
                assert disconnect["type"] == "disconnect"
                assert disconnect["parameters"]["reason"] == "error"
                assert disconnect["parameters"]["info"].startswith("too many calls at once for this key")
                # The client completes the close transaction as AudioHook wants: close → closed.
                await ws.send(json.dumps({
                    "version": "2", "id": ids["id"], "type": "close", "seq": 2, "serverseq": 2,
                    "position": "PT0S", "parameters": {"reason": "disconnect"},
                }))  # fmt: skip
                assert json.loads(await ws.recv())["type"] == "closed"
                assert (await closed(ws)).code == 1008
                assert not await asyncio.to_thread(live, calls_server, key, ids["conversation"])

    asyncio.run(scenario())


def test_twilio_calls_are_limited_per_tenant(calls_server: RunningServer) -> None:
    url = ws_url(calls_server, f"/v1/streams/twilio/{TENANT}")
    signed = {"X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, url)}
    run = uuid.uuid4().hex[:8]

    @asynccontextmanager
    async def twilio(call_sid: str) -> AsyncIterator[ClientConnection]:
        async with connect(url, additional_headers=signed) as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(json.dumps({
                "event": "start", "sequenceNumber": "1", "streamSid": f"MZ{call_sid}",
                "start": {
                    "streamSid": f"MZ{call_sid}", "accountSid": "AC1", "callSid": call_sid,
                    "tracks": ["inbound", "outbound"], "customParameters": {},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }))  # fmt: skip
            yield ws

    admin = calls_server.key(TENANT)

    def twilio_live(*call_sids: str) -> bool:
        return all(live(calls_server, admin, call_sid) for call_sid in call_sids)

    async def scenario() -> None:
        async with twilio(f"CA1{run}") as first, twilio(f"CA2{run}"):
            # Twilio sends nothing back: the calls are known to be live from the API.
            await wait_until(lambda: twilio_live(f"CA1{run}", f"CA2{run}"), "two live Twilio calls")
            async with twilio(f"CA3{run}") as third:
                assert_too_many(await closed(third), "tenant")
            key = calls_server.key(TENANT, Role.MONITOR)
            async with native(calls_server, key, f"native-{run}"):
                pass  # the tenant's Twilio calls do not count against its keys
            await first.send(json.dumps({"event": "stop", "sequenceNumber": "2", "streamSid": f"MZCA1{run}"}))
            assert (await closed(first)).code == 1000
            async with twilio(f"CA4{run}"):
                await wait_until(lambda: twilio_live(f"CA4{run}"), "the next Twilio call to be live")

    asyncio.run(scenario())


def test_whip_sessions_over_the_key_limit_get_429(calls_server: RunningServer) -> None:
    """A WHIP session holds its slot until it ends: deleted, or idle (nobody sends audio to Chrome's
    offer). Refusals hold none."""
    key = calls_server.key(TENANT, Role.MONITOR)
    run = uuid.uuid4().hex[:8]
    sdp = {"Content-Type": "application/sdp"}
    with calls_server.client(key) as client:

        def publish(call_id: str) -> httpx.Response:
            return client.post("/v1/whip", params={"call_id": call_id}, content=CHROME_OFFER, headers=sdp)

        first, second = publish(f"w1-{run}"), publish(f"w2-{run}")
        assert (first.status_code, second.status_code) == (201, 201), first.text
        refused = publish(f"w3-{run}")
        assert refused.status_code == 429, refused.text
        problem = refused.json()
        assert problem["type"] == "urn:vpmon:problem:too-many-requests"
        assert problem["detail"].startswith("too many calls at once for this key")
        # A refusal that comes before the limit (a bad offer) takes no slot either.
        assert client.post("/v1/whip", content="hello", headers=sdp).status_code == 400

        assert client.delete(first.headers["location"]).status_code == 200
        third = publish(f"w4-{run}")
        assert third.status_code == 201, third.text
        assert publish(f"w5-{run}").status_code == 429
        for response in (second, third):
            assert client.delete(response.headers["location"]).status_code == 200
        assert client.get("/v1/whip").json() == {"sessions": [], "peer_connections": 0}


def test_ws_idle_timeout_ends_a_silent_call_and_frees_its_slot(
    tmp_path: Path, api_redis: RedisServer
) -> None:
    """A stalled client (started, then silent) loses its call after ws_idle_seconds, and with it the slot."""
    server = start_vpmon(tmp_path, api_redis, key_max_calls=1, ws_idle_seconds=2)
    try:
        key = server.key(TENANT, Role.MONITOR)

        async def scenario() -> None:
            async with native(server, key, "stalled") as stalled:
                assert (await refused_native(server, key, "waiting")).code == 1008
                close = await closed(stalled)
                assert (close.code, close.reason) == (1008, "no message for 2 s")
            async with native(server, key, "next"):
                pass

        asyncio.run(scenario())
    finally:
        stop_vpmon(server)
