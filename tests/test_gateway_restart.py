"""A gateway killed mid-call: its calls do not stay "live" for ever, and a telephony client that reconnects
to the gateway started in its place gets a fresh session.

Real parts: ``vpmon serve`` subprocesses on one real Redis, a Twilio Media Streams call and a native call
over real websockets, dev-set voices. The first gateway is SIGKILLed (no chance to end its calls) while
both calls stream; a second gateway starts on the same port. The Twilio call reconnects under the same
CallSid, as Twilio does after a dropped stream: the new gateway holds it (the calls list says which
gateway), verifies it from scratch, and its takeover raises one alert. The native call never comes back:
once the dead gateway's lease runs out (streamer/liveness.py) the new gateway ends it, with
``ended_reason: gateway_lost``, in the calls list and on the calls feed; the reconnected call is left alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamer.auth import Role
from streamer.liveness import LOST_REASON
from streamer.redis_server import RedisServer
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, alerts_for, speech
from tests.test_redis_outage import TENANT, NativeCall, TwilioCall, await_for, calls_feed, wait_for

LEASE_S = 3  # short, so the test does not wait long; the default is 30 s


@pytest.fixture(scope="module")
def voices(telephone_devset: Path) -> dict[str, np.ndarray]:
    return {
        "genuine": speech(telephone_devset, "tuxpaint_ca", ENROL, 10),
        "impostor": speech(telephone_devset, "tuxpaint_ro", 0, 6),
    }


@pytest.fixture
def gateways(tmp_path: Path, redis_to_kill: RedisServer) -> Iterator[list[RunningServer]]:
    """Gateways started by the test, stopped (or found already dead) at the end."""
    started: list[RunningServer] = []
    try:
        yield started
    finally:
        for server in started:
            if server.process.poll() is None:
                stop_vpmon(server)


def start(tmp: Path, redis_server: RedisServer, port: int | None = None) -> RunningServer:
    tmp.mkdir(exist_ok=True)
    return start_vpmon(tmp, redis_server, port, gateway_lease_seconds=LEASE_S, spool_dir=tmp / "spool")


def calls_by_id(server: RunningServer, key: str) -> dict[str, dict]:
    with server.client(key) as client:
        response = client.get("/v1/calls")
    response.raise_for_status()
    return {call["call_id"]: call for call in response.json()}


def call_events(server: RunningServer, key: str, call_id: str) -> list[dict]:
    """The call's start/end events on the calls feed's replay."""
    return [data for event, data in calls_feed(server, key, call_id) if event == "call"]


def test_killed_gateway_calls_end_and_a_reconnecting_call_starts_afresh(
    tmp_path: Path,
    redis_to_kill: RedisServer,
    gateways: list[RunningServer],
    voices: dict,
    telephone_devset: Path,
) -> None:
    first = start(tmp_path / "first", redis_to_kill)
    gateways.append(first)
    admin = first.key(TENANT)
    monitor = first.key(TENANT, Role.MONITOR)
    with first.client(admin) as client:
        paths = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        assert client.post("/v1/voiceprints", data={"speaker_id": "agent-ca"}, files=files).status_code == 201
        client.patch("/v1/tenant", json={"twilio_auth_token": "twilio-outage-token"}).raise_for_status()
    genuine, impostor = voices["genuine"], voices["impostor"]
    half = len(genuine) // 2

    async def scenario() -> None:
        # Both calls stream on the first gateway until each is verified.
        native = NativeCall(first, monitor, "abandoned-native")
        await native.open()
        await native.send(genuine)
        twilio = TwilioCall(first, "CA-reconnects", genuine[:half], genuine[half:])
        await twilio.open_and_send_first()
        await twilio.send_rest()
        await await_for(lambda: native.of_type("verdict"), "a verdict on the native call")

        def both_live_on_first() -> bool:
            calls = calls_by_id(first, monitor)
            return all(
                calls.get(c, {}).get("state") not in (None, "ended") and calls[c]["net_speech_seconds"] > 3
                for c in ("abandoned-native", "CA-reconnects")
            )

        await await_for(both_live_on_first, "both calls live with speech on the first gateway")
        before = calls_by_id(first, monitor)
        first_gateway = before["CA-reconnects"]["gateway"]
        assert before["abandoned-native"]["gateway"] == first_gateway

        first.process.kill()  # SIGKILL: no call is ended, no lease released
        first.process.wait()
        for ws in (native.ws, twilio.ws):
            assert ws is not None
            await ws.wait_closed()
        assert native.ws is not None and native.ws.close_code == 1006  # the connection just vanished

        port = int(first.url.rsplit(":", 1)[1])
        second = await asyncio.to_thread(start, tmp_path / "second", redis_to_kill, port)
        gateways.append(second)
        # The dead gateway's calls are still "live" in Redis: nobody ended them.
        stale = calls_by_id(second, monitor)
        assert stale["abandoned-native"]["state"] != "ended"

        # Twilio reconnects the same call: a fresh session on the new gateway, verified from scratch, and the
        # impostor taking over raises an alert there.
        again = TwilioCall(second, "CA-reconnects", genuine, impostor)
        await again.open_and_send_first()

        def held_by_second() -> dict | None:
            call = calls_by_id(second, monitor)["CA-reconnects"]
            return call if call["gateway"] not in (None, first_gateway) else None

        await await_for(held_by_second, "the reconnected call on the new gateway")
        fresh = held_by_second()
        assert fresh is not None and fresh["alerts"] == 0
        # A new session (started after the first gateway died), not the old one's state carried over.
        assert fresh["started_at"] > before["CA-reconnects"]["started_at"]

        # The abandoned call ends once the first gateway's lease is out; the reconnected one is left alone.
        await await_for(
            lambda: calls_by_id(second, monitor)["abandoned-native"]["state"] == "ended",
            "the dead gateway's call to be ended",
            timeout=10 * LEASE_S + 30,
        )
        swept = calls_by_id(second, monitor)
        assert swept["abandoned-native"]["ended_reason"] == LOST_REASON
        assert swept["abandoned-native"]["gateway"] == first_gateway
        assert swept["CA-reconnects"]["state"] != "ended"

        await again.send_rest()
        assert await again.stop() == 1000
        ended = calls_by_id(second, monitor)["CA-reconnects"]
        assert ended["state"] == "ended" and ended["ended_reason"] == "stop"
        assert ended["gateway"] == fresh["gateway"]

    asyncio.run(scenario())

    second = gateways[-1]
    alerts = [a for a in alerts_for(second, monitor, "CA-reconnects") if a["event"] == "alert"]
    assert len(alerts) == 1, alerts
    assert alerts[0]["kind"] == "takeover"
    assert not [a for a in alerts_for(second, monitor, "abandoned-native") if a["event"] == "alert"]
    # Live pages learn of the lost call from the calls feed, as of any other end.
    ends = [e for e in call_events(second, monitor, "abandoned-native") if e["state"] == "ended"]
    assert [e["ended_reason"] for e in ends] == [LOST_REASON]
    # A clean stop releases the lease: nothing left for another gateway to sweep.
    stop_vpmon(second)
    client = redis_to_kill.client()
    try:
        assert client.zcard("vpgateways") == 0
        wait_for(lambda: not client.keys("vpgateway-calls:*"), "the gateways' call lists to go")
    finally:
        client.close()
