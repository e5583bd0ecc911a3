"""``vpmon stream --protocol whip``: publish a recording to a vpmon server as a WebRTC call (WHIP, RFC 9725).

The agent's channel of the file becomes an audio track that aiortc encodes (Opus, or PCMU) and sends
over a sendonly peer connection, as a browser publishing its microphone would; a data channel carries
the server's verdicts and alerts back (the native protocol's JSON). The offer goes out with every
candidate gathered (no trickle), ``POST /v1/whip`` answers, the audio plays on the media clock (real
time, N times faster, or as fast as the connection takes it), and ``DELETE`` on the session's location
ends the call once the file is over; the server answers the DELETE after the last verdicts are out, and
closes the data channel after the last of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from streamer.stream_client import (
    Accepted,
    CallAudio,
    ClientEvent,
    Pacer,
    Pushed,
    Refused,
    StreamError,
    StreamOptions,
    StreamResult,
    _refusal,
    agent_channel_for,
    api_url,
    is_notice,
    wait_until_due,
)
from streamer.webrtc import include_loopback_candidates
from verifier.audio import to_pcm16

FRAME_SECONDS = 0.02
# What each codec is fed: aiortc's encoders take s16 frames (Opus is 48 kHz, PCMU 8 kHz on the wire).
CODEC_RATES = {"opus": 48000, "PCMU": 8000}
# At "as fast as possible" the frames still go at most this many times faster than real time: RTP is
# UDP, and a burst beyond what the receiver's socket and jitter buffer hold is audio lost on the way.
MAX_SPEED = 8.0


def whip_url(base: str) -> str:
    """The WHIP endpoint of the server at ``base`` (http(s) or ws(s), any path prefix); a URL that
    already ends in ``/v1/whip`` is used as it is."""
    parts = urlsplit(base.strip())
    if parts.path.rstrip("/").endswith("/v1/whip"):
        return urlunsplit(
            parts._replace(scheme={"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme))
        )
    root = api_url(base)
    if not urlsplit(root).netloc or urlsplit(root).scheme not in ("http", "https"):
        raise StreamError(f"--url {base!r} is not a server URL: use http(s)://host:port")
    return root + "/v1/whip"


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FileAudioTrack(MediaStreamTrack):
    """The file's agent channel as 20 ms s16 mono frames, each returned when it is due on the media clock."""

    kind = "audio"

    def __init__(
        self,
        samples: np.ndarray,
        sample_rate: int,
        speed: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        super().__init__()
        self.pcm = to_pcm16(samples)
        self.sample_rate = sample_rate
        self.frame_samples = round(sample_rate * FRAME_SECONDS)
        self.frame_count = -(-len(self.pcm) // self.frame_samples)
        self.speed = MAX_SPEED if speed == 0 else min(speed, MAX_SPEED)
        self.clock = clock
        self.sleep = sleep
        self.pacer: Pacer | None = None
        self.frames_sent = 0
        self.finished = asyncio.Event()

    async def recv(self) -> av.AudioFrame:
        if self.frames_sent >= self.frame_count:
            self.finished.set()
            self.stop()
            raise MediaStreamError
        if self.pacer is None:  # the clock starts with the first frame the sender asks for
            self.pacer = Pacer(self.clock(), self.speed)
        index = self.frames_sent
        await wait_until_due(self.pacer, index * FRAME_SECONDS, self.clock, self.sleep)
        chunk = self.pcm[index * self.frame_samples : (index + 1) * self.frame_samples]
        if len(chunk) < self.frame_samples:  # the encoders take whole frames
            chunk = np.pad(chunk, (0, self.frame_samples - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = index * self.frame_samples
        frame.time_base = Fraction(1, self.sample_rate)
        self.frames_sent += 1
        return frame

    @property
    def media_seconds(self) -> float:
        return min(self.frames_sent * FRAME_SECONDS, len(self.pcm) / self.sample_rate)


def request_headers(options: StreamOptions, call_id: str) -> dict[str, str]:
    if not options.key:
        raise StreamError("whip calls need a monitor API key: pass --key or set VPMON_API_KEY")
    headers = {
        "Authorization": f"Bearer {options.key}",
        "Content-Type": "application/sdp",
        "Vpmon-Call-Id": call_id,
    }
    if options.agent_id:
        headers["Vpmon-Agent-Id"] = options.agent_id
    if options.tenant:
        headers["Vpmon-Tenant"] = options.tenant
    return headers


async def stream_whip_call(
    audio: CallAudio,
    options: StreamOptions,
    *,
    on_event: Callable[[ClientEvent], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> StreamResult:
    """Publish ``audio`` as one WebRTC call (see the module docstring). Raises ``StreamError`` when the
    server refuses the offer or cannot be reached; otherwise the result's ``error`` says why the call
    did not end cleanly."""
    url = whip_url(options.url)
    call_id = options.call_id or str(uuid.uuid4())
    headers = request_headers(options, call_id)
    codec = options.whip_codec
    rate = CODEC_RATES[codec]
    agent = audio.channels[agent_channel_for("whip", audio, options.agent_channel)]
    sent = CallAudio((agent,), audio.sample_rate, audio.name).resampled(rate)
    result = StreamResult("whip", url, call_id, audio.duration)
    if is_loopback(url):
        include_loopback_candidates()  # aioice leaves 127.0.0.1 out; a loopback server needs it

    track = FileAudioTrack(sent.channels[0], rate, options.speed, clock, sleep)
    pc = RTCPeerConnection()
    stopped = asyncio.Event()  # the file is over, the connection is gone, or the server ended the call
    connected = asyncio.Event()
    channel_closed = asyncio.Event()
    failure: list[str] = []

    def emit(event: ClientEvent) -> None:
        if isinstance(event, Pushed):
            kind = "verdict" if event.kind == "verdict" else "notice" if is_notice(event.data) else "alert"
            {"verdict": result.verdicts, "alert": result.alerts, "notice": result.notices}[kind].append(
                dict(event.data)
            )
        elif isinstance(event, Refused):
            failure.append(event.reason)
            stopped.set()
        if on_event is not None:
            on_event(event)

    def on_message(message: str | bytes) -> None:
        with contextlib.suppress(ValueError):
            data = json.loads(message)
            kind = data.get("type") if isinstance(data, dict) else None
            if kind in ("verdict", "alert"):
                emit(Pushed(kind, data))
            elif kind == "error":
                emit(Refused(f"the server ended the call: {data.get('reason') or data.get('code')}"))

    transceiver = pc.addTransceiver(track, direction="sendonly")
    capabilities = RTCRtpSender.getCapabilities("audio")
    transceiver.setCodecPreferences(
        [c for c in capabilities.codecs if c.mimeType.lower() == f"audio/{codec.lower()}"]
    )
    channel = pc.createDataChannel("vpmon")
    channel.on("message", on_message)
    channel.on("close", channel_closed.set)

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected":
            connected.set()
        elif pc.connectionState in ("failed", "closed"):
            if not track.finished.is_set():
                failure.append(f"the WebRTC connection {pc.connectionState} before the file was over")
            stopped.set()

    finished = asyncio.ensure_future(track.finished.wait())
    finished.add_done_callback(lambda _: stopped.set())
    began = clock()
    location: str | None = None
    try:
        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate: no trickle
        async with httpx.AsyncClient(timeout=options.open_timeout) as http:
            try:
                response = await http.post(url, content=pc.localDescription.sdp, headers=headers)
            except httpx.HTTPError as exc:
                raise StreamError(
                    f"cannot publish to {url}: {exc or type(exc).__name__}: is the server running "
                    "(vpmon serve)? check --url or VPMON_URL"
                ) from None
            if response.status_code != 201:
                raise StreamError(_refusal(url, "whip", response.status_code, response.content))
            location = urljoin(url, response.headers["location"])
            await pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
            result.accepted = True
            emit(Accepted({"type": "created", "location": location}))
            try:
                await asyncio.wait_for(connected.wait(), options.open_timeout)
            except TimeoutError:
                failure.append(f"no WebRTC connection within {options.open_timeout:g} s (ICE)")
            else:
                await stopped.wait()
            # The end of the call: the server drains its last windows, then answers.
            deleted = await http.delete(
                location,
                headers={"Authorization": headers["Authorization"]},
                timeout=options.close_timeout + 30,
            )
            result.close_reason = f"DELETE {deleted.status_code}"
            if deleted.status_code != 200 and not failure:
                failure.append(_refusal(location, "whip", deleted.status_code, deleted.content))
        with contextlib.suppress(TimeoutError):  # the last verdicts come before the channel's close
            await asyncio.wait_for(channel_closed.wait(), options.close_timeout)
    finally:
        finished.cancel()
        await pc.close()
    result.elapsed_seconds = clock() - began
    result.frames_sent = track.frames_sent
    result.media_seconds = track.media_seconds
    result.error = failure[0] if failure else None
    if result.error is None and track.frames_sent < track.frame_count:
        result.error = f"the call ended {result.media_seconds:.1f} s into the {audio.duration:.1f} s file"
    return result
