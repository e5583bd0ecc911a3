"""Play an audio file to a vpmon gateway as a live call: the demo, the end-to-end tests and load tests.

Two layers, like the gateway's:

- **Sans-I/O client sessions**, one per protocol (``TwilioClient``, ``AudioHookClient``, ``NativeClient``).
  The file's audio is cut into the protocol's frames up front; the I/O layer calls ``connect()``, then
  ``send_frame(i)`` for each frame when it is due, then ``end()``, feeds whatever the server sent
  (``receive_text`` / ``receive_bytes``) and moves ``data_to_send()`` to the socket and
  ``events_received()`` to the caller. Nothing here touches a socket or sleeps; only the AudioHook
  session reads a clock (injected), to time its pings. ``transcript()`` runs a session with no server,
  for the protocols that need no answer to start (Twilio; native and AudioHook up to their handshake).
- **``stream_call``**, a thin asyncio layer on the ``websockets`` package's client: it connects with the
  protocol's headers, paces frames on a monotonic clock (``Pacer``: real time, N times faster, or as
  fast as possible), reads the server's frames concurrently, and returns a ``StreamResult``.

WebRTC (``whip``) is not a websocket: ``stream_call`` hands it to ``streamer/whip_client.py`` (aiortc).

Wire facts (PROTOCOLS.md, Twilio's "Media Streams - WebSocket Messages" page, the AudioHook v2 reference
implementation purecloudlabs/audiohook-reference-implementation):

- Twilio: ``connected`` (no sequenceNumber), ``start`` (sequenceNumber "1"), ``media`` every 20 ms (160
  bytes of 8 kHz μ-law, base64; ``chunk`` counts a track's messages from "1", ``timestamp`` is the chunk's
  start in ms from the stream's start, both strings), ``stop``. A stereo file sends both tracks (the agent's
  channel on the agent's track); a mono file only the agent's. Upgrade header ``X-Twilio-Signature``.
- AudioHook: client messages carry ``version "2"``, ``id`` (the session id), ``type``, ``seq`` (1, 2, …),
  ``serverseq`` (the last server ``seq`` seen), ``position`` (media sent so far, "PT1.5S") and
  ``parameters``; server messages carry ``seq`` (must rise by one) and ``clientseq``. ``open`` →
  ``opened`` (one of the offered media, or none) → binary PCMU frames (stereo interleaved, external
  first) → ``close {reason: "end"}`` → ``closed``, after which the client closes the socket. The client
  pings (``ping {rtt?}``; ``pong.clientseq`` = the ping's ``seq``); ``pause`` is answered with ``paused``
  and audio is discarded until ``resume`` (answered with ``resumed {start, discarded}``); ``disconnect``
  is answered with ``close {reason: "disconnect"}``. A server message out of protocol gets an ``error``
  message and ``close {reason: "error"}``, as the reference client does.
- Native: ``start`` → ``started``; binary PCM16 frames of 20 ms; ``stop``; the server pushes ``verdict``
  and ``alert`` frames, and ``error`` right before a close other than 1000.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import hmac
import json
import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np
import soundfile as sf

from verifier.audio import encode_mulaw, read_audio, resample, to_pcm16
from verifier.errors import AudioError, VpmonError

ProtocolName = Literal["twilio", "audiohook", "native", "whip"]
PROTOCOLS: tuple[ProtocolName, ...] = ("twilio", "audiohook", "native", "whip")
TwilioTrack = Literal["inbound", "outbound"]
WhipCodec = Literal["opus", "PCMU"]

STREAM_PATHS: dict[str, str] = {
    "twilio": "/v1/streams/twilio/{tenant}",
    "audiohook": "/v1/streams/audiohook",
    "native": "/v1/streams/native",
}
# Which channel of a stereo file is the agent's unless --agent-channel says: AudioHook recordings are
# [external, internal] (the agent is internal); the others take the first channel.
DEFAULT_AGENT_CHANNEL: dict[str, int] = {"twilio": 0, "audiohook": 1, "native": 0, "whip": 0}

MULAW_SILENCE = 0xFF  # μ-law code of zero (every bit is sent inverted)
TELEPHONE_RATE = 8000
NATIVE_RATES = (8000, 16000)  # sent as they are; any other rate is resampled to 16 kHz


class StreamError(VpmonError):
    """The call could not be streamed: bad options, an unreachable server, a refused upgrade."""


# -------------------------------------------------------------------------------------------- audio


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays make field-wise == ambiguous
class CallAudio:
    """A call recording: one float32 array per channel (all the same length) and the sample rate."""

    channels: tuple[np.ndarray, ...]
    sample_rate: int
    name: str = "audio"

    def __post_init__(self) -> None:
        if not 1 <= len(self.channels) <= 2:
            raise AudioError(
                f"{self.name} has {len(self.channels)} channels: vpmon stream plays mono (the agent) or "
                "stereo (agent and customer) audio; mix it down or pick two channels with sox"
            )
        if len({len(channel) for channel in self.channels}) != 1:
            raise ValueError("every channel must have the same number of samples")

    @classmethod
    def from_samples(cls, samples: np.ndarray, sample_rate: int, name: str = "audio") -> CallAudio:
        """From samples shaped (n,) for mono or (n, channels) interleaved, floats in [-1, 1]."""
        samples = np.asarray(samples, dtype=np.float32)
        frames = samples[:, np.newaxis] if samples.ndim == 1 else samples
        return cls(tuple(frames[:, c].copy() for c in range(frames.shape[1])), int(sample_rate), name)

    @property
    def channel_count(self) -> int:
        return len(self.channels)

    @property
    def samples(self) -> int:
        return len(self.channels[0])

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate

    def resampled(self, rate: int) -> CallAudio:
        if rate == self.sample_rate:
            return self
        channels = tuple(resample(channel, self.sample_rate, rate) for channel in self.channels)
        return CallAudio(channels, rate, self.name)


def load_call_audio(path: str | Path) -> CallAudio:
    """Read a WAV/FLAC/OGG file, keeping its channels (mono, or stereo agent + customer)."""
    path = Path(path)
    first = read_audio(path, channel=0)  # checks the file exists, decodes, and says what is wrong
    channels = sf.info(str(path)).channels
    samples = [first.samples] + [read_audio(path, channel=c).samples for c in range(1, channels)]
    return CallAudio(tuple(samples), first.sample_rate, path.name)


def agent_channel_for(protocol: str, audio: CallAudio, agent_channel: int | None) -> int:
    """The index of the agent's channel in ``audio``: 0 for mono, else as asked or the protocol's default."""
    if agent_channel is not None and not 0 <= agent_channel < audio.channel_count:
        have = "mono: its only channel is 0" if audio.channel_count == 1 else "stereo: use 0 or 1"
        raise StreamError(f"--agent-channel {agent_channel} does not exist: {audio.name} is {have}")
    if audio.channel_count == 1:
        return 0
    return DEFAULT_AGENT_CHANNEL[protocol] if agent_channel is None else agent_channel


def _frames(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


# -------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class StreamOptions:
    """How to stream one call. ``url`` is the server (http(s):// or ws(s)://, any path prefix)."""

    protocol: ProtocolName
    url: str
    key: str | None = None  # the vpmon API key (native, AudioHook)
    tenant: str | None = None
    agent_id: str | None = None
    call_id: str | None = None
    agent_channel: int | None = None  # None: 0 for mono, the protocol's default for stereo
    speed: float = 1.0  # 1: real time, 4: four times faster, 0: as fast as possible
    twilio_auth_token: str | None = None
    twilio_track: TwilioTrack = "outbound"  # the agent's track
    audiohook_client_secret: str | None = None  # base64; signs the upgrade (HTTP message signature)
    organization_id: str | None = None  # AudioHook; a random UUID when None
    language: str | None = None  # AudioHook open.language
    open_timeout: float = 10.0  # for the handshake, and for started / opened
    close_timeout: float = 10.0  # for the server's close (or closed) after the end
    ping_seconds: float = 5.0  # AudioHook: media time between pings
    whip_codec: WhipCodec = "opus"  # the codec a WHIP call's audio is sent in

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise StreamError(f"unknown protocol {self.protocol!r}: use twilio, audiohook, native or whip")
        if self.whip_codec not in ("opus", "PCMU"):
            raise StreamError(f"--whip-codec {self.whip_codec!r}: use opus or PCMU")
        if not (self.speed >= 0 and math.isfinite(self.speed)):
            raise StreamError(
                f"--speed {self.speed} is not usable: 1 is real time, 4 four times faster, 0 max"
            )
        if self.twilio_track not in ("inbound", "outbound"):
            raise StreamError(f"--twilio-track {self.twilio_track!r}: use inbound or outbound")


def stream_url(base: str, protocol: str, tenant: str | None = None) -> str:
    """The websocket URL of a protocol's stream endpoint on the server at ``base``.

    http(s):// becomes ws(s)://; the endpoint's path is appended to any path prefix, unless ``base``
    already names a stream endpoint (``/v1/streams/…``), which is then used as it is.
    """
    parts = urlsplit(base.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise StreamError(f"--url {base!r} is not a server URL: use http(s)://host:port or ws(s)://host:port")
    path = parts.path
    if "/v1/streams/" not in path:
        if protocol == "twilio" and not tenant:
            raise StreamError("Twilio streams are per tenant (/v1/streams/twilio/T): pass --tenant T")
        endpoint = STREAM_PATHS[protocol].format(tenant=quote(tenant or "", safe=""))
        path = path.rstrip("/") + endpoint
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def api_url(base: str) -> str:
    """The server's HTTP base URL (for the REST API) from ``--url``: ws(s) → http(s), no stream path."""
    parts = urlsplit(base.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    path = parts.path.split("/v1/streams/", 1)[0].rstrip("/")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


async def bind_agent(options: StreamOptions, call_id: str) -> None:
    """Tell the server who the agent on ``call_id`` is (``PUT /v1/calls/{call_id}/agent``), for protocols
    that carry no agent id in-band (AudioHook): the gateway reads the binding when the call starts."""
    import httpx

    url = f"{api_url(options.url)}/v1/calls/{quote(call_id, safe='')}/agent"
    try:
        async with httpx.AsyncClient(timeout=options.open_timeout) as client:
            response = await client.put(
                url, json={"agent_id": options.agent_id}, headers={"Authorization": f"Bearer {options.key}"}
            )
    except httpx.HTTPError as exc:
        raise StreamError(f"cannot bind agent {options.agent_id} to the call at {url}: {exc}") from None
    if response.status_code >= 400:
        raise StreamError(
            f"the server refused to bind agent {options.agent_id} to call {call_id}: "
            + _refusal_detail(response.status_code, response.content)
        )


def twilio_signature(auth_token: str, url: str) -> str:
    """``X-Twilio-Signature`` of a websocket upgrade: base64 HMAC-SHA1 of the full URL, keyed with the
    account's auth token (a GET has no POST parameters to append)."""
    digest = hmac.new(auth_token.encode(), url.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def audiohook_signature_headers(
    url: str,
    headers: Mapping[str, str],
    api_key: str,
    client_secret: str,
    created: int,
    nonce: str | None = None,
    lifetime: int = 30,
) -> dict[str, str]:
    """``Signature-Input`` / ``Signature`` (HTTP message signatures, hmac-sha256) as Genesys signs an
    AudioHook upgrade: @request-target, @authority and the four AudioHook headers, keyed with the
    base64-decoded client secret, ``keyid`` = the API key."""
    try:
        key = base64.b64decode(client_secret, validate=True)
    except ValueError:
        raise StreamError("the AudioHook client secret must be base64 (as Genesys shows it)") from None
    parts = urlsplit(url)
    authority = parts.netloc.rpartition("@")[2]  # what the Host header carries: no default port
    default = {"ws": 80, "wss": 443}.get(parts.scheme)
    if parts.port is not None and parts.port == default:
        authority = authority[: authority.rfind(":")]
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lower = {name.lower(): value for name, value in headers.items()}
    components = [
        ("@request-target", target),
        ("@authority", authority),
        ("audiohook-organization-id", lower["audiohook-organization-id"]),
        ("audiohook-session-id", lower["audiohook-session-id"]),
        ("audiohook-correlation-id", lower["audiohook-correlation-id"]),
        ("x-api-key", api_key),
    ]
    nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
    names = " ".join(f'"{name}"' for name, _ in components)
    params = (
        f'({names});keyid="{api_key}";nonce="{nonce}";alg="hmac-sha256";created={created};'
        f"expires={created + lifetime}"
    )
    lines = [f'"{name}": {value}' for name, value in components] + [f'"@signature-params": {params}']
    signature = hmac.new(key, "\n".join(lines).encode(), hashlib.sha256).digest()
    return {
        "Signature-Input": f"sig1={params}",
        "Signature": f"sig1=:{base64.b64encode(signature).decode()}:",
    }


# -------------------------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Accepted:
    """The server accepted the call (native ``started``, AudioHook ``opened``); audio may flow."""

    message: Mapping[str, Any]


@dataclass(frozen=True)
class Pushed:
    """A ``verdict`` or ``alert`` frame the server pushed (native protocol)."""

    kind: str
    data: Mapping[str, Any]


def is_notice(data: Mapping[str, Any]) -> bool:
    """An ``alert`` frame that is a notice (agent not enrolled, model mismatch): a message, no score."""
    return "message" in data and "score" not in data


@dataclass(frozen=True)
class Refused:
    """The server ended or refused the call in-band (native ``error``, AudioHook ``disconnect``), or
    broke the protocol; ``reason`` is one line for the user."""

    reason: str


@dataclass(frozen=True)
class Closed:
    """The protocol's closing handshake is over (AudioHook ``closed``): the client closes the socket."""


ClientEvent = Accepted | Pushed | Refused | Closed


@dataclass(frozen=True)
class Outgoing:
    """A message and when it is due on the call's media clock: the end of the audio it carries."""

    data: str | bytes
    media_time: float


def _dumps(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


class ClientSession:
    """What every protocol's client shares (see the module docstring for the driving sequence).

    ``ready``: the server accepted the call and audio may flow. ``failure``: why the call cannot go on
    (set with a ``Refused`` event); the I/O layer then stops sending frames. ``closed``: the protocol's
    own closing handshake is complete (AudioHook); the others end when the server closes the socket.
    """

    protocol: ClassVar[ProtocolName]
    frame_seconds: ClassVar[float]

    def __init__(self, duration: float, frame_count: int, call_id: str) -> None:
        self.duration = duration
        self.frame_count = frame_count
        self.call_id = call_id
        self.ready = False
        self.ended = False  # end() was called
        self.closed = False
        self.failure: str | None = None
        self.frames_sent = 0
        self.media_seconds = 0.0  # the audio sent (or discarded) so far
        self._outgoing: list[str | bytes] = []
        self._events: list[ClientEvent] = []

    # -- driven by the I/O layer

    def connect(self) -> None:
        """Queue what opens the call."""
        raise NotImplementedError

    def frame_time(self, index: int) -> float:
        """When frame ``index`` is due on the media clock: the end of its audio."""
        return min((index + 1) * self.frame_seconds, self.duration)

    def send_frame(self, index: int) -> None:
        raise NotImplementedError

    def end(self) -> None:
        """Queue what ends the call (once); nothing after a failure the protocol has already answered."""
        raise NotImplementedError

    def receive_text(self, text: str) -> None:
        self._refuse(f"the server sent an unexpected text frame on the {self.protocol} stream: {text[:80]}")

    def receive_bytes(self, data: bytes) -> None:
        self._refuse(
            f"the server sent an unexpected binary frame ({len(data)} bytes) on the {self.protocol} stream"
        )

    @property
    def sending(self) -> bool:
        """Whether frames may still be sent (accepted, not failed, not ending)."""
        return self.ready and self.failure is None and not self.ended

    @property
    def expects_close(self) -> bool:
        """Whether the server has yet to end the call (close the socket, or answer close with closed)."""
        return self.ended

    def fail(self, reason: str) -> None:
        """The I/O layer gives up on the call (no answer in time): ``reason`` becomes the failure."""
        self._refuse(reason)

    def data_to_send(self) -> list[str | bytes]:
        data, self._outgoing = self._outgoing, []
        return data

    def events_received(self) -> list[ClientEvent]:
        events, self._events = self._events, []
        return events

    # -- for subclasses

    def _refuse(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            self._events.append(Refused(reason))


class TwilioClient(ClientSession):
    """A Twilio Media Stream as Twilio sends it: the file's audio as 8 kHz μ-law, 20 ms per message."""

    protocol = "twilio"
    frame_seconds = 0.02
    FRAME_BYTES = 160

    def __init__(
        self,
        audio: CallAudio,
        *,
        agent_channel: int | None = None,
        agent_track: TwilioTrack = "outbound",
        tenant: str | None = None,
        agent_id: str | None = None,
        call_sid: str | None = None,
        stream_sid: str | None = None,
        account_sid: str | None = None,
    ) -> None:
        phone = audio.resampled(TELEPHONE_RATE)
        agent = agent_channel_for("twilio", audio, agent_channel)
        other_track: TwilioTrack = "inbound" if agent_track == "outbound" else "outbound"
        encoded = {agent_track: encode_mulaw(phone.channels[agent])}
        if phone.channel_count == 2:
            encoded[other_track] = encode_mulaw(phone.channels[1 - agent])
        frame_count = math.ceil(phone.samples / self.FRAME_BYTES)
        super().__init__(frame_count * self.frame_seconds, frame_count, call_sid or "CA" + uuid.uuid4().hex)
        self.tracks: list[TwilioTrack] = [t for t in ("inbound", "outbound") if t in encoded]
        self._encoded = encoded
        self.stream_sid = stream_sid or "MZ" + uuid.uuid4().hex
        self.account_sid = account_sid or "AC" + uuid.uuid4().hex
        self.custom_parameters = {
            name: value for name, value in (("tenant", tenant), ("agent_id", agent_id)) if value
        }
        self._sequence = 0
        self.ready = True  # Twilio never waits for the server

    def _next_sequence(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def connect(self) -> None:
        self._outgoing.append(_dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start = {
            "accountSid": self.account_sid,
            "streamSid": self.stream_sid,
            "callSid": self.call_id,
            "tracks": self.tracks,
            "customParameters": self.custom_parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": TELEPHONE_RATE, "channels": 1},
        }
        message = {"event": "start", "sequenceNumber": self._next_sequence(), "start": start}
        self._outgoing.append(_dumps({**message, "streamSid": self.stream_sid}))

    def send_frame(self, index: int) -> None:
        start = index * self.FRAME_BYTES
        for track in self.tracks:
            payload = self._encoded[track][start : start + self.FRAME_BYTES]
            payload += bytes([MULAW_SILENCE]) * (self.FRAME_BYTES - len(payload))  # Twilio sends whole frames
            media = {
                "track": track,
                "chunk": str(index + 1),  # counted per track, as the timestamp is
                "timestamp": str(index * 20),
                "payload": base64.b64encode(payload).decode("ascii"),
            }
            message = {"event": "media", "sequenceNumber": self._next_sequence(), "media": media}
            self._outgoing.append(_dumps({**message, "streamSid": self.stream_sid}))
        self.frames_sent += 1
        self.media_seconds = self.frame_time(index)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        stop = {"accountSid": self.account_sid, "callSid": self.call_id}
        message = {"event": "stop", "sequenceNumber": self._next_sequence(), "stop": stop}
        self._outgoing.append(_dumps({**message, "streamSid": self.stream_sid}))


class NativeClient(ClientSession):
    """The vpmon native protocol: PCM16 at the file's rate (8 or 16 kHz, else resampled to 16 kHz),
    20 ms per binary frame, interleaved when stereo."""

    protocol = "native"
    frame_seconds = 0.02

    def __init__(
        self,
        audio: CallAudio,
        *,
        agent_channel: int | None = None,
        tenant: str | None = None,
        agent_id: str | None = None,
        call_id: str | None = None,
    ) -> None:
        rate = audio.sample_rate if audio.sample_rate in NATIVE_RATES else 16000
        sent = audio.resampled(rate)
        self.agent_channel = agent_channel_for("native", audio, agent_channel)
        interleaved = np.stack(sent.channels, axis=1)
        self._pcm = to_pcm16(interleaved).astype("<i2").tobytes()
        self._frame_bytes = rate // 50 * 2 * sent.channel_count
        self._slices = _frames(len(self._pcm), self._frame_bytes)
        super().__init__(sent.duration, len(self._slices), call_id or str(uuid.uuid4()))
        self.start_message: dict[str, Any] = {"type": "start", "call_id": self.call_id}
        if tenant:
            self.start_message["tenant"] = tenant
        if agent_id:
            self.start_message["agent_id"] = agent_id
        self.start_message |= {
            "encoding": "pcm16",
            "sample_rate": rate,
            "channels": sent.channel_count,
            "agent_channel": self.agent_channel,
        }
        self._stop_sent = False
        self._server_error = False

    def connect(self) -> None:
        self._outgoing.append(_dumps(self.start_message))

    def send_frame(self, index: int) -> None:
        if not self.ready or self.failure is not None:
            return
        self._outgoing.append(self._pcm[self._slices[index]])
        self.frames_sent += 1
        self.media_seconds = self.frame_time(index)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.ready and self.failure is None:
            self._outgoing.append(_dumps({"type": "stop"}))
            self._stop_sent = True

    @property
    def expects_close(self) -> bool:
        return self._stop_sent or self._server_error  # the server closes after stop, and after error

    def receive_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(kind, str):
            self._refuse(f"the server sent a frame that is not a typed JSON object: {text[:80]}")
        elif kind == "started":
            if not self.ready:
                self.ready = True
                self._events.append(Accepted(message))
        elif kind in ("verdict", "alert"):
            self._events.append(Pushed(kind, message))
        elif kind == "error":
            self._server_error = True
            code, reason = message.get("code"), message.get("reason") or "no reason given"
            self._refuse(f"the server ended the call: {reason}" + (f" ({code})" if code is not None else ""))
        # any other type: room for the protocol to grow


class _AudioHookState(enum.Enum):
    CONNECTING = "connecting"  # before open
    OPENING = "opening"  # open sent, waiting for opened
    OPEN = "open"
    CLOSING = "closing"  # close sent, waiting for closed
    CLOSED = "closed"


def iso_duration(seconds: float) -> str:
    """AudioHook's durations: "PT1.5S", "PT0S" (ISO 8601, seconds only)."""
    text = f"{max(seconds, 0.0):.6f}".rstrip("0").rstrip(".")
    return f"PT{text}S"


def parse_iso_duration(value: object) -> float | None:
    if isinstance(value, str) and value.startswith("PT") and value.endswith("S"):
        with contextlib.suppress(ValueError):
            seconds = float(value[2:-1])
            if math.isfinite(seconds) and seconds >= 0:
                return seconds
    return None


STEREO_MEDIA = {
    "type": "audio",
    "format": "PCMU",
    "channels": ["external", "internal"],
    "rate": TELEPHONE_RATE,
}
EXTERNAL_MEDIA = {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": TELEPHONE_RATE}


class AudioHookClient(ClientSession):
    """A Genesys AudioHook v2 client session: 8 kHz PCMU, 100 ms binary frames, stereo interleaved
    [external, internal] with the agent on ``internal`` (a mono file's audio; the customer's channel is
    then silence), or external only if the server chooses that offer.

    ``clock`` times pings (round-trip time, and a pong that never comes: ``ping_timeout`` seconds).
    """

    protocol = "audiohook"
    frame_seconds = 0.1
    FRAME_SAMPLES = 800

    def __init__(
        self,
        audio: CallAudio,
        *,
        agent_channel: int | None = None,
        conversation_id: str | None = None,
        session_id: str | None = None,
        organization_id: str | None = None,
        language: str | None = None,
        ping_seconds: float = 5.0,
        ping_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        phone = audio.resampled(TELEPHONE_RATE)
        agent = agent_channel_for("audiohook", audio, agent_channel)
        internal = encode_mulaw(phone.channels[agent])
        external = (
            encode_mulaw(phone.channels[1 - agent])
            if phone.channel_count == 2
            else bytes([MULAW_SILENCE]) * phone.samples
        )
        self._channels = {"external": external, "internal": internal}
        self._slices = _frames(phone.samples, self.FRAME_SAMPLES)
        conversation_id = conversation_id or str(uuid.uuid4())
        _check_uuid(conversation_id, "--call-id (the AudioHook conversationId)")
        super().__init__(phone.duration, len(self._slices), conversation_id)
        self.session_id = session_id or str(uuid.uuid4())
        self.organization_id = organization_id or str(uuid.uuid4())
        _check_uuid(self.organization_id, "the AudioHook organization id")
        self.language = language
        self.offered = [STEREO_MEDIA, EXTERNAL_MEDIA]
        self.selected: dict[str, Any] | None = None
        self.state = _AudioHookState.CONNECTING
        self.ping_seconds = ping_seconds
        self.ping_timeout = ping_timeout
        self.pongs = 0
        self._clock = clock
        self._seq = 0
        self._serverseq = 0
        self._position = 0.0
        self._next_ping = ping_seconds
        self._pending_ping: tuple[int, float] | None = None  # (seq, when sent)
        self._rtt: float | None = None
        self._paused_at: float | None = None  # position where a pause began
        self._discard_to = 0.0  # opened.discardTo: audio before it is skipped, then reported discarded

    # -- client messages

    def headers(self, api_key: str) -> dict[str, str]:
        return {
            "Audiohook-Organization-Id": self.organization_id,
            "Audiohook-Session-Id": self.session_id,
            "Audiohook-Correlation-Id": str(uuid.uuid4()),
            "X-API-KEY": api_key,
        }

    def _send(self, kind: str, parameters: Mapping[str, Any]) -> None:
        self._seq += 1
        message = {
            "version": "2",
            "id": self.session_id,
            "type": kind,
            "seq": self._seq,
            "serverseq": self._serverseq,
            "position": iso_duration(self._position),
            "parameters": dict(parameters),
        }
        self._outgoing.append(_dumps(message))

    def connect(self) -> None:
        if self.state is not _AudioHookState.CONNECTING:
            return
        parameters: dict[str, Any] = {
            "organizationId": self.organization_id,
            "conversationId": self.call_id,
            "participant": {
                "id": str(uuid.uuid4()),
                "ani": "tel:+15550100001",
                "aniName": "vpmon stream",
                "dnis": "tel:+15550100002",
            },
            "media": self.offered,
        }
        if self.language:
            parameters["language"] = self.language
        self._send("open", parameters)
        self.state = _AudioHookState.OPENING

    def send_frame(self, index: int) -> None:
        if self.state is not _AudioHookState.OPEN:
            return
        span = self._slices[index]
        end = self.frame_time(index)
        self._maybe_ping()
        if self._discard_to and end > self._discard_to:
            # the reference client reports a discard once it is done, at the position after the gap
            self._send("discarded", {"start": "PT0S", "discarded": iso_duration(self._position)})
            self._discard_to = 0.0
        if self._paused_at is None and not self._discard_to and self.selected is not None:
            channels = [self._channels[name][span] for name in self.selected["channels"]]
            if len(channels) == 1:
                frame = channels[0]
            else:
                frame = np.stack([np.frombuffer(c, np.uint8) for c in channels], axis=1).tobytes()
            self._outgoing.append(frame)
            self.frames_sent += 1
        self._position = end  # paused or discarded audio still moves the position on
        self.media_seconds = end

    def _maybe_ping(self) -> None:
        if self._position < self._next_ping:
            return
        now = self._clock()
        if self._pending_ping is not None:
            seq, sent = self._pending_ping
            if now - sent <= self.ping_timeout:
                return  # a pong may still be on its way (fast playback): ping again later
            self._protocol_error(408, f"no pong for ping seq {seq} within {self.ping_timeout:g} s")
            return
        self._next_ping = self._position + self.ping_seconds
        self._send("ping", {} if self._rtt is None else {"rtt": iso_duration(self._rtt)})
        self._pending_ping = (self._seq, now)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.state is _AudioHookState.OPEN:
            self._send("close", {"reason": "end"})
            self.state = _AudioHookState.CLOSING
        elif self.state in (_AudioHookState.CONNECTING, _AudioHookState.OPENING):
            self.state = _AudioHookState.CLOSED  # never opened: nothing to close but the socket

    @property
    def sending(self) -> bool:
        return self.state is _AudioHookState.OPEN and self.failure is None

    @property
    def expects_close(self) -> bool:
        return self.state is _AudioHookState.CLOSING

    def _close(self, reason: str) -> None:
        if self.state in (_AudioHookState.OPENING, _AudioHookState.OPEN):
            self._send("close", {"reason": reason})
            self.state = _AudioHookState.CLOSING

    def _protocol_error(self, code: int, message: str) -> None:
        """The server broke the protocol: tell it (error), close with reason "error", and fail."""
        if self.state in (_AudioHookState.OPENING, _AudioHookState.OPEN):
            self._send("error", {"code": code, "message": message})
            self._close("error")
        self._refuse(f"the AudioHook server broke the protocol: {message}")

    # -- server messages

    def receive_bytes(self, data: bytes) -> None:
        self._protocol_error(415, f"unexpected binary message of {len(data)} bytes")

    def receive_text(self, text: str) -> None:
        if self.state is _AudioHookState.CLOSED:
            return
        try:
            message = json.loads(text)
        except ValueError:
            self._protocol_error(400, "message is not well-formed JSON")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self._protocol_error(400, "message is not an AudioHook server message (no type)")
            return
        kind, seq = message["type"], message.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq != self._serverseq + 1:
            self._protocol_error(400, f"{kind} has seq {seq!r}, expected {self._serverseq + 1}")
            return
        self._serverseq = seq
        parameters = message.get("parameters")
        parameters = parameters if isinstance(parameters, dict) else {}
        handler = {
            "opened": self._on_opened,
            "pong": self._on_pong,
            "pause": self._on_pause,
            "resume": self._on_resume,
            "disconnect": self._on_disconnect,
            "closed": self._on_closed,
        }.get(kind)
        if handler is not None:
            handler(message, parameters)
        elif kind not in ("event", "updated", "reconnect"):  # informational: nothing to answer
            self._protocol_error(400, f"unknown message type {kind!r}")

    def _on_opened(self, message: dict[str, Any], parameters: dict[str, Any]) -> None:
        if self.state is not _AudioHookState.OPENING:
            if self.state is not _AudioHookState.CLOSING:
                self._protocol_error(409, f"unexpected 'opened' in state {self.state.value}")
            return
        media = parameters.get("media")
        if not isinstance(media, list) or len(media) > 1:
            self._protocol_error(400, "opened must select one of the offered media (or none)")
            return
        if media and media[0] not in self.offered:
            self._protocol_error(400, f"selected media {media[0]!r} is not one of the offered")
            return
        self.selected = media[0] if media else None
        self.state = _AudioHookState.OPEN
        self.ready = True
        self._discard_to = parse_iso_duration(parameters.get("discardTo")) or 0.0
        if parameters.get("startPaused") is True:
            self._paused_at = 0.0
            self._send("paused", {})
        self._events.append(Accepted(message))

    def _on_pong(self, message: dict[str, Any], parameters: dict[str, Any]) -> None:
        if self._pending_ping is None:
            return  # a straggler after a timeout, or no ping outstanding: nothing to measure
        seq, sent = self._pending_ping
        if message.get("clientseq") != seq:
            self._protocol_error(
                400, f"pong clientseq {message.get('clientseq')!r} is not the ping's seq {seq}"
            )
            return
        self._pending_ping = None
        self._rtt = max(self._clock() - sent, 0.0)
        self.pongs += 1

    def _on_pause(self, message: dict[str, Any], parameters: dict[str, Any]) -> None:
        if self.state is _AudioHookState.OPEN:
            if self._paused_at is None:
                self._paused_at = self._position
            self._send("paused", {})
        elif self.state is not _AudioHookState.CLOSING:
            self._protocol_error(409, f"unexpected 'pause' in state {self.state.value}")

    def _on_resume(self, message: dict[str, Any], parameters: dict[str, Any]) -> None:
        if self.state is _AudioHookState.OPEN:
            start = self._position if self._paused_at is None else self._paused_at
            self._paused_at = None
            self._send(
                "resumed", {"start": iso_duration(start), "discarded": iso_duration(self._position - start)}
            )
        elif self.state is not _AudioHookState.CLOSING:
            self._protocol_error(409, f"unexpected 'resume' in state {self.state.value}")

    def _on_disconnect(self, message: dict[str, Any], parameters: dict[str, Any]) -> None:
        reason = parameters.get("reason")
        info = parameters.get("info")
        if reason != "completed":
            detail = f": {info}" if info else ""
            self._refuse(f"the server disconnected the AudioHook session ({reason}){detail}")
        self._close("disconnect")

    def _on_closed(self, message: dict[str, Any], parameters: dict[str, Any]) -> None:
        if self.state is not _AudioHookState.CLOSING:
            self._protocol_error(409, f"unexpected 'closed' in state {self.state.value}")
            return
        self.state = _AudioHookState.CLOSED
        self.closed = True
        self._events.append(Closed())


def _check_uuid(value: str, name: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError:
        raise StreamError(f"{name} must be a UUID (AudioHook ids are), got {value!r}") from None


def new_session(
    audio: CallAudio, options: StreamOptions, clock: Callable[[], float] = time.monotonic
) -> ClientSession:
    """The client session for ``options.protocol``, with the options' identities."""
    if options.protocol == "twilio":
        return TwilioClient(
            audio,
            agent_channel=options.agent_channel,
            agent_track=options.twilio_track,
            tenant=options.tenant,
            agent_id=options.agent_id,
            call_sid=options.call_id,
        )
    if options.protocol == "audiohook":
        return AudioHookClient(
            audio,
            agent_channel=options.agent_channel,
            conversation_id=options.call_id,
            organization_id=options.organization_id,
            language=options.language,
            ping_seconds=options.ping_seconds,
            clock=clock,
        )
    return NativeClient(
        audio,
        agent_channel=options.agent_channel,
        tenant=options.tenant,
        agent_id=options.agent_id,
        call_id=options.call_id,
    )


def transcript(session: ClientSession) -> list[Outgoing]:
    """Everything the session sends with no server answering: the whole call for Twilio; the opening
    message only for native and AudioHook (they wait for ``started`` / ``opened``)."""
    result = []
    session.connect()
    result += [Outgoing(data, 0.0) for data in session.data_to_send()]
    for index in range(session.frame_count):
        session.send_frame(index)
        result += [Outgoing(data, session.frame_time(index)) for data in session.data_to_send()]
    session.end()
    result += [Outgoing(data, session.duration) for data in session.data_to_send()]
    return result


# -------------------------------------------------------------------------------------------- pacing


@dataclass(frozen=True)
class Pacer:
    """When a message is due on the monotonic clock: ``start + media_time / speed``.

    Every deadline comes from the media time, never from adding up sleeps, so a late wake-up delays
    one message and not all that follow (no drift). ``speed`` 0 means no waiting at all.
    """

    start: float
    speed: float = 1.0

    def deadline(self, media_time: float) -> float:
        return self.start if self.speed == 0 else self.start + media_time / self.speed

    def delay(self, media_time: float, now: float) -> float:
        return max(0.0, self.deadline(media_time) - now)


async def wait_until_due(
    pacer: Pacer,
    media_time: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """Sleep until ``media_time`` is due; always yield once, so the reader runs even at speed 0."""
    await sleep(pacer.delay(media_time, clock()))


# -------------------------------------------------------------------------------------------- asyncio


@dataclass
class StreamResult:
    """What happened: enough for the CLI's summary and for tests and load runs to assert on."""

    protocol: str
    url: str
    call_id: str
    audio_seconds: float  # of the file
    media_seconds: float = 0.0  # sent before the end
    frames_sent: int = 0
    elapsed_seconds: float = 0.0
    accepted: bool = False
    close_code: int | None = None
    close_reason: str | None = None
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    notices: list[dict[str, Any]] = field(default_factory=list)  # alert frames that are notices
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "summary",
            "protocol": self.protocol,
            "url": self.url,
            "call_id": self.call_id,
            "audio_seconds": round(self.audio_seconds, 3),
            "media_seconds": round(self.media_seconds, 3),
            "frames_sent": self.frames_sent,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "accepted": self.accepted,
            "close_code": self.close_code,
            "close_reason": self.close_reason,
            "verdicts": len(self.verdicts),
            "alerts": len(self.alerts),
            "notices": len(self.notices),
            "error": self.error,
        }


def connection_headers(session: ClientSession, options: StreamOptions, url: str) -> dict[str, str]:
    """The upgrade request's headers for the session's protocol (and a check that the options allow it)."""
    if isinstance(session, TwilioClient):
        if not options.twilio_auth_token:
            raise StreamError(
                "Twilio streams are signed with the tenant's Twilio auth token: pass --twilio-auth-token "
                "(or set VPMON_TWILIO_AUTH_TOKEN)"
            )
        return {"X-Twilio-Signature": twilio_signature(options.twilio_auth_token, url)}
    if not options.key:
        raise StreamError(
            f"{session.protocol} streams need a monitor API key: pass --key or set VPMON_API_KEY"
        )
    if isinstance(session, AudioHookClient):
        headers = session.headers(options.key)
        if options.audiohook_client_secret:
            headers |= audiohook_signature_headers(
                url, headers, options.key, options.audiohook_client_secret, int(time.time())
            )
        return headers
    return {"Authorization": f"Bearer {options.key}"}


def _refusal_detail(status: int, body: bytes) -> str:
    """``HTTP 404: <the problem's detail>`` from a refusal (RFC 9457 problem JSON, or the text)."""
    detail = ""
    with contextlib.suppress(ValueError):
        problem = json.loads(body)
        if isinstance(problem, dict):
            detail = str(problem.get("detail") or problem.get("title") or "")
    detail = detail or body.decode("utf-8", "replace").strip()[:200]
    return f"HTTP {status}" + (f": {detail}" if detail else "")


def _refusal(url: str, protocol: str, status: int, body: bytes) -> str:
    hint = {
        401: "check --key (VPMON_API_KEY): a monitor or admin key",
        403: "check --twilio-auth-token (VPMON_TWILIO_AUTH_TOKEN) and --url"
        if protocol == "twilio"
        else "check --key (VPMON_API_KEY)",
        404: "check --url: is it a vpmon server with live calls?",
    }.get(status)
    refused = f"the server refused the {protocol} stream at {url}: {_refusal_detail(status, body)}"
    return f"{refused}; {hint}" if hint else refused


class _Call:
    """One streamed call on an open websocket: a sender (frames, paced) and a reader, sharing the session."""

    def __init__(
        self,
        ws: Any,
        session: ClientSession,
        options: StreamOptions,
        result: StreamResult,
        on_event: Callable[[ClientEvent], None] | None,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[Any]],
    ) -> None:
        self.ws = ws
        self.session = session
        self.options = options
        self.result = result
        self.on_event = on_event
        self.clock = clock
        self.sleep = sleep
        self.send_lock = asyncio.Lock()
        self.answered = asyncio.Event()  # accepted, refused or the socket closed
        self.finished = asyncio.Event()  # the closing handshake is over or the socket closed
        self.socket_closed = False
        self.cut_short = False  # the socket closed before the call's end was sent

    async def flush(self) -> None:
        from websockets.exceptions import ConnectionClosed

        async with self.send_lock:  # the reader's replies and the sender's frames keep their order
            for data in self.session.data_to_send():
                if self.socket_closed:
                    return
                try:
                    await self.ws.send(data)
                except ConnectionClosed:
                    self._socket_gone()
                    return

    def _socket_gone(self) -> None:
        self.socket_closed = True
        self.answered.set()
        self.finished.set()

    def _dispatch(self) -> None:
        for event in self.session.events_received():
            if isinstance(event, Accepted):
                self.result.accepted = True
                self.answered.set()
            elif isinstance(event, Pushed):
                if event.kind == "verdict":
                    self.result.verdicts.append(dict(event.data))
                elif is_notice(event.data):
                    self.result.notices.append(dict(event.data))
                else:
                    self.result.alerts.append(dict(event.data))
            elif isinstance(event, Refused):
                self.answered.set()
            elif isinstance(event, Closed):
                self.finished.set()
            if self.on_event is not None:
                self.on_event(event)

    async def read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                if isinstance(message, str):
                    self.session.receive_text(message)
                else:
                    self.session.receive_bytes(bytes(message))
                self._dispatch()
                await self.flush()
        except ConnectionClosed:
            pass
        self._socket_gone()

    async def send(self) -> None:
        session, options = self.session, self.options
        session.connect()
        await self.flush()
        if not session.ready:
            try:
                await asyncio.wait_for(self.answered.wait(), options.open_timeout)
            except TimeoutError:
                answer = "started" if session.protocol == "native" else "opened"
                session.fail(f"the server did not answer with {answer} within {options.open_timeout:g} s")
                self._dispatch()
        else:
            self.result.accepted = True
        pacer = Pacer(self.clock(), options.speed)
        for index in range(session.frame_count):
            if not session.sending or self.socket_closed:
                break
            await wait_until_due(pacer, session.frame_time(index), self.clock, self.sleep)
            session.send_frame(index)
            self._dispatch()
            await self.flush()
        self.cut_short = self.socket_closed
        session.end()
        await self.flush()
        if session.expects_close and not self.socket_closed:
            try:
                await asyncio.wait_for(self.finished.wait(), options.close_timeout)
            except TimeoutError:
                if session.failure is None and not session.closed:
                    what = "closed" if session.protocol == "audiohook" else "a close"
                    session.fail(
                        f"the server sent no {what} within {options.close_timeout:g} s after the call ended"
                    )
                    self._dispatch()


async def stream_call(
    audio: CallAudio,
    options: StreamOptions,
    *,
    on_event: Callable[[ClientEvent], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> StreamResult:
    """Stream ``audio`` as one live call. Raises ``StreamError`` when no stream could be opened
    (unreachable, refused upgrade, bad options); otherwise returns a result whose ``error`` says why the
    call did not end cleanly (an in-band refusal, a protocol error, a close code other than 1000)."""
    if options.protocol == "whip":  # WebRTC, not a websocket: aiortc, imported only when used
        from streamer.whip_client import stream_whip_call

        return await stream_whip_call(audio, options, on_event=on_event, clock=clock, sleep=sleep)
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

    session = new_session(audio, options, clock)
    url = stream_url(options.url, options.protocol, options.tenant)
    headers = connection_headers(session, options, url)
    result = StreamResult(options.protocol, url, session.call_id, audio.duration)
    if isinstance(session, AudioHookClient) and options.agent_id:
        await bind_agent(options, session.call_id)  # AudioHook's open has no field for the agent
    began = clock()
    try:
        ws = await connect(
            url,
            additional_headers=headers,
            open_timeout=options.open_timeout,
            close_timeout=options.close_timeout,
            compression=None,  # audio does not deflate; telephony platforms do not offer it
            user_agent_header="vpmon-stream",
        )
    except InvalidStatus as exc:
        response = exc.response
        raise StreamError(
            _refusal(url, options.protocol, response.status_code, response.body or b"")
        ) from None
    except InvalidURI:
        raise StreamError(f"--url gives {url!r}, which is not a websocket URL") from None
    except TimeoutError:
        raise StreamError(f"no websocket handshake from {url} within {options.open_timeout:g} s") from None
    except InvalidHandshake as exc:
        raise StreamError(f"the websocket handshake with {url} failed: {exc}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise StreamError(
            f"cannot connect to {url}: {reason}: is the server running (vpmon serve)? "
            "check --url or VPMON_URL"
        ) from None

    call = _Call(ws, session, options, result, on_event, clock, sleep)
    reader = asyncio.create_task(call.read())
    try:
        await call.send()
        await ws.close()  # a no-op once the server has closed; after AudioHook's closed, the client's turn
        await reader
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await ws.close()
    result.elapsed_seconds = clock() - began
    result.frames_sent = session.frames_sent
    result.media_seconds = session.media_seconds
    result.close_code = ws.close_code
    result.close_reason = ws.close_reason
    result.error = session.failure
    reason = f" ({result.close_reason})" if result.close_reason else ""
    if result.error is None and result.close_code != 1000:
        result.error = f"the server closed the stream with code {result.close_code}{reason}"
    elif result.error is None and call.cut_short:
        result.error = (
            f"the server closed the stream {result.media_seconds:.1f} s into the {audio.duration:.1f} s "
            f"call, before its end: code {result.close_code}{reason}"
        )
    return result
