"""Live calls end to end: real websocket clients → the real server (``vpmon serve``) → real Redis, on real
speech. A takeover raises exactly one alert on the SSE feed; a genuine call raises none; bad input ends
only its own call."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import connect

from streamer.auth import Role
from streamer.protocols.twilio import twilio_signature
from streamer.stream_client import (
    CallAudio,
    StreamOptions,
    StreamResult,
    audiohook_signature_headers,
    stream_call,
    stream_url,
)
from tests.server_fixtures import RunningServer
from tests.test_redis_server import wait_for
from verifier.audio import encode_mulaw, read_audio, resample, to_pcm16

ENROL = 6  # utterances for enrolment; the rest of the speaker's utterances make calls


def speech(devset: Path, speaker: str, first: int, last: int) -> np.ndarray:
    """Utterances [first, last) of a speaker at 8 kHz, with 0.7 s pauses (the customer talking)."""
    parts = []
    for path in sorted((devset / "wav" / speaker).glob("*.wav"))[first:last]:
        audio = read_audio(path)
        parts += [resample(audio.samples, audio.sample_rate, 8000), np.zeros(5600, np.float32)]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def enrolled(vpmon_server: RunningServer, telephone_devset: Path) -> dict[str, str]:
    """Tenant "live" with two enrolled agents; returns keys by role."""
    admin = vpmon_server.key("live")
    with vpmon_server.client(admin) as client:
        for agent, speaker in (("agent-ca", "tuxpaint_ca"), ("agent-es", "tuxpaint_es")):
            paths = sorted((telephone_devset / "wav" / speaker).glob("*.wav"))[:ENROL]
            files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
            response = client.post("/v1/voiceprints", data={"speaker_id": agent}, files=files)
            assert response.status_code == 201, response.text
        client.patch("/v1/tenant", json={"twilio_auth_token": "twilio-secret-token"}).raise_for_status()
    return {"admin": admin, "monitor": vpmon_server.key("live", Role.MONITOR)}


@pytest.fixture(scope="module")
def calls(telephone_devset: Path) -> dict[str, np.ndarray]:
    genuine = speech(telephone_devset, "tuxpaint_ca", ENROL, 10)
    impostor = speech(telephone_devset, "tuxpaint_ro", 0, 6)
    return {"genuine": genuine, "takeover": np.concatenate([genuine, impostor]), "impostor": impostor}


def ws_url(server: RunningServer, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


async def native_call(
    server: RunningServer,
    key: str,
    call_id: str,
    audio: np.ndarray,
    agent_id: str | None = "agent-ca",
    transfer_at: float | None = None,
    transfer_to: str | None = None,
) -> tuple[list[dict], websockets.frames.Close | None]:
    """Stream a call as fast as the server takes it; returns the server's frames and its close."""
    frames: list[dict] = []
    async with connect(
        ws_url(server, "/v1/streams/native"), additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        start = {"type": "start", "call_id": call_id, "encoding": "pcm16", "sample_rate": 8000, "channels": 1}
        if agent_id:
            start["agent_id"] = agent_id
        await ws.send(json.dumps(start))
        pcm = to_pcm16(audio).tobytes()
        for offset in range(0, len(pcm), 320):  # 20 ms frames
            if transfer_at is not None and offset == int(transfer_at * 8000) * 2 // 320 * 320:
                await ws.send(json.dumps({"type": "agent", "agent_id": transfer_to}))
            await ws.send(pcm[offset : offset + 320])
        await ws.send(json.dumps({"type": "stop"}))
        try:
            async for message in ws:
                frames.append(json.loads(message))
        except websockets.ConnectionClosed:
            pass
        return frames, ws.protocol.close_rcvd


def alerts_for(server: RunningServer, key: str, call_id: str) -> list[dict]:
    """Every alert and notice of the call, read back through the SSE feed's replay (Last-Event-ID 0-0)."""
    found = []
    with (
        server.client(key) as client,
        client.stream(
            "GET", "/v1/alerts/stream", headers={"Last-Event-ID": "0-0"}, timeout=httpx.Timeout(5.0, read=3.0)
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict = {}
        try:
            for line in response.iter_lines():
                if line.startswith(("id:", "event:", "data:")):
                    name, _, value = line.partition(": ")
                    event[name.rstrip(":")] = value
                elif not line and "data" in event:
                    data = json.loads(event["data"])
                    if data.get("call_id") == call_id:
                        found.append({"id": event["id"], "event": event["event"], **data})
                    event = {}
        except httpx.ReadTimeout:
            pass  # replay done; the feed then waits for new alerts
    return found


def test_native_takeover_raises_one_alert(vpmon_server: RunningServer, enrolled: dict, calls: dict) -> None:
    frames, close = asyncio.run(
        native_call(vpmon_server, enrolled["monitor"], "native-takeover", calls["takeover"])
    )
    assert close is not None and close.code == 1000, close
    assert frames[0]["type"] == "started"
    verdicts = [f for f in frames if f["type"] == "verdict"]
    pushed = [f for f in frames if f["type"] == "alert"]
    trace = [(v["state"], v["llr"], v["media_start"], v["media_end"]) for v in verdicts]
    assert len(pushed) == 1 and pushed[0]["kind"] == "takeover", trace
    assert pushed[0]["agent_id"] == "agent-ca" and pushed[0]["tenant"] == "live"
    assert pushed[0]["impostor_since"] >= 0.9 * len(calls["genuine"]) / 8000 - 1  # after the takeover
    assert {"verified", "mismatch"} <= {v["state"] for v in verdicts}
    assert all(
        {"score", "threshold", "net_speech_seconds", "media_start", "model_id"} <= set(v) for v in verdicts
    )

    feed = alerts_for(vpmon_server, enrolled["monitor"], "native-takeover")
    assert [(a["event"], a["kind"]) for a in feed] == [("alert", "takeover")]
    with vpmon_server.client(enrolled["monitor"]) as client:
        call = next(c for c in client.get("/v1/calls").json() if c["call_id"] == "native-takeover")
    assert call["state"] == "ended" and call["alerts"] == 1 and call["agent_id"] == "agent-ca"


def test_native_genuine_call_raises_none(vpmon_server: RunningServer, enrolled: dict, calls: dict) -> None:
    frames, close = asyncio.run(
        native_call(vpmon_server, enrolled["monitor"], "native-genuine", calls["genuine"])
    )
    assert close is not None and close.code == 1000
    states = [f["state"] for f in frames if f["type"] == "verdict"]
    assert states and states[-1] == "verified" and "mismatch" not in states
    assert alerts_for(vpmon_server, enrolled["monitor"], "native-genuine") == []


def test_transfer_resets_the_evidence(
    vpmon_server: RunningServer, enrolled: dict, telephone_devset: Path
) -> None:
    """Agent A hands over to agent B through an in-band transfer: B's voice is no takeover."""
    first = speech(telephone_devset, "tuxpaint_ca", ENROL, 9)
    second = speech(telephone_devset, "tuxpaint_es", ENROL, 10)
    frames, close = asyncio.run(
        native_call(
            vpmon_server,
            enrolled["monitor"],
            "native-transfer",
            np.concatenate([first, second]),
            transfer_at=len(first) / 8000,
            transfer_to="agent-es",
        )
    )
    assert close is not None and close.code == 1000
    agents = [(f["agent_id"], f["state"]) for f in frames if f["type"] == "verdict"]
    assert ("agent-ca", "verified") in agents and ("agent-es", "verified") in agents, agents
    assert [f for f in frames if f["type"] == "alert"] == []


def twilio_messages(call_sid: str, agent: np.ndarray, customer: np.ndarray, params: dict) -> Iterator[str]:
    stream_sid = "MZ" + uuid.uuid4().hex
    yield json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    start = {
        "streamSid": stream_sid, "accountSid": "AC" + "0" * 32, "callSid": call_sid,
        "tracks": ["inbound", "outbound"], "customParameters": params,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }  # fmt: skip
    yield json.dumps({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": stream_sid})
    seq, length = 1, max(len(agent), len(customer))
    agent, customer = np.pad(agent, (0, length - len(agent))), np.pad(customer, (0, length - len(customer)))
    for chunk, offset in enumerate(range(0, length, 160), start=1):
        for track, audio in (("outbound", agent), ("inbound", customer)):
            seq += 1
            payload = base64.b64encode(encode_mulaw(audio[offset : offset + 160])).decode()
            media = {"track": track, "chunk": str(chunk), "timestamp": str(offset // 8), "payload": payload}
            yield json.dumps(
                {"event": "media", "sequenceNumber": str(seq), "media": media, "streamSid": stream_sid}
            )
    yield json.dumps({"event": "stop", "sequenceNumber": str(seq + 1), "streamSid": stream_sid,
                      "stop": {"accountSid": "AC" + "0" * 32, "callSid": call_sid}})  # fmt: skip


async def twilio_call(server: RunningServer, messages: Iterator[str], token: str = "twilio-secret-token"):
    url = ws_url(server, "/v1/streams/twilio/live")
    headers = {"X-Twilio-Signature": twilio_signature(token, url)}
    async with connect(url, additional_headers=headers) as ws:
        for message in messages:
            await ws.send(message)
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
        return ws.protocol.close_rcvd


def test_twilio_takeover_on_the_agent_track_only(
    vpmon_server: RunningServer, enrolled: dict, calls: dict
) -> None:
    # The customer's (inbound) track carries another voice all along: it must not count.
    params = {"tenant": "live", "agent_id": "agent-ca"}
    genuine = twilio_messages("CA-genuine", calls["genuine"], calls["impostor"], params)
    close = asyncio.run(twilio_call(vpmon_server, genuine))
    assert close is not None and close.code == 1000
    assert alerts_for(vpmon_server, enrolled["monitor"], "CA-genuine") == []

    takeover = twilio_messages("CA-takeover", calls["takeover"], np.zeros(8000, np.float32), params)
    asyncio.run(twilio_call(vpmon_server, takeover))
    feed = alerts_for(vpmon_server, enrolled["monitor"], "CA-takeover")
    assert [(a["kind"], a["agent_id"], a["protocol"]) for a in feed] == [("takeover", "agent-ca", "twilio")]


def test_twilio_signature_is_checked(vpmon_server: RunningServer, enrolled: dict) -> None:
    url = ws_url(vpmon_server, "/v1/streams/twilio/live")
    for headers in ({}, {"X-Twilio-Signature": twilio_signature("wrong-token", url)}):
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(connect(url, additional_headers=headers).__aenter__())
        assert refused.value.response.status_code == 403


def test_bad_input_ends_only_its_own_call(vpmon_server: RunningServer, enrolled: dict, calls: dict) -> None:
    monitor = enrolled["monitor"]

    async def bad(first: str | bytes, key: str = monitor) -> websockets.frames.Close | None:
        async with connect(
            ws_url(vpmon_server, "/v1/streams/native"), additional_headers={"Authorization": f"Bearer {key}"}
        ) as ws:
            await ws.send(first)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
            return ws.protocol.close_rcvd

    async def scenario():
        good = asyncio.create_task(native_call(vpmon_server, monitor, "native-alongside", calls["takeover"]))
        closes = await asyncio.gather(
            bad("{not json"),
            bad(b"\x00\x01" * 160),  # audio before start
            bad(
                json.dumps(
                    {"type": "start", "call_id": "x", "encoding": "opus", "sample_rate": 48000, "channels": 1}
                )
            ),
            bad(
                json.dumps(
                    {
                        "type": "start",
                        "call_id": "y",
                        "agent_id": "nobody",
                        "encoding": "pcm16",
                        "sample_rate": 8000,
                        "channels": 1,
                    }
                )
            ),
        )
        return closes, await good

    closes, (frames, good_close) = asyncio.run(scenario())
    assert [c.code for c in closes] == [1003, 1002, 1003, 4004], closes
    assert "not enrolled" in closes[3].reason
    assert good_close.code == 1000 and len([f for f in frames if f["type"] == "alert"]) == 1
    notices = alerts_for(vpmon_server, monitor, "y")
    assert [(n["event"], n["kind"]) for n in notices] == [("notice", "agent_not_enrolled")]

    for key in (None, "vpk_wrong", vpmon_server.key("live", Role.READ)):  # no key, bad key, wrong role
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(
                connect(ws_url(vpmon_server, "/v1/streams/native"), additional_headers=headers).__aenter__()
            )
        assert refused.value.response.status_code == 401


def test_a_bad_frame_mid_call_ends_it_after_the_audio_before_it(
    vpmon_server: RunningServer, enrolled: dict, calls: dict
) -> None:
    """A live call's audio frames are taken as they arrive (streamer/ws_protocol.py); a bad frame among
    them still closes the call the protocol's way, and the audio before it is scored."""
    monitor = enrolled["monitor"]

    async def scenario() -> websockets.frames.Close | None:
        headers = {"Authorization": f"Bearer {monitor}"}
        async with connect(ws_url(vpmon_server, "/v1/streams/native"), additional_headers=headers) as ws:
            start = {"type": "start", "call_id": "native-bad-frame", "agent_id": "agent-ca"}
            await ws.send(json.dumps({**start, "encoding": "pcm16", "sample_rate": 8000, "channels": 1}))
            pcm = to_pcm16(calls["genuine"]).tobytes()
            for offset in range(0, len(pcm), 320):
                await ws.send(pcm[offset : offset + 320])
            await ws.send(b"\x00\x01\x02")  # 3 bytes: not a whole number of 16-bit samples
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
            return ws.protocol.close_rcvd

    close = asyncio.run(scenario())
    assert close is not None and close.code == 1003 and "whole number" in close.reason, close

    def listed() -> dict:
        with vpmon_server.client(monitor) as client:
            return {call["call_id"]: call for call in client.get("/v1/calls").json()}["native-bad-frame"]

    wait_for(lambda: listed()["state"] == "ended", "the call to end (after the verdicts of its windows)")
    assert listed()["net_speech_seconds"] >= 3.0, listed()  # windows of the audio before the bad frame


def test_agent_bound_through_the_api_before_the_stream(
    vpmon_server: RunningServer, enrolled: dict, calls: dict
) -> None:
    with vpmon_server.client(enrolled["monitor"]) as client:
        bound = client.put("/v1/calls/bound-early/agent", json={"agent_id": "agent-ca"})
        assert bound.status_code == 200 and bound.json()["live"] is False
        missing = client.put("/v1/calls/bound-early/agent", json={"agent_id": "nobody"})
        assert missing.status_code == 404
    frames, close = asyncio.run(
        native_call(vpmon_server, enrolled["monitor"], "bound-early", calls["takeover"], agent_id=None)
    )
    assert close.code == 1000
    assert [f["agent_id"] for f in frames if f["type"] == "alert"] == ["agent-ca"]


def test_unbound_call_buffers_then_binds_mid_call(
    vpmon_server: RunningServer, enrolled: dict, calls: dict
) -> None:
    async def scenario() -> list[dict]:
        frames: list[dict] = []
        url = ws_url(vpmon_server, "/v1/streams/native")
        async with connect(url, additional_headers={"Authorization": f"Bearer {enrolled['monitor']}"}) as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": "start",
                        "call_id": "bound-late",
                        "encoding": "pcm16",
                        "sample_rate": 8000,
                        "channels": 1,
                    }
                )
            )
            pcm = to_pcm16(calls["genuine"]).tobytes()
            half = len(pcm) // 2 // 320 * 320
            for offset in range(0, half, 320):
                await ws.send(pcm[offset : offset + 320])
            await asyncio.sleep(1.0)  # let the windows heard so far reach the server's verdicts
            async with httpx.AsyncClient(
                base_url=vpmon_server.url, headers={"Authorization": f"Bearer {enrolled['monitor']}"}
            ) as http:
                bound = await http.put("/v1/calls/bound-late/agent", json={"agent_id": "agent-ca"})
                assert bound.json()["live"] is True
            for offset in range(half, len(pcm), 320):
                await ws.send(pcm[offset : offset + 320])
            await ws.send(json.dumps({"type": "stop"}))
            async for message in ws:
                frames.append(json.loads(message))
        return frames

    frames = asyncio.run(scenario())
    states = [f["state"] for f in frames if f["type"] == "verdict"]
    assert states[0] == "agent_unknown" and states[-1] == "verified"


def test_audiohook_stereo_with_the_agent_bound_through_the_api(
    vpmon_server: RunningServer, enrolled: dict, calls: dict, telephone_devset: Path
) -> None:
    """Genesys AudioHook: stereo PCMU, the agent on the internal channel, the customer (another voice)
    on the external one; AudioHook names no agent, so the client binds it through the API first."""
    customer = speech(telephone_devset, "tuxpaint_es", ENROL, 10)

    def stereo(agent: np.ndarray) -> CallAudio:
        length = max(len(agent), len(customer))
        pair = np.stack(
            [np.pad(customer, (0, length - len(customer))), np.pad(agent, (0, length - len(agent)))], 1
        )
        return CallAudio.from_samples(pair, 8000, "call")

    def options(call_id: str) -> StreamOptions:
        return StreamOptions(
            "audiohook", vpmon_server.url, key=enrolled["monitor"], agent_id="agent-ca", call_id=call_id,
            agent_channel=1, speed=0,
        )  # fmt: skip

    genuine_id, takeover_id = str(uuid.uuid4()), str(uuid.uuid4())
    genuine = asyncio.run(stream_call(stereo(calls["genuine"]), options(genuine_id)))
    assert genuine.ok and genuine.close_code == 1000, genuine
    takeover = asyncio.run(stream_call(stereo(calls["takeover"]), options(takeover_id)))
    assert takeover.ok and takeover.close_code == 1000, takeover

    assert alerts_for(vpmon_server, enrolled["monitor"], genuine_id) == []
    feed = alerts_for(vpmon_server, enrolled["monitor"], takeover_id)
    assert [(a["kind"], a["agent_id"], a["protocol"]) for a in feed] == [
        ("takeover", "agent-ca", "audiohook")
    ]
    with vpmon_server.client(enrolled["monitor"]) as client:
        states = {c["call_id"]: c for c in client.get("/v1/calls").json()}
    assert states[genuine_id]["state"] == "ended" and states[genuine_id]["alerts"] == 0
    assert states[genuine_id]["net_speech_seconds"] > 10  # the agent's channel was heard, not silence


def test_audiohook_wrong_key_is_a_disconnect(vpmon_server: RunningServer, calls: dict) -> None:
    options = StreamOptions("audiohook", vpmon_server.url, key="vpk_wrong", speed=0)
    result = asyncio.run(stream_call(CallAudio.from_samples(calls["genuine"][:8000], 8000), options))
    assert not result.ok and "unauthorized" in (result.error or "")


def test_audiohook_signed_upgrades_and_replays(
    vpmon_server: RunningServer, enrolled: dict, calls: dict
) -> None:
    """With a client secret on the tenant, the upgrade must carry a valid HTTP message signature, once."""
    secret = base64.b64encode(b"audiohook client secret of 32 b!").decode()
    admin = vpmon_server.client(enrolled["admin"])
    assert admin.patch("/v1/tenant", json={"audiohook_client_secret": secret}).json()[
        "audiohook_client_secret_set"
    ]
    audio = CallAudio.from_samples(calls["genuine"][: 8000 * 3], 8000)
    try:

        def run(client_secret: str | None) -> StreamResult:
            options = StreamOptions(
                "audiohook", vpmon_server.url, key=enrolled["monitor"], audiohook_client_secret=client_secret,
                speed=0,
            )  # fmt: skip
            return asyncio.run(stream_call(audio, options))

        assert run(secret).ok
        for wrong in (None, base64.b64encode(b"another secret, 32 bytes long!!!").decode()):
            result = run(wrong)
            assert not result.ok and "unauthorized" in (result.error or ""), result

        # The same signed request twice: the second is a replay.
        url = stream_url(vpmon_server.url, "audiohook")
        session, organization = str(uuid.uuid4()), str(uuid.uuid4())
        base = {
            "Audiohook-Organization-Id": organization, "Audiohook-Session-Id": session,
            "Audiohook-Correlation-Id": str(uuid.uuid4()), "X-API-KEY": enrolled["monitor"],
        }  # fmt: skip
        signed = base | audiohook_signature_headers(url, base, enrolled["monitor"], secret, int(time.time()))
        opening = {
            "version": "2", "id": session, "type": "open", "seq": 1, "serverseq": 0, "position": "PT0S",
            "parameters": {
                "organizationId": organization, "conversationId": str(uuid.uuid4()),
                "participant": {"id": str(uuid.uuid4()), "ani": "", "aniName": "", "dnis": ""},
                "media": [{"type": "audio", "format": "PCMU", "channels": ["external", "internal"],
                           "rate": 8000}],
            },
        }  # fmt: skip

        async def first_reply() -> dict:
            async with connect(url, additional_headers=signed) as ws:
                await ws.send(json.dumps(opening))
                return json.loads(await ws.recv())

        assert asyncio.run(first_reply())["type"] == "opened"
        replayed = asyncio.run(first_reply())
        assert (replayed["type"], replayed["parameters"]["reason"]) == ("disconnect", "unauthorized")
    finally:
        admin.patch("/v1/tenant", json={"audiohook_client_secret": ""})
        admin.close()
