"""The stream client (``vpmon stream``): its messages fed to the server-side protocol adapters, its pacing,
its signatures, and its asyncio layer and CLI against a small in-process websocket server that runs the
same adapters (no vpmon server, Redis or model needed)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from streamer.cli_stream import stream_app
from streamer.protocols.events import AudioChunk, CallEnded, CallStarted, ProtocolViolation
from streamer.stream_client import (
    MULAW_SILENCE,
    Accepted,
    AudioHookClient,
    CallAudio,
    Closed,
    NativeClient,
    Pacer,
    Pushed,
    Refused,
    StreamError,
    StreamOptions,
    TwilioClient,
    api_url,
    audiohook_signature_headers,
    iso_duration,
    load_call_audio,
    stream_call,
    stream_url,
    transcript,
    twilio_signature,
    wait_until_due,
)
from tests.redis_fixtures import free_port
from verifier.audio import encode_mulaw, resample


def adapter_module(name: str) -> ModuleType:
    """A server-side adapter module; skipped (saying why) only while that module is not in the tree."""
    try:
        return importlib.import_module(f"streamer.protocols.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"streamer.protocols.{name}":
            raise
        pytest.skip(
            f"streamer/protocols/{name}.py is not written yet: nothing to feed the client's messages to"
        )
        raise AssertionError("unreachable") from None


def noise(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> CallAudio:
    rng = np.random.default_rng(seed)
    samples = (0.2 * rng.standard_normal((round(seconds * rate), channels))).clip(-1, 1)
    return CallAudio.from_samples(samples.astype(np.float32), rate)


def pipe(client: Any, server: Any) -> None:
    """Move what each side queued to the other until both are quiet."""
    while True:
        outgoing, replies = client.data_to_send(), server.data_to_send()
        if not outgoing and not replies:
            return
        for data in outgoing:
            (server.receive_text if isinstance(data, str) else server.receive_bytes)(data)
        for data in replies:
            (client.receive_text if isinstance(data, str) else client.receive_bytes)(data)


def converse(client: Any, server: Any) -> list[Any]:
    """A whole call between a client session and a server adapter, with no sockets; the server's events."""
    client.connect()
    pipe(client, server)
    for index in range(client.frame_count):
        if not client.sending:
            break
        client.send_frame(index)
        pipe(client, server)
    client.end()
    pipe(client, server)
    return server.events_received()


def audio_bytes(events: list[Any], is_agent: bool | None = None) -> bytes:
    return b"".join(e.payload for e in events if isinstance(e, AudioChunk) and is_agent in (None, e.is_agent))


def assert_clean(events: list[Any]) -> CallStarted:
    assert not [e for e in events if isinstance(e, ProtocolViolation)], events
    started = [e for e in events if isinstance(e, CallStarted)]
    assert len(started) == 1 and isinstance(events[0], CallStarted)
    assert [e for e in events if isinstance(e, CallEnded)] == [events[-1]]
    return started[0]


# -------------------------------------------------------------------------------------------- Twilio


def test_twilio_messages_are_accepted_by_the_twilio_adapter() -> None:
    twilio = adapter_module("twilio")
    audio = noise(1.234, 16000)
    client = TwilioClient(audio, tenant="acme", agent_id="agent-7")
    server = twilio.TwilioMediaStream(agent_track="outbound")
    messages = transcript(client)
    for message in messages:
        server.receive_text(message.data)
    events = server.events_received()

    started = assert_clean(events)
    assert (started.call_id, started.tenant, started.agent_id) == (client.call_id, "acme", "agent-7")
    assert (started.encoding, started.sample_rate, started.channels) == ("mulaw", 8000, 1)
    assert started.metadata["streamSid"] == client.stream_sid and client.stream_sid.startswith("MZ")
    assert client.call_id.startswith("CA") and len(client.call_id) == 34
    assert events[-1].reason == "stop" and server.close_requested.code == 1000

    # 20 ms of 8 kHz μ-law per message, the last one padded with silence as Twilio sends whole frames
    agent = audio_bytes(events, is_agent=True)
    encoded = encode_mulaw(resample(audio.channels[0], 16000, 8000))
    assert len(agent) == math.ceil(len(encoded) / 160) * 160 == client.frame_count * 160
    assert agent[: len(encoded)] == encoded and set(agent[len(encoded) :]) <= {MULAW_SILENCE}
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert all(len(c.payload) == 160 for c in chunks)
    assert [c.media_time for c in chunks[:3]] == [0.0, 0.02, 0.04]

    # the messages as Twilio writes them
    first, start, media = (json.loads(m.data) for m in messages[:3])
    assert first == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["sequenceNumber"] == "1" and start["start"]["tracks"] == ["outbound"]
    assert start["start"]["customParameters"] == {"tenant": "acme", "agent_id": "agent-7"}
    assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert media["sequenceNumber"] == "2" and media["media"]["chunk"] == "1"
    assert media["media"]["timestamp"] == "0" and media["media"]["track"] == "outbound"
    stop = json.loads(messages[-1].data)
    assert stop["event"] == "stop" and stop["stop"] == {
        "accountSid": client.account_sid,
        "callSid": client.call_id,
    }
    assert [m.media_time for m in messages[2:4]] == pytest.approx([0.02, 0.04])


@pytest.mark.parametrize("agent_track", ["outbound", "inbound"])
def test_twilio_stereo_sends_both_tracks_with_the_agent_on_its_track(agent_track: str) -> None:
    twilio = adapter_module("twilio")
    audio = noise(0.5, 8000, channels=2)
    client = TwilioClient(audio, agent_channel=1, agent_track=agent_track, call_sid="CA" + "1" * 32)  # type: ignore[arg-type]
    server = twilio.TwilioMediaStream(agent_track=agent_track)
    for message in transcript(client):
        server.receive_text(message.data)
    events = server.events_received()
    started = assert_clean(events)
    assert started.call_id == "CA" + "1" * 32 and started.metadata["tracks"] == "inbound,outbound"
    agent, other = audio_bytes(events, is_agent=True), audio_bytes(events, is_agent=False)
    assert agent == encode_mulaw(audio.channels[1]) and other == encode_mulaw(audio.channels[0])


# -------------------------------------------------------------------------------------------- native


@pytest.mark.parametrize(
    ("rate", "channels", "agent_channel", "sent_rate"),
    [(16000, 1, None, 16000), (8000, 2, 1, 8000), (44100, 2, None, 16000)],
)
def test_native_messages_are_accepted_by_the_native_adapter(
    rate: int, channels: int, agent_channel: int | None, sent_rate: int
) -> None:
    native = adapter_module("native")
    audio = noise(0.77, rate, channels)
    client = NativeClient(
        audio, agent_channel=agent_channel, tenant="acme", agent_id="agent-7", call_id="call-1"
    )
    server = native.NativeStream()
    events = converse(client, server)
    started = assert_clean(events)
    assert (started.call_id, started.tenant, started.agent_id) == ("call-1", "acme", "agent-7")
    assert (started.encoding, started.sample_rate, started.channels) == ("pcm16", sent_rate, channels)
    assert started.agent_channel == (None if channels == 1 else (agent_channel or 0))
    assert isinstance(client.events_received()[0], Accepted)
    expected_samples = len(audio.resampled(sent_rate).channels[0])
    assert len(audio_bytes(events)) == expected_samples * 2 * channels
    assert client.frame_count == math.ceil(expected_samples / (sent_rate // 50))
    assert events[-1].reason == "stop" and server.close_requested.code == 1000 and client.expects_close


def test_native_client_reports_pushed_verdicts_and_a_server_error() -> None:
    native = adapter_module("native")
    client = NativeClient(noise(0.2, 16000))
    server = native.NativeStream()
    client.connect()
    pipe(client, server)
    client.send_frame(0)
    server.send_verdict({"state": "verified", "score": 0.71})
    server.send_alert({"kind": "takeover", "score": 0.12})
    pipe(client, server)
    server.fail(4004, "agent agent-7 is not enrolled in tenant acme")
    pipe(client, server)
    events = client.events_received()
    assert isinstance(events[0], Accepted)
    assert events[1] == Pushed("verdict", {"type": "verdict", "state": "verified", "score": 0.71})
    assert events[2] == Pushed("alert", {"type": "alert", "kind": "takeover", "score": 0.12})
    assert (
        isinstance(events[3], Refused) and "not enrolled" in events[3].reason and "4004" in events[3].reason
    )
    assert not client.sending and client.expects_close  # the server closes after its error frame
    client.end()
    assert client.data_to_send() == []  # no stop after the server ended the call


# -------------------------------------------------------------------------------------------- AudioHook


def audiohook_pair(
    audio: CallAudio, auth_error: str | None = None, **kwargs: Any
) -> tuple[Any, Any, list[float]]:
    audiohook = adapter_module("audiohook")
    now = [0.0]
    client = AudioHookClient(audio, clock=lambda: now[0], **kwargs)
    server = audiohook.AudioHookSession(client.session_id, auth_error, organization_id=client.organization_id)
    return client, server, now


@pytest.mark.parametrize("channels", [1, 2])
def test_audiohook_session_is_accepted_by_the_audiohook_adapter(channels: int) -> None:
    audio = noise(11.05, 16000, channels)
    client, server, _ = audiohook_pair(audio)
    events = converse(client, server)
    started = assert_clean(events)
    assert started.call_id == client.call_id and started.metadata["sessionId"] == client.session_id
    assert (started.encoding, started.sample_rate, started.channels, started.agent_channel) == (
        "mulaw",
        8000,
        2,
        1,
    )
    assert events[-1].reason == "end" and server.close_requested.code == 1000
    assert client.closed and isinstance(client.events_received()[-1], Closed)

    # 100 ms stereo frames, [external, internal]; the agent (a mono file, or channel 1 by default) is internal
    phone = audio.resampled(8000)
    stereo = np.frombuffer(audio_bytes(events), np.uint8).reshape(-1, 2)
    assert len(stereo) == phone.samples and client.frames_sent == math.ceil(phone.samples / 800)
    assert stereo[:, 1].tobytes() == encode_mulaw(phone.channels[-1])
    external = encode_mulaw(phone.channels[0]) if channels == 2 else bytes([MULAW_SILENCE]) * phone.samples
    assert stereo[:, 0].tobytes() == external
    assert [len(e.payload) for e in events if isinstance(e, AudioChunk)][:2] == [1600, 1600]
    assert client.pongs == 2  # pings at 5 s and 10 s of media, both answered
    assert server.position == pytest.approx(phone.duration, abs=1e-6)


def test_audiohook_messages_follow_the_envelope() -> None:
    client, server, now = audiohook_pair(
        noise(5.2, 8000), language="en-US", conversation_id="0" * 8 + "-1111-2222-3333-" + "4" * 12
    )
    client.connect()
    (open_text,) = client.data_to_send()
    opened = json.loads(open_text)
    assert {k: opened[k] for k in ("version", "type", "seq", "serverseq", "position")} == {
        "version": "2", "type": "open", "seq": 1, "serverseq": 0, "position": "PT0S",
    }  # fmt: skip
    assert opened["id"] == client.session_id
    params = opened["parameters"]
    assert params["conversationId"] == client.call_id and params["language"] == "en-US"
    assert params["media"] == [
        {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000},
        {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000},
    ]
    assert set(params["participant"]) == {"id", "ani", "aniName", "dnis"}
    server.receive_text(open_text)
    pipe(client, server)
    for index in range(50):
        client.send_frame(index)
    now[0] = 0.25
    client.send_frame(50)  # 5.0 s of media sent: time to ping
    ping = json.loads(next(d for d in client.data_to_send() if isinstance(d, str)))
    assert (ping["type"], ping["seq"], ping["serverseq"], ping["position"], ping["parameters"]) == (
        "ping", 2, 1, "PT5S", {},
    )  # fmt: skip
    server.receive_text(json.dumps(ping))
    now[0] = 0.26
    pipe(client, server)
    assert client.pongs == 1 and client._rtt == pytest.approx(0.01)
    client.end()
    (close,) = client.data_to_send()
    close = json.loads(close)
    assert close["parameters"] == {"reason": "end"} and close["position"] == "PT5.1S"  # 51 frames sent


def test_audiohook_unauthorized_is_a_refusal_with_a_clean_close() -> None:
    client, server, _ = audiohook_pair(
        noise(1.0, 8000), auth_error="the X-API-KEY is not a valid vpmon monitor key"
    )
    events = converse(client, server)
    assert not [e for e in events if isinstance(e, CallStarted | ProtocolViolation)]
    seen = client.events_received()
    assert isinstance(seen[0], Refused) and "unauthorized" in seen[0].reason and "X-API-KEY" in seen[0].reason
    assert isinstance(seen[-1], Closed) and client.frames_sent == 0
    assert server.close_requested.code == 4001


def test_audiohook_client_answers_pause_resume_and_server_errors() -> None:
    client = AudioHookClient(noise(1.0, 8000), clock=lambda: 0.0)
    client.connect()
    client.data_to_send()
    sid = client.session_id

    def server_says(seq: int, kind: str, parameters: dict[str, Any] | None = None) -> None:
        message = {
            "version": "2",
            "id": sid,
            "type": kind,
            "seq": seq,
            "clientseq": 1,
            "parameters": parameters or {},
        }
        client.receive_text(json.dumps(message))

    media = [{"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}]
    server_says(1, "opened", {"media": media, "startPaused": False})
    client.send_frame(0)
    assert client.data_to_send() == [bytes([MULAW_SILENCE]) * 800]  # external only: the mono file's silence
    server_says(2, "pause")
    client.send_frame(1)
    client.send_frame(2)
    paused = client.data_to_send()
    assert [json.loads(m)["type"] for m in paused] == ["paused"]  # and no audio while paused
    server_says(3, "resume")
    (resumed,) = client.data_to_send()
    assert json.loads(resumed)["parameters"] == {"start": "PT0.1S", "discarded": "PT0.2S"}
    assert json.loads(resumed)["position"] == "PT0.3S" and json.loads(resumed)["serverseq"] == 3
    server_says(5, "pong")  # seq 4 is missing
    error, close = (json.loads(m) for m in client.data_to_send())
    assert error["type"] == "error" and error["parameters"]["code"] == 400
    assert close["type"] == "close" and close["parameters"] == {"reason": "error"}
    assert isinstance(client.events_received()[-1], Refused) and not client.sending


def test_audiohook_client_honours_discard_to_and_start_paused() -> None:
    client = AudioHookClient(noise(1.0, 8000), clock=lambda: 0.0)
    client.connect()
    client.data_to_send()
    opened = {"media": [client.offered[0]], "discardTo": "PT0.25S", "startPaused": False}
    message = {"version": "2", "id": client.session_id, "type": "opened", "seq": 1, "clientseq": 1}
    client.receive_text(json.dumps({**message, "parameters": opened}))
    for index in range(4):
        client.send_frame(index)
    sent = client.data_to_send()
    discarded = json.loads(sent[0])  # frames ending at 0.1 and 0.2 s skipped; the one ending at 0.3 s sent
    assert discarded["type"] == "discarded" and discarded["position"] == "PT0.2S"
    assert discarded["parameters"] == {"start": "PT0S", "discarded": "PT0.2S"}
    assert [len(frame) for frame in sent[1:]] == [1600, 1600] and client.frames_sent == 2

    paused = AudioHookClient(noise(1.0, 8000), clock=lambda: 0.0)
    paused.connect()
    paused.data_to_send()
    opened = {"media": [paused.offered[0]], "startPaused": True}
    paused.receive_text(json.dumps({**message, "id": paused.session_id, "parameters": opened}))
    paused.send_frame(0)
    assert [json.loads(m)["type"] for m in paused.data_to_send()] == ["paused"]


def test_audiohook_conversation_id_must_be_a_uuid() -> None:
    with pytest.raises(StreamError, match="UUID"):
        AudioHookClient(noise(0.1, 8000), conversation_id="call-1")


# -------------------------------------------------------------------------------------------- signatures


def test_twilio_signature_matches_the_server_and_an_independent_hmac() -> None:
    url = "wss://vpmon.example.com/v1/streams/twilio/acme"
    expected = base64.b64encode(hmac.new(b"12345", url.encode(), hashlib.sha1).digest()).decode()
    assert twilio_signature("12345", url) == expected
    twilio = adapter_module("twilio")
    assert twilio.twilio_signature("12345", url) == expected
    assert twilio.validate_twilio_signature("12345", url, twilio_signature("12345", url))
    assert not twilio.validate_twilio_signature("12345", url, twilio_signature("54321", url))


def test_audiohook_signature_is_accepted_by_the_server_check() -> None:
    audiohook = adapter_module("audiohook")
    secret = base64.b64encode(b"a client secret of enough bytes!").decode()
    url = "wss://vpmon.example.com:443/v1/streams/audiohook"
    client = AudioHookClient(noise(0.1, 8000))
    headers = client.headers("vpk_key")
    now = int(time.time())
    headers |= audiohook_signature_headers(url, headers, "vpk_key", secret, now)
    check = audiohook.verify_message_signature
    assert check("GET", "vpmon.example.com", "/v1/streams/audiohook", headers, secret, now) is None
    assert check("GET", "vpmon.example.com", "/v1/streams/other", headers, secret, now) is not None
    assert check("GET", "vpmon.example.com", "/v1/streams/audiohook", headers, "c2VjcmV0", now) is not None


# -------------------------------------------------------------------------------------------- pacing, URLs


def test_pacer_deadlines_follow_the_media_clock() -> None:
    assert Pacer(10.0, 1.0).deadline(2.5) == 12.5
    assert Pacer(10.0, 4.0).deadline(2.0) == 10.5
    assert Pacer(10.0, 0.0).delay(99.0, now=10.0) == 0.0
    assert Pacer(10.0, 1.0).delay(0.02, now=10.05) == 0.0  # late: send at once, do not wait


@pytest.mark.parametrize("speed", [1.0, 4.0])
def test_pacing_does_not_accumulate_drift(speed: float) -> None:
    """Every sleep wakes 3 ms late; each message is then 3 ms late, never 3 ms times its index."""
    now = [100.0]
    sent: list[float] = []

    async def late_sleep(seconds: float) -> None:
        now[0] += seconds + 0.003

    async def run() -> None:
        pacer = Pacer(now[0], speed)
        for index in range(500):
            await wait_until_due(pacer, (index + 1) * 0.02, lambda: now[0], late_sleep)
            sent.append(now[0] - 100.0)

    asyncio.run(run())
    lateness = [t - (i + 1) * 0.02 / speed for i, t in enumerate(sent)]
    assert max(lateness) <= 0.003 + 1e-9 and min(lateness) >= 0
    assert sent[-1] == pytest.approx(10.0 / speed + 0.003)


def test_speed_zero_still_yields_to_the_event_loop() -> None:
    calls: list[float] = []

    async def sleep(seconds: float) -> None:
        calls.append(seconds)

    asyncio.run(wait_until_due(Pacer(0.0, 0.0), 30.0, lambda: 0.0, sleep))
    assert calls == [0.0]


def test_stream_urls() -> None:
    assert stream_url("http://127.0.0.1:8080", "native") == "ws://127.0.0.1:8080/v1/streams/native"
    assert stream_url("https://vp.example.com/", "audiohook") == "wss://vp.example.com/v1/streams/audiohook"
    assert stream_url("https://vp.example.com/prefix", "twilio", "acme") == (
        "wss://vp.example.com/prefix/v1/streams/twilio/acme"
    )
    assert (
        stream_url("wss://vp.example.com/v1/streams/native", "native")
        == "wss://vp.example.com/v1/streams/native"
    )
    assert api_url("wss://vp.example.com/p/v1/streams/native") == "https://vp.example.com/p"
    with pytest.raises(StreamError, match="--tenant"):
        stream_url("http://h:1", "twilio")
    with pytest.raises(StreamError, match="http"):
        stream_url("ftp://h:1", "native")
    assert (
        iso_duration(0) == "PT0S"
        and iso_duration(5.2) == "PT5.2S"
        and iso_duration(0.000125) == "PT0.000125S"
    )


def test_options_and_audio_checks(tmp_path: Path) -> None:
    with pytest.raises(StreamError, match="speed"):
        StreamOptions("native", "http://h:1", speed=-1)
    with pytest.raises(StreamError, match="agent-channel 2"):
        NativeClient(noise(0.1, 8000, channels=2), agent_channel=2)
    stereo = tmp_path / "call.wav"
    sf.write(stereo, np.zeros((800, 2)), 8000, subtype="PCM_16")
    audio = load_call_audio(stereo)
    assert (audio.channel_count, audio.sample_rate, audio.samples) == (2, 8000, 800)
    wide = tmp_path / "wide.wav"
    sf.write(wide, np.zeros((800, 3)), 8000, subtype="PCM_16")
    with pytest.raises(Exception, match="3 channels"):
        load_call_audio(wide)


@pytest.mark.devset
def test_a_dev_set_recording_streams_through_every_adapter(telephone_devset: Path) -> None:
    path = sorted((telephone_devset / "wav").glob("*/01.wav"))[0]
    audio = load_call_audio(path)
    twilio, native = adapter_module("twilio"), adapter_module("native")
    server = twilio.TwilioMediaStream()
    for message in transcript(TwilioClient(audio, tenant="acme")):
        server.receive_text(message.data)
    events = server.events_received()
    assert_clean(events)
    assert len(audio_bytes(events)) == math.ceil(audio.samples / 160) * 160  # already 8 kHz
    events = converse(NativeClient(audio), native.NativeStream())
    assert assert_clean(events).sample_rate == 8000 and len(audio_bytes(events)) == audio.samples * 2
    client, server, _ = audiohook_pair(audio)
    events = converse(client, server)
    assert assert_clean(events).agent_channel == 1 and len(audio_bytes(events)) == audio.samples * 2


# -------------------------------------------------------------------------------------------- over a socket

KEY = "vpk_test"
TWILIO_TOKEN = "twilio-auth-token"


@dataclass
class ServedCall:
    path: str
    events: list[Any] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> ServedCall:
        assert self.done.wait(10), "the test server never finished the call"
        return self


class MiniGateway:
    """The protocol adapters behind a real websocket server, as the gateway runs them, minus the pipeline:
    a verdict every ``verdict_every`` audio chunks (native), and ``fail_after`` chunks a 4004 failure."""

    def __init__(self) -> None:
        self.calls: list[ServedCall] = []
        self.port = 0
        self.verdict_every = 25
        self.fail_after: int | None = None
        self.fail_code = 4004
        self.closing: set[asyncio.Task[None]] = set()  # close handshakes under way (referenced, not lost)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def process_request(self, connection: Any, request: Any) -> Any:
        path, headers = request.path, request.headers
        if path == "/v1/streams/native" and headers.get("Authorization") != f"Bearer {KEY}":
            return connection.respond(401, json.dumps({"detail": "send a monitor API key"}))
        if path.startswith("/v1/streams/twilio/"):
            twilio = importlib.import_module("streamer.protocols.twilio")
            url = f"ws://{headers['Host']}{path}"
            if not twilio.validate_twilio_signature(TWILIO_TOKEN, url, headers.get("X-Twilio-Signature", "")):
                return connection.respond(403, json.dumps({"detail": "X-Twilio-Signature is wrong"}))
        if path == "/v1/streams/audiohook":
            missing = importlib.import_module("streamer.protocols.audiohook").required_headers_missing(
                headers
            )
            if missing:
                return connection.respond(400, json.dumps({"detail": f"missing {missing}"}))
        return None

    def adapter(self, request: Any) -> Any:
        path = request.path
        if path == "/v1/streams/native":
            return importlib.import_module("streamer.protocols.native").NativeStream()
        if path.startswith("/v1/streams/twilio/"):
            return importlib.import_module("streamer.protocols.twilio").TwilioMediaStream()
        audiohook = importlib.import_module("streamer.protocols.audiohook")
        auth = None if request.headers.get("X-API-KEY") == KEY else "the X-API-KEY is not a valid monitor key"
        return audiohook.AudioHookSession(request.headers["Audiohook-Session-Id"], auth)

    async def handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        call = ServedCall(ws.request.path)
        self.calls.append(call)
        adapter = self.adapter(ws.request)
        chunks, closing = 0, False
        try:
            async for message in ws:
                if closing:
                    continue  # keep reading until the client's close frame, as a server must
                (adapter.receive_text if isinstance(message, str) else adapter.receive_bytes)(message)
                for event in adapter.events_received():
                    call.events.append(event)
                    if isinstance(event, AudioChunk):
                        chunks += 1
                        if chunks % self.verdict_every == 0:
                            adapter.send_verdict({"state": "verified", "score": 0.7, "threshold": 0.4})
                        if chunks == self.fail_after:
                            adapter.fail(self.fail_code, "agent agent-7 is not enrolled in tenant acme")
                for data in adapter.data_to_send():
                    await ws.send(data)
                if adapter.close_requested is not None:
                    closing = True
                    close = adapter.close_requested
                    self.closing.add(asyncio.create_task(ws.close(close.code, close.reason)))
        except ConnectionClosed:
            adapter.connection_lost()
        call.events += adapter.events_received()
        call.done.set()


@pytest.fixture
def gateway() -> Iterator[MiniGateway]:
    for name in ("twilio", "native", "audiohook"):
        adapter_module(name)
    from websockets.asyncio.server import serve

    gw = MiniGateway()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        async with serve(gw.handler, "127.0.0.1", 0, process_request=gw.process_request) as server:
            gw.port = server.sockets[0].getsockname()[1]
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield gw
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


def test_native_call_over_a_socket(gateway: MiniGateway) -> None:
    audio = noise(1.5, 16000)
    seen: list[Any] = []
    options = StreamOptions("native", gateway.url, key=KEY, agent_id="agent-7", speed=0)
    result = asyncio.run(stream_call(audio, options, on_event=seen.append))
    assert result.ok, result.error
    assert (result.close_code, result.close_reason, result.accepted) == (1000, "call stopped", True)
    assert result.frames_sent == 75 and result.media_seconds == pytest.approx(1.5)
    assert len(result.verdicts) == 3 and result.verdicts[0]["score"] == 0.7  # pushed while sending
    assert [type(e) for e in seen] == [Accepted, Pushed, Pushed, Pushed]
    events = gateway.calls[0].wait().events
    assert assert_clean(events).agent_id == "agent-7" and len(audio_bytes(events)) == audio.samples * 2


def test_paced_call_takes_media_time_over_speed(gateway: MiniGateway) -> None:
    options = StreamOptions("native", gateway.url, key=KEY, speed=4)
    result = asyncio.run(stream_call(noise(1.0, 8000), options))
    assert result.ok and 0.25 <= result.elapsed_seconds < 0.95  # 1 s of audio at 4x


def test_twilio_and_audiohook_calls_over_a_socket(gateway: MiniGateway) -> None:
    options = StreamOptions(
        "twilio", gateway.url, tenant="acme", agent_id="agent-7", twilio_auth_token=TWILIO_TOKEN, speed=0
    )
    result = asyncio.run(stream_call(noise(0.5, 8000), options))
    assert result.ok and (result.close_code, result.frames_sent) == (1000, 25)
    assert assert_clean(gateway.calls[0].wait().events).tenant == "acme"

    options = StreamOptions("audiohook", gateway.url, key=KEY, speed=0)
    result = asyncio.run(stream_call(noise(6.0, 8000, channels=2), options))
    assert result.ok and (result.close_code, result.frames_sent) == (1000, 60)
    events = gateway.calls[1].wait().events
    assert assert_clean(events).agent_channel == 1 and len(audio_bytes(events)) == 2 * 48000


def test_refusals_over_a_socket(gateway: MiniGateway) -> None:
    audio = noise(1.0, 8000)
    with pytest.raises(StreamError, match=r"HTTP 401: send a monitor API key; check --key"):
        asyncio.run(stream_call(audio, StreamOptions("native", gateway.url, key="wrong", speed=0)))
    options = StreamOptions("twilio", gateway.url, tenant="acme", twilio_auth_token="not-it", speed=0)
    with pytest.raises(StreamError, match=r"HTTP 403.*--twilio-auth-token"):
        asyncio.run(stream_call(audio, options))
    result = asyncio.run(stream_call(audio, StreamOptions("audiohook", gateway.url, key="wrong", speed=0)))
    assert not result.ok and "unauthorized" in result.error and result.close_code == 4001
    gateway.fail_after = 10  # 0.2 s into the call, which takes 0.5 s at speed 2: sending stops early
    result = asyncio.run(stream_call(audio, StreamOptions("native", gateway.url, key=KEY, speed=2)))
    assert "not enrolled" in result.error and result.close_code == 4004 and result.frames_sent < 50
    gateway.fail_code = 1000  # a normal close, but before the end of the audio (Twilio: no error frame)
    options = StreamOptions("twilio", gateway.url, tenant="acme", twilio_auth_token=TWILIO_TOKEN, speed=2)
    result = asyncio.run(stream_call(audio, options))
    assert result.close_code == 1000 and "before its end" in result.error and result.media_seconds < 1
    with pytest.raises(StreamError, match="cannot connect"):
        asyncio.run(stream_call(audio, StreamOptions("native", f"http://127.0.0.1:{free_port()}", key=KEY)))


def test_cli_streams_a_file_and_exits_by_outcome(gateway: MiniGateway, tmp_path: Path) -> None:
    path = tmp_path / "call.wav"
    sf.write(path, 0.2 * np.random.default_rng(1).standard_normal((16000, 2)), 16000, subtype="PCM_16")
    runner = CliRunner()
    env = {"VPMON_URL": gateway.url, "VPMON_API_KEY": KEY}
    ok = runner.invoke(stream_app, [str(path), "--speed", "0", "--json", "--agent-channel", "1"], env=env)
    assert ok.exit_code == 0, ok.output
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    assert [line["type"] for line in lines] == ["verdict", "verdict", "summary"]
    assert lines[-1]["close_code"] == 1000 and lines[-1]["frames_sent"] == 50 and lines[-1]["error"] is None
    assert assert_clean(gateway.calls[0].wait().events).agent_channel == 1

    text = runner.invoke(stream_app, [str(path), "-p", "native", "--speed", "0"], env=env)
    assert text.exit_code == 0 and "verdict" in text.stdout and "close 1000 (call stopped)" in text.stdout

    gateway.fail_after = 5
    failed = runner.invoke(stream_app, [str(path), "--speed", "0"], env=env)
    assert failed.exit_code == 1 and "not enrolled" in failed.stderr and "close 4004" in failed.stdout

    refused = runner.invoke(stream_app, [str(path), "--speed", "0"], env={**env, "VPMON_API_KEY": "bad"})
    assert refused.exit_code == 2 and "HTTP 401" in refused.stderr and "Traceback" not in refused.output
    no_url = runner.invoke(stream_app, [str(path)], env={"VPMON_URL": ""})
    assert no_url.exit_code == 2 and "--url" in no_url.stderr
