"""A Redis outage mid-call loses nothing: real calls into a real ``vpmon serve``, its real redis-server
SIGKILLed while they run and restarted on the same port.

During the outage the calls go on — their agents' voiceprints are in their sessions — and native calls
keep getting verdicts on their websockets; takeovers raise alerts, which are spooled to disk (the spool
file shows them) while ``/readyz`` says 503 with the number spooled and ``/metrics`` shows the spool and
Redis down; a new call is refused. When Redis returns, every alert reaches the alert stream once, in
order: a supervisor's SSE feed (connected before the outage, reconnecting with ``Last-Event-ID``) and a
real webhook receiver see each alert id exactly once (raw requests are counted, not deduplicated by
``webhook-id``), ``/readyz`` is 200 again and the spool is empty. A second test SIGKILLs the gateway too,
with alerts in its spool, and a new gateway on the same spool dir delivers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from streamer.auth import Role
from streamer.feeds import alerts_key
from streamer.protocols.twilio import twilio_signature
from streamer.redis_server import RedisServer
from streamer.spool import parse, redis_dir_name
from streamer.webhooks import group_name
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, speech, twilio_messages, ws_url
from tests.webhook_receiver import Receiver
from verifier.audio import to_pcm16

TENANT = "outage"
TWILIO_TOKEN = "twilio-outage-token"
DEADLINE_S = 120.0  # generous: waiting for conditions, never a timing assertion


def wait_for(condition: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


async def await_for(
    condition: Callable[[], object], what: str | Callable[[], str], timeout: float = DEADLINE_S
) -> None:
    """``wait_for`` inside the event loop, so the calls' readers keep reading meanwhile; ``condition`` may
    be blocking (an HTTP request): it runs in a thread."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.2)


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def voices(telephone_devset: Path) -> dict[str, np.ndarray]:
    return {
        "genuine": speech(telephone_devset, "tuxpaint_ca", ENROL, 10),
        "impostor": speech(telephone_devset, "tuxpaint_ro", 0, 6),
    }


def start_gateway(tmp: Path, redis_server: RedisServer, spool_dir: Path) -> RunningServer:
    tmp.mkdir(exist_ok=True)
    return start_vpmon(tmp, redis_server, spool_dir=spool_dir, webhook_timeout_seconds=5)


def prepare_tenant(server: RunningServer, devset: Path, receiver: Receiver) -> dict[str, str]:
    """Agent ``agent-ca`` enrolled, a Twilio auth token, a webhook endpoint at the receiver's /hooks."""
    admin = server.key(TENANT)
    with server.client(admin) as client:
        paths = sorted((devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        response = client.post("/v1/voiceprints", data={"speaker_id": "agent-ca"}, files=files)
        assert response.status_code == 201, response.text
        client.patch("/v1/tenant", json={"twilio_auth_token": TWILIO_TOKEN}).raise_for_status()
        created = client.post("/v1/webhooks", json={"url": receiver.url + "/hooks"}).json()
    receiver.secrets["/hooks"] = created["secret"]
    return {"admin": admin, "monitor": server.key(TENANT, Role.MONITOR), "endpoint": created["webhook"]["id"]}


# --- clients ------------------------------------------------------------------------------------------
class NativeCall:
    """A native call streamed in parts (as fast as the server takes them), its frames read as they come."""

    def __init__(self, server: RunningServer, key: str, call_id: str) -> None:
        self.server, self.key, self.call_id = server, key, call_id
        self.frames: list[dict] = []
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.ws = await connect(
            ws_url(self.server, "/v1/streams/native"),
            additional_headers={"Authorization": f"Bearer {self.key}"},
        )
        start = {"type": "start", "call_id": self.call_id, "agent_id": "agent-ca", "encoding": "pcm16",
                 "sample_rate": 8000, "channels": 1}  # fmt: skip
        await self.ws.send(json.dumps(start))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in self.ws:
                self.frames.append(json.loads(message))

    async def send(self, audio: np.ndarray) -> None:
        assert self.ws is not None
        pcm = to_pcm16(audio).tobytes()
        for offset in range(0, len(pcm), 320):  # 20 ms frames
            await self.ws.send(pcm[offset : offset + 320])

    async def stop(self) -> int | None:
        assert self.ws is not None and self.reader is not None
        await self.ws.send(json.dumps({"type": "stop"}))
        await self.reader
        return None if self.ws.protocol.close_rcvd is None else self.ws.protocol.close_rcvd.code

    def of_type(self, kind: str, since: int = 0) -> list[dict]:
        return [f for f in self.frames[since:] if f["type"] == kind]


class TwilioCall:
    """A Twilio Media Streams call (the agent on the outbound track), sent in two parts."""

    def __init__(self, server: RunningServer, call_sid: str, first: np.ndarray, rest: np.ndarray) -> None:
        self.server = server
        params = {"tenant": TENANT, "agent_id": "agent-ca"}
        agent = np.concatenate([first, rest])
        self.messages = list(twilio_messages(call_sid, agent, np.zeros(len(agent), np.float32), params))
        self.split = 2 + 2 * (len(first) // 160)  # connected, start, then two tracks per 20 ms chunk
        self.ws: ClientConnection | None = None

    async def open_and_send_first(self) -> None:
        url = ws_url(self.server, f"/v1/streams/twilio/{TENANT}")
        self.ws = await connect(
            url, additional_headers={"X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, url)}
        )
        for message in self.messages[: self.split]:
            await self.ws.send(message)

    async def send_rest(self) -> None:
        assert self.ws is not None
        for message in self.messages[self.split : -1]:
            await self.ws.send(message)

    async def stop(self) -> int | None:
        assert self.ws is not None
        await self.ws.send(self.messages[-1])
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.ws.recv()
        return None if self.ws.protocol.close_rcvd is None else self.ws.protocol.close_rcvd.code


async def follow_alerts(server: RunningServer, key: str, seen: list[dict]) -> None:
    """A supervisor's alert feed: SSE from the start of the stream, reconnecting after any failure (the
    outage breaks it) with ``Last-Event-ID``, as browsers do. Every event is kept, repeats included."""
    last = "0-0"
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=httpx.Timeout(10.0)) as client:
        while True:
            try:
                async with client.stream(
                    "GET", "/v1/alerts/stream", headers={"Last-Event-ID": last}
                ) as response:
                    if response.status_code == 200:
                        event: dict[str, str] = {}
                        async for line in response.aiter_lines():
                            if line.startswith(("id:", "event:", "data:")):
                                name, _, value = line.partition(": ")
                                event[name.rstrip(":")] = value
                            elif not line and "data" in event:
                                last = event["id"]
                                seen.append(
                                    {"id": event["id"], "event": event["event"], **json.loads(event["data"])}
                                )
                                event = {}
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)


def calls_feed(server: RunningServer, key: str, call_id: str) -> list[tuple[str, dict]]:
    """The call's events (verdicts, starts and ends) as (event, data), from the calls feed's replay."""
    found = []
    timeout = httpx.Timeout(5.0, read=2.0)  # the replay is done once nothing comes for a while
    with (
        server.client(key) as client,
        client.stream(
            "GET", "/v1/calls/stream", headers={"Last-Event-ID": "0-0"}, timeout=timeout
        ) as response,
    ):
        assert response.status_code == 200
        event = ""
        with contextlib.suppress(httpx.ReadTimeout):
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = json.loads(line.removeprefix("data: "))
                    if data.get("call_id") == call_id:
                        found.append((event, data))
    return found


def verdict_states(server: RunningServer, key: str, call_id: str) -> list[str]:
    """The states of a call's verdicts so far (for protocols that do not push verdicts to the peer)."""
    return [data["state"] for _, data in calls_feed(server, key, call_id) if "state" in data]


def scrape(server: RunningServer, key: str) -> dict[str, float]:
    """/metrics: every unlabelled sample, and labelled ones summed over their labels."""
    with server.client(key) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def readiness(server: RunningServer, key: str) -> httpx.Response:
    with server.client(key) as client:
        return client.get("/readyz")


def subscribed_patterns(redis_server: RedisServer) -> int:
    client = redis_server.client()
    try:
        return int(client.execute_command("PUBSUB", "NUMPAT"))
    finally:
        client.close()


def spooled_entries(spool_dir: Path, redis_server: RedisServer) -> list[dict]:
    directory = spool_dir / redis_dir_name(redis_server.url)
    return [
        e for path in sorted(directory.glob("alerts-*.jsonl")) for e in parse(path.read_bytes(), str(path))
    ]


def assert_webhooks_once(
    redis: Any, receiver: Receiver, endpoint: str, expected: set[str], tenant: str = TENANT
) -> None:
    """Every expected alert delivered to the receiver, and the endpoint's consumer group done with the
    tenant's whole stream (nothing pending, nothing unread: no delivery can still come); then each alert id
    arrived in exactly one request. ``redis``: a RedisServer or a LocalCluster (``client()``)."""

    def alert_ids() -> list[str]:
        return [json.loads(r.body)["data"]["alert_id"] for r in receiver.on("/hooks")]

    wait_for(lambda: expected <= set(alert_ids()), f"{tenant}'s webhook deliveries of {sorted(expected)}")
    client = redis.client()
    key, group = alerts_key(tenant), group_name(endpoint)

    def consumed_all() -> bool:
        newest = client.xrevrange(key, count=1)[0][0].decode()
        info = next(g for g in client.xinfo_groups(key) if g["name"].decode() == group)
        return info["last-delivered-id"].decode() == newest and info["pending"] == 0

    wait_for(consumed_all, f"{tenant}'s webhook consumer group to finish the stream")
    client.close()
    assert Counter(alert_ids()) == dict.fromkeys(expected, 1)
    assert all(r.verified == "ok" for r in receiver.on("/hooks"))


# --- the outage -----------------------------------------------------------------------------------------
def test_redis_killed_mid_call_loses_no_alert(
    tmp_path: Path, redis_to_kill: RedisServer, receiver: Receiver, voices: dict, telephone_devset: Path
) -> None:
    spool_dir = tmp_path / "spool"
    gateway = start_gateway(tmp_path, redis_to_kill, spool_dir)
    try:
        keys = prepare_tenant(gateway, telephone_devset, receiver)
        asyncio.run(outage_scenario(gateway, redis_to_kill, spool_dir, receiver, keys, voices))
    except BaseException:
        print(gateway.log_tail())
        raise
    finally:
        stop_vpmon(gateway)


async def outage_scenario(
    gateway: RunningServer, redis_server: RedisServer, spool_dir: Path, receiver: Receiver, keys: dict,
    voices: dict,
) -> None:  # fmt: skip
    monitor = keys["monitor"]
    genuine, impostor = voices["genuine"], voices["impostor"]
    half = len(genuine) // 2
    feed: list[dict] = []
    follower = asyncio.create_task(follow_alerts(gateway, monitor, feed))
    takeovers = [NativeCall(gateway, monitor, f"native-takeover-{i}") for i in (1, 2)]
    honest = NativeCall(gateway, monitor, "native-genuine")
    twilio = TwilioCall(gateway, "CA-outage-takeover", genuine, impostor)

    # Before the outage: every call verified (native: on its websocket; Twilio: on the verdict feed).
    for call in takeovers:
        await call.open()
        await call.send(genuine)
    await honest.open()
    await honest.send(genuine[:half])
    await twilio.open_and_send_first()

    states: dict[str, list[str]] = {}

    def calls_verified() -> bool:
        states.update({c.call_id: [v["state"] for v in c.of_type("verdict")] for c in [*takeovers, honest]})
        states["CA-outage-takeover"] = verdict_states(gateway, monitor, "CA-outage-takeover")
        return all("verified" in seen for seen in states.values())

    await await_for(calls_verified, lambda: f"every call to be verified before the outage: {states}")
    assert all(not call.of_type("alert") for call in [*takeovers, honest])
    unseen = gateway.key(TENANT, Role.MONITOR)  # never shown to the gateway before the outage
    before = scrape(gateway, monitor)  # the key checked just before the outage: it serves during it
    assert before["vpmon_redis_up"] == 1 and before["vpmon_spooled_alerts"] == 0
    assert readiness(gateway, monitor).status_code == 200

    # The outage: SIGKILL, the rest of each call streamed while Redis is away.
    redis_server.kill()
    seen_at_kill = {call.call_id: len(call.frames) for call in [*takeovers, honest]}
    for call in takeovers:
        await call.send(impostor)
    await honest.send(genuine[half:])
    await twilio.send_rest()

    await await_for(lambda: all(call.of_type("alert") for call in takeovers), "the takeovers' alerts, pushed")
    await await_for(lambda: len(honest.of_type("verdict", seen_at_kill[honest.call_id])) > 0, "verdicts")

    def three_spooled() -> bool:
        return scrape(gateway, monitor)["vpmon_spooled_alerts"] == 3

    await await_for(three_spooled, "three alerts in the spool (the two native takeovers and Twilio's)")
    during = scrape(gateway, monitor)
    assert during["vpmon_redis_up"] == 0
    assert during["vpmon_alerts_spooled_total"] - before["vpmon_alerts_spooled_total"] == 3
    assert during["vpmon_verdicts_dropped_total"] > before["vpmon_verdicts_dropped_total"]
    ready = readiness(gateway, monitor)
    assert ready.status_code == 503 and ready.headers["content-type"].startswith("application/problem+json")
    problem = ready.json()
    assert problem["alerts_spooled"] == 3 and "Redis cannot be reached" in problem["detail"], problem
    unchecked = readiness(gateway, unseen)  # a key Redis cannot check now: refused, and told nothing
    assert unchecked.status_code == 503 and "alerts_spooled" not in unchecked.json()

    # Every call kept being verified during the outage, on its websocket.
    for call in [*takeovers, honest]:
        during_outage = call.of_type("verdict", seen_at_kill[call.call_id])
        assert during_outage, call.call_id
    assert "mismatch" not in {v["state"] for v in honest.of_type("verdict")} and not honest.of_type("alert")
    for call in takeovers:
        assert "mismatch" in {v["state"] for v in call.of_type("verdict", seen_at_kill[call.call_id])}
        assert [a["kind"] for a in call.of_type("alert")] == ["takeover"]

    # On disk, fsync'd before the peers heard of them: the three alerts, in the order they were raised.
    spooled = spooled_entries(spool_dir, redis_server)
    spooled_ids = [e["data"]["alert_id"] for e in spooled]
    pushed_ids = {call.of_type("alert")[0]["alert_id"] for call in takeovers}
    assert len(spooled) == 3 and pushed_ids < set(spooled_ids)
    assert sorted(e["data"]["call_id"] for e in spooled) == [
        "CA-outage-takeover", "native-takeover-1", "native-takeover-2"
    ]  # fmt: skip

    # A call cannot start while Redis is away (its key, its agent's voiceprint): a clear refusal.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(
            ws_url(gateway, "/v1/streams/native"), additional_headers={"Authorization": f"Bearer {monitor}"}
        )
    assert refused.value.response.status_code == 503

    # Two calls end during the outage; the others go on across Redis' return.
    assert await honest.stop() == 1000
    assert await takeovers[0].stop() == 1000

    # Redis returns (same port, its AOF): the spool drains, in order, once.
    await asyncio.to_thread(redis_server.start)
    await await_for(lambda: readiness(gateway, monitor).status_code == 200, "/readyz to be 200 again")
    # Bindings made on other gateways reach this one's calls again: it subscribed anew.
    await await_for(lambda: subscribed_patterns(redis_server) > 0, "the binding listener to subscribe again")
    assert readiness(gateway, monitor).json()["alerts_spooled"] == 0
    assert await takeovers[1].stop() == 1000
    assert await twilio.stop() == 1000
    after = scrape(gateway, monitor)
    assert after["vpmon_redis_up"] == 1 and after["vpmon_spooled_alerts"] == 0
    assert after["vpmon_alerts_unspooled_total"] - before["vpmon_alerts_unspooled_total"] == 3
    assert all(e.stat().st_size == 0 for e in (spool_dir / redis_dir_name(redis_server.url)).glob("*"))

    expected = set(spooled_ids)
    await await_for(lambda: expected <= {a["alert_id"] for a in feed}, "the SSE feed to get every alert")
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower
    alerts = [a for a in feed if a["event"] == "alert"]
    assert Counter(a["alert_id"] for a in alerts) == dict.fromkeys(expected, 1)
    assert [a["alert_id"] for a in alerts] == spooled_ids  # the stream kept the order they were raised in
    assert all(a["raised_at"] for a in alerts)

    with gateway.client(monitor) as client:
        states = {c["call_id"]: c for c in client.get("/v1/calls").json()}
    # The calls that ended during the outage: their last state, written when Redis returned.
    for call_id in ("native-genuine", "native-takeover-1"):
        assert states[call_id]["state"] == "ended", states[call_id]
    assert states["native-takeover-1"]["alerts"] == 1 and states["native-genuine"]["alerts"] == 0

    await asyncio.to_thread(assert_webhooks_once, redis_server, receiver, keys["endpoint"], expected)


# --- the outage, and the gateway killed too ---------------------------------------------------------------
def test_a_killed_gateways_spool_is_delivered_by_the_next_one(
    tmp_path: Path, redis_to_kill: RedisServer, receiver: Receiver, voices: dict, telephone_devset: Path
) -> None:
    spool_dir = tmp_path / "spool"
    first = start_gateway(tmp_path / "first", redis_to_kill, spool_dir)
    second = None
    try:
        keys = prepare_tenant(first, telephone_devset, receiver)

        async def takeovers_during_the_outage() -> list[str]:
            calls = [NativeCall(first, keys["monitor"], f"restart-takeover-{i}") for i in (1, 2)]
            for call in calls:
                await call.open()
                await call.send(voices["genuine"])

            def verified() -> bool:
                return all(any(v["state"] == "verified" for v in c.of_type("verdict")) for c in calls)

            await await_for(verified, "both calls to be verified")
            redis_to_kill.kill()
            for call in calls:
                await call.send(voices["impostor"])
            await await_for(lambda: all(c.of_type("alert") for c in calls), "both alerts, spooled and pushed")
            return [c.of_type("alert")[0]["alert_id"] for c in calls]

        pushed = asyncio.run(takeovers_during_the_outage())
        first.process.kill()  # SIGKILL, mid-call, with Redis away: only the spool holds the alerts
        first.process.wait()
        spooled = [e["data"]["alert_id"] for e in spooled_entries(spool_dir, redis_to_kill)]
        assert sorted(spooled) == sorted(pushed)

        redis_to_kill.start()
        second = start_gateway(tmp_path / "second", redis_to_kill, spool_dir)
        # The new gateway wrote the stopped one's spool before it served, and deleted it.
        ready = readiness(second, keys["monitor"])
        assert ready.status_code == 200 and ready.json()["alerts_spooled"] == 0
        assert scrape(second, keys["monitor"])["vpmon_alerts_unspooled_total"] == 2
        directory = spool_dir / redis_dir_name(redis_to_kill.url)
        assert [p.stat().st_size for p in directory.iterdir()] == [0]  # the new gateway's own, empty

        client = redis_to_kill.client()
        stream = [json.loads(f[b"data"]) for _, f in client.xrange(alerts_key(TENANT))]
        client.close()
        assert [a["alert_id"] for a in stream] == spooled  # once each, in the order they were raised
        assert_webhooks_once(redis_to_kill, receiver, keys["endpoint"], set(spooled))
    except BaseException:
        for server in (first, second):
            if server is not None:
                print(server.log_tail())
        raise
    finally:
        for server in (first, second):
            if server is not None and server.process.poll() is None:
                stop_vpmon(server)
