"""WebRTC calls end to end: real aiortc publishers → WHIP on the real server (``vpmon serve``) → real Redis,
on real speech. The same assertions as the websocket calls (tests/test_gateway.py): a takeover raises
exactly one alert on the SSE feed, a genuine call none; and every refusal or end leaves no peer
connection open on the server (``GET /v1/whip``)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from streamer.auth import Role
from streamer.redis_server import RedisServer
from streamer.store import Voiceprint, connect, open_store
from streamer.stream_client import CallAudio, StreamOptions, stream_call
from streamer.whip_client import CODEC_RATES, FileAudioTrack
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, alerts_for, speech
from tests.test_protocol_whip import CHROME_OFFER
from verifier.audio import resample

TENANT = "webrtc"
IDLE_SECONDS = 5
WAIT_SECONDS = 60.0  # a deadline for what the server does on its own, never a timing assertion
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def whip_server(tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer) -> Iterator[RunningServer]:
    # Loopback candidates on, as the browser tests need them (Chromium in a loopback-only namespace).
    server = start_vpmon(
        tmp_path_factory.mktemp("vpmon-whip"), api_redis, whip_loopback_candidates="true",
        ws_idle_seconds=IDLE_SECONDS,
    )  # fmt: skip
    try:
        yield server
    finally:
        stop_vpmon(server)


@pytest.fixture(scope="module")
def keys(whip_server: RunningServer, telephone_devset: Path) -> dict[str, str]:
    admin = whip_server.key(TENANT)
    with whip_server.client(admin) as client:
        paths = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        response = client.post("/v1/voiceprints", data={"speaker_id": "agent-ca"}, files=files)
        assert response.status_code == 201, response.text
    return {
        "admin": admin,
        "monitor": whip_server.key(TENANT, Role.MONITOR),
        "read": whip_server.key(TENANT, Role.READ),
        "other": whip_server.key("other-tenant", Role.MONITOR),
    }


@pytest.fixture(scope="module")
def calls(telephone_devset: Path) -> dict[str, np.ndarray]:
    genuine = speech(telephone_devset, "tuxpaint_ca", ENROL, 10)
    impostor = speech(telephone_devset, "tuxpaint_ro", 0, 6)
    return {"genuine": genuine, "takeover": np.concatenate([genuine, impostor])}


def whip_state(server: RunningServer, key: str) -> dict[str, Any]:
    with server.client(key) as client:
        response = client.get("/v1/whip")
        assert response.status_code == 200, response.text
        return response.json()


def call_state(server: RunningServer, key: str, call_id: str) -> dict[str, Any] | None:
    with server.client(key) as client:
        return next((c for c in client.get("/v1/calls").json() if c["call_id"] == call_id), None)


def nothing_left(server: RunningServer, key: str) -> None:
    state = whip_state(server, key)
    assert state == {"sessions": [], "peer_connections": 0}, state


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT_SECONDS:.0f} s for {what}"
        time.sleep(0.2)


class Publisher:
    """A WebRTC publisher as a browser page is one: a sendonly microphone track (the call's 8 kHz audio,
    resampled for the codec), a data channel or none, and the offer sent once ICE gathering is complete."""

    def __init__(
        self,
        audio: np.ndarray | None = None,
        codec: str = "opus",
        data_channel: bool = True,
        speed: float = 8,
    ) -> None:
        self.pc = RTCPeerConnection()
        self.messages: list[dict[str, Any]] = []
        self.message_arrived = asyncio.Event()
        if audio is not None:
            rate = CODEC_RATES[codec]
            self.track = FileAudioTrack(resample(audio, 8000, rate), rate, speed)
            transceiver = self.pc.addTransceiver(self.track, direction="sendonly")
            capabilities = RTCRtpSender.getCapabilities("audio").codecs
            transceiver.setCodecPreferences(
                [c for c in capabilities if c.mimeType.lower() == f"audio/{codec}"]
            )
        if data_channel:
            channel = self.pc.createDataChannel("vpmon")
            channel.on("message", self._on_message)

    def _on_message(self, message: str) -> None:
        self.messages.append(json.loads(message))
        self.message_arrived.set()

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def publish(self, http: httpx.AsyncClient, **ids: str) -> str:
        """POST the offer with the ids as query parameters; apply the answer; return the location."""
        response = await http.post(
            "/v1/whip", content=await self.offer(), params=ids, headers={"Content-Type": "application/sdp"}
        )
        assert response.status_code == 201, response.text
        assert response.headers["content-type"] == "application/sdp"
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        return response.headers["location"]


def publish_file(server: RunningServer, key: str, audio: np.ndarray, call_id: str, codec: str = "opus"):
    options = StreamOptions(
        "whip", server.url, key=key, agent_id="agent-ca", call_id=call_id, speed=0, whip_codec=codec
    )  # fmt: skip
    return asyncio.run(stream_call(CallAudio.from_samples(audio, 8000), options))


@pytest.mark.parametrize("codec", ["opus", "PCMU"])
def test_takeover_raises_one_alert(whip_server: RunningServer, keys: dict, calls: dict, codec: str) -> None:
    call_id = f"whip-takeover-{codec}"
    result = publish_file(whip_server, keys["monitor"], calls["takeover"], call_id, codec)
    assert result.ok and result.close_reason == "DELETE 200", result
    trace = [(v["state"], v["llr"], v["media_start"], v["media_end"]) for v in result.verdicts]
    assert [a["kind"] for a in result.alerts] == ["takeover"], trace  # pushed on the data channel
    alert = result.alerts[0]
    assert (alert["tenant"], alert["call_id"], alert["agent_id"]) == (TENANT, call_id, "agent-ca")
    assert alert["impostor_since"] >= 0.9 * len(calls["genuine"]) / 8000 - 1  # after the takeover
    assert {"verified", "mismatch"} <= {v["state"] for v in result.verdicts}
    assert all(
        {"score", "threshold", "net_speech_seconds", "media_start", "model_id"} <= set(v)
        for v in result.verdicts
    )

    feed = alerts_for(whip_server, keys["monitor"], call_id)
    assert [(a["event"], a["kind"], a["tenant"], a["agent_id"], a["protocol"]) for a in feed] == [
        ("alert", "takeover", TENANT, "agent-ca", "whip")
    ]
    call = call_state(whip_server, keys["monitor"], call_id)
    assert call is not None and (call["state"], call["alerts"], call["protocol"]) == ("ended", 1, "whip")
    nothing_left(whip_server, keys["monitor"])


def test_genuine_call_is_verified_without_alert(whip_server: RunningServer, keys: dict, calls: dict) -> None:
    result = publish_file(whip_server, keys["monitor"], calls["genuine"], "whip-genuine")
    assert result.ok, result
    states = [v["state"] for v in result.verdicts]
    assert states and states[-1] == "verified" and "mismatch" not in states
    assert result.alerts == [] and alerts_for(whip_server, keys["monitor"], "whip-genuine") == []
    call = call_state(whip_server, keys["monitor"], "whip-genuine")
    assert call is not None and call["state"] == "ended" and call["net_speech_seconds"] > 10
    nothing_left(whip_server, keys["monitor"])


def test_delete_ends_the_session_and_the_call(whip_server: RunningServer, keys: dict, calls: dict) -> None:
    """A page with no data channel, its ids in the query: DELETE mid-call ends the call on the server."""
    monitor = keys["monitor"]

    async def scenario() -> tuple[dict, int]:
        publisher = Publisher(calls["genuine"], data_channel=False, speed=1)
        auth = {"Authorization": f"Bearer {monitor}"}
        async with httpx.AsyncClient(base_url=whip_server.url, headers=auth, timeout=60) as http:
            location = await publisher.publish(http, call_id="whip-deleted", agent_id="agent-ca")
            deadline = time.monotonic() + WAIT_SECONDS
            while True:  # until the server has heard some speech
                call = next(c for c in (await http.get("/v1/calls")).json() if c["call_id"] == "whip-deleted")
                if call["net_speech_seconds"] > 0:
                    break
                assert time.monotonic() < deadline, "no speech reached the call"
                await asyncio.sleep(0.2)
            other = await http.delete(location, headers={"Authorization": f"Bearer {keys['other']}"})
            deleted = await http.delete(location)
            again = await http.delete(location)
        await publisher.pc.close()
        assert other.status_code == 404, other.text  # another tenant's session: as if it did not exist
        assert deleted.status_code == 200, deleted.text
        return deleted.json(), again.status_code

    ended, again = asyncio.run(scenario())
    assert (
        ended["call_id"] == "whip-deleted" and ended["state"] == "ended" and ended["agent_id"] == "agent-ca"
    )
    assert again == 404
    assert call_state(whip_server, monitor, "whip-deleted")["state"] == "ended"
    nothing_left(whip_server, monitor)


def test_a_publisher_that_vanishes_ends_its_call(whip_server: RunningServer, keys: dict, calls: dict) -> None:
    """The page closes without DELETE: the connection's end (or, failing that, the idle limit) ends it."""
    monitor = keys["monitor"]

    async def scenario() -> None:
        publisher = Publisher(calls["genuine"], speed=1)
        auth = {"Authorization": f"Bearer {monitor}"}
        async with httpx.AsyncClient(base_url=whip_server.url, headers=auth, timeout=60) as http:
            await publisher.publish(http, call_id="whip-vanished", agent_id="agent-ca")
            deadline = time.monotonic() + WAIT_SECONDS
            while (await http.get("/v1/whip")).json()["sessions"][0]["connection_state"] != "connected":
                assert time.monotonic() < deadline, "the publisher never connected"
                await asyncio.sleep(0.1)
        await publisher.pc.close()

    asyncio.run(scenario())
    wait_for(lambda: whip_state(whip_server, monitor)["sessions"] == [], "the session to end")
    nothing_left(whip_server, monitor)
    assert call_state(whip_server, monitor, "whip-vanished")["state"] == "ended"


def test_a_chrome_offer_is_answered_and_an_idle_session_ends(whip_server: RunningServer, keys: dict) -> None:
    """Chrome's offer (its codec list, sendonly, a data channel, candidates inline) gets an Opus-only
    recvonly answer; no audio ever arrives (nobody is behind the candidate), so the idle limit ends it."""
    monitor = keys["monitor"]
    with whip_server.client(monitor) as client:
        response = client.post(
            "/v1/whip?call_id=whip-chrome", content=CHROME_OFFER, headers={"Content-Type": "application/sdp"}
        )
        assert response.status_code == 201, response.text
        answer = response.text
        assert response.headers["location"].startswith("/v1/whip/")
        audio = answer[answer.index("m=audio") : answer.index("m=application")]
        assert "a=recvonly" in audio and "opus/48000/2" in audio
        assert "PCMU" not in audio and "PCMA" not in audio  # one codec: the format is known
        assert "webrtc-datachannel" in answer and "a=candidate:" in answer  # non-trickle
        assert "127.0.0.1" in answer  # a loopback candidate, for Chromium in a loopback-only namespace
        [session] = whip_state(whip_server, monitor)["sessions"]
        assert session["call_id"] == "whip-chrome" and session["codec"] == "opus"
    wait_for(lambda: whip_state(whip_server, monitor)["sessions"] == [], "the idle session to end")
    nothing_left(whip_server, monitor)
    assert call_state(whip_server, monitor, "whip-chrome")["state"] == "ended"


def test_refusals_are_4xx_and_leave_nothing_running(whip_server: RunningServer, keys: dict) -> None:
    monitor = keys["monitor"]

    async def offer(**kinds: bool) -> str:
        publisher = Publisher(np.zeros(800, np.float32) if kinds.get("audio", True) else None,
                              data_channel=kinds.get("data_channel", True))  # fmt: skip
        try:
            return await publisher.offer()
        finally:
            await publisher.pc.close()

    good = asyncio.run(offer())
    no_audio = asyncio.run(offer(audio=False))
    # Passes vpmon's SDP checks but not aiortc's (no RTCP mux): the peer connection exists by then.
    no_rtcp_mux = "\r\n".join(line for line in good.split("\r\n") if line != "a=rtcp-mux")
    sdp = {"Content-Type": "application/sdp"}

    def post(key: str | None, body: str | bytes = good, headers: dict | None = None, **params: str):
        with whip_server.client(key) as client:
            return client.post("/v1/whip", content=body, headers=headers or sdp, params=params)

    cases = [
        (post(None), 401, "unauthorized"),
        (post("vpk_wrong"), 401, "unauthorized"),
        (post(keys["read"]), 403, "forbidden"),
        (post(monitor, headers={"Content-Type": "text/plain"}), 415, "unsupported-media-type"),
        (post(monitor, body="v=0\r\n" + "a=x\r\n" * 20_000), 413, "too-large"),
        (post(monitor, body="hello"), 400, "bad-request"),
        (post(monitor, body=no_audio), 400, "bad-request"),
        (post(monitor, body=no_rtcp_mux), 400, "bad-request"),
        (post(monitor, agent_id="nobody"), 422, "agent-not-enrolled"),
        (post(monitor, tenant="other-tenant"), 403, "forbidden"),
        (post(monitor, call_id="bad call id"), 400, "bad-request"),
    ]
    for response, status, slug in cases:
        assert response.status_code == status, (status, response.text)
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert problem["type"] == f"urn:vpmon:problem:{slug}" and problem["status"] == status
    assert "no audio track" in cases[6][0].json()["detail"]
    assert "RTCP mux is not enabled" in cases[7][0].json()["detail"]
    assert "not enrolled" in cases[8][0].json()["detail"]
    nothing_left(whip_server, monitor)
    assert call_state(whip_server, monitor, "nobody") is None

    # A voiceprint of another model (the tenant was enrolled before a model change): 409, as the API.
    old_model = Voiceprint("old-model", "agent-old", np.ones(256, np.float32), "ge2e-resemblyzer-16k")
    open_store(connect(whip_server.redis.url)).put(old_model)
    mismatch = post(whip_server.key("old-model", Role.MONITOR), agent_id="agent-old")
    assert mismatch.status_code == 409 and mismatch.json()["type"] == "urn:vpmon:problem:model-mismatch"
    assert "vpmon reembed" in mismatch.json()["detail"]
    nothing_left(whip_server, monitor)

    # A call id already streaming is a conflict; another tenant may not end the session.
    first = post(monitor, CHROME_OFFER, call_id="whip-twice")
    assert first.status_code == 201
    twice = post(monitor, CHROME_OFFER, call_id="whip-twice")
    assert twice.status_code == 409 and twice.json()["type"] == "urn:vpmon:problem:conflict"
    location = first.headers["location"]
    with whip_server.client(keys["other"]) as other:
        assert other.delete(location).status_code == 404
        assert other.get("/v1/whip").json() == {"sessions": [], "peer_connections": 0}
    with whip_server.client(monitor) as client:
        assert client.delete(location).status_code == 200
        assert client.delete(location).status_code == 404
        assert client.delete("/v1/whip/never-was").status_code == 404
        assert client.patch(location, content="a=candidate:x").status_code == 405  # no trickle
    nothing_left(whip_server, monitor)


def test_vpmon_stream_publishes_a_file_over_whip(
    whip_server: RunningServer, keys: dict, calls: dict, tmp_path: Path
) -> None:
    path = tmp_path / "takeover.wav"
    sf.write(path, calls["takeover"], 8000, subtype="PCM_16")
    command = [sys.executable, "-m", "streamer.cli", "stream", str(path), "--protocol", "whip",
               "--agent", "agent-ca", "--call-id", "whip-cli", "--speed", "0", "--json"]  # fmt: skip
    env = {"VPMON_URL": whip_server.url, "VPMON_API_KEY": keys["monitor"], "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["protocol"] == "whip" and summary["error"] is None
    assert summary["alerts"] == 1 and summary["verdicts"] == len([x for x in lines if x["type"] == "verdict"])
    assert [x["kind"] for x in lines if x["type"] == "alert"] == ["takeover"]

    text = subprocess.run(
        [*command[:-1], "--call-id", "whip-cli-text", "--whip-codec", "PCMU"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert "ALERT takeover of agent-ca" in text.stdout and "whip call whip-cli-text" in text.stdout
    assert "DELETE 200" in text.stdout

    refused = subprocess.run(
        [*command[:-1], "--agent", "nobody"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert refused.returncode == 2 and "HTTP 422" in refused.stderr and "Traceback" not in refused.stderr
    nothing_left(whip_server, keys["monitor"])
