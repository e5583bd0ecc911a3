"""WHIP ingest (RFC 9725), sans-I/O: what a publish request says, and one WebRTC call's audio as events.

The asyncio shell (``streamer/whip.py``) owns the HTTP routes and the aiortc peer connection; this module
holds what can be decided without them:

- ``call_identity``: the call, agent and tenant ids of a ``POST /v1/whip``, from the ``Vpmon-Call-Id`` /
  ``Vpmon-Agent-Id`` / ``Vpmon-Tenant`` headers or the ``call_id`` / ``agent_id`` / ``tenant`` query
  parameters (a browser page may find the query easier; the two must agree when both are given);
- ``is_sdp`` and ``check_offer``: the body is an SDP offer with exactly one audio track that the publisher
  sends, in Opus or PCMU, no video, and the ICE credentials and DTLS fingerprint a connection needs;
- ``WhipCall``: the ``CallProtocol`` adapter of one call. The shell feeds it the audio frames aiortc has
  decoded (interleaved s16: Opus at 48 kHz stereo, PCMU at 8 kHz mono) with their RTP timestamps; it
  emits ``AudioChunk`` events on the media clock those timestamps give (a gap in them, from lost packets
  or a sender that stops sending in silence, becomes ``AudioDiscarded``, so windows keep their media
  times) and queues verdict and alert messages for the publisher's data channel, in the JSON of the
  native protocol's frames.

Refusals are ``WhipRefusal``s carrying the HTTP status and a detail that says what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from aiortc.sdp import SessionDescription

from streamer.protocols._common import AdapterBase, Phase, Violation
from streamer.protocols.events import (
    CLOSE_UNSUPPORTED_DATA,
    AudioChunk,
    AudioDiscarded,
    CallStarted,
)
from streamer.store import SPEAKER_RE, TENANT_RE

Codec = Literal["opus", "PCMU"]

MAX_OFFER_BYTES = 64 * 1024  # a browser's offer with every candidate is a few kB
# The audio aiortc's decoders give: (sample rate, channels) of interleaved s16.
DECODED_FORMATS: dict[Codec, tuple[int, int]] = {"opus": (48000, 2), "PCMU": (8000, 1)}
# A timestamp gap up to this long is audio the sender did not send (lost packets, silence suppression)
# and is filled with silence; a longer jump is a new RTP clock (the sender restarted its stream): the
# call's media clock then runs on without inventing minutes of silence.
MAX_GAP_SECONDS = 30.0
_TOLERANCE_SECONDS = 0.001  # timestamps this close to where the previous frame ended are contiguous

# (header, query parameter) for each id a request may carry
IDENTITY_FIELDS = {
    "call_id": ("vpmon-call-id", "call_id"),
    "agent_id": ("vpmon-agent-id", "agent_id"),
    "tenant": ("vpmon-tenant", "tenant"),
}


class WhipRefusal(Exception):
    """A publish request vpmon cannot take: ``status`` is the HTTP status, ``slug`` the problem type."""

    def __init__(self, status: int, detail: str, slug: str | None = None, title: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug
        self.title = title


# -------------------------------------------------------------------------------------------- request


@dataclass(frozen=True)
class CallIdentity:
    call_id: str | None  # None: the server names the call
    agent_id: str | None  # None: bound through the API (before or during the call), or unknown
    tenant: str | None  # None: the key's tenant


def call_identity(headers: Mapping[str, str], query: Mapping[str, str]) -> CallIdentity:
    """The ids of a publish request; ``headers`` with lower-case names (as Starlette gives them)."""
    values: dict[str, str | None] = {}
    for name, (header, parameter) in IDENTITY_FIELDS.items():
        from_header, from_query = headers.get(header), query.get(parameter)
        if from_header is not None and from_query is not None and from_header != from_query:
            raise WhipRefusal(
                400,
                f"{name} is {from_query!r} in the query but {from_header!r} in the {header} header: "
                "send it once",
            )
        value = from_header if from_header is not None else from_query
        if value is not None:
            pattern, alphabet = (
                (TENANT_RE, "1-64 of A-Z a-z 0-9 _ . -")
                if name == "tenant"
                else (
                    SPEAKER_RE,
                    "1-128 of A-Z a-z 0-9 _ . : @ + -",
                )
            )
            if not pattern.fullmatch(value):
                raise WhipRefusal(400, f"{name} {value[:40]!r} is invalid: use {alphabet}")
        values[name] = value
    return CallIdentity(**values)


def is_sdp(content_type: str | None) -> bool:
    """Whether a Content-Type header is ``application/sdp`` (parameters allowed, any case)."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "application/sdp"


@dataclass(frozen=True)
class OfferedAudio:
    """What the offer's audio track will carry, and whether the publisher opened a data channel."""

    codec: Codec
    data_channel: bool


# What aiortc's SDP parser raises on text it cannot read (it asserts as it goes).
_PARSE_ERRORS = (ValueError, AssertionError, KeyError, IndexError, StopIteration, TypeError, AttributeError)


def check_offer(sdp: str) -> OfferedAudio:
    """Check an SDP offer for what a vpmon call needs; ``WhipRefusal(400)`` says what is missing.

    The answer will accept one codec only (Opus if offered, else PCMU), so the format of the audio is
    known before the first packet arrives.
    """
    if not sdp.strip():
        raise WhipRefusal(
            400, "the request body is empty: send the SDP offer (RTCPeerConnection.createOffer)"
        )
    if not sdp.lstrip().startswith("v=0"):
        raise WhipRefusal(400, "the body is not an SDP offer: it must start with v=0")
    try:
        description = SessionDescription.parse(sdp)
    except _PARSE_ERRORS as exc:
        raise WhipRefusal(400, f"the SDP offer cannot be parsed: {exc or type(exc).__name__}") from None
    others = sorted({m.kind for m in description.media} - {"audio", "application"})
    if others:
        raise WhipRefusal(
            400,
            f"the offer has {' and '.join(others)} media: vpmon takes one audio track (and a data channel)",
        )
    audio = [m for m in description.media if m.kind == "audio"]
    if not audio:
        raise WhipRefusal(400, "the offer has no audio track: add the agent's microphone track")
    if len(audio) > 1:
        raise WhipRefusal(400, f"the offer has {len(audio)} audio tracks: publish one (the agent's) per call")
    track = audio[0]
    if track.direction not in (None, "sendrecv", "sendonly"):
        raise WhipRefusal(
            400, f"the audio track is {track.direction}: the publisher must send it (sendonly or sendrecv)"
        )
    offered = {(c.mimeType.lower(), c.clockRate) for c in track.rtp.codecs}
    if ("audio/opus", 48000) in offered:
        codec: Codec = "opus"
    elif ("audio/pcmu", 8000) in offered:
        codec = "PCMU"
    else:
        names = ", ".join(sorted({c.mimeType.split("/")[-1] for c in track.rtp.codecs})) or "no codec"
        raise WhipRefusal(400, f"the audio track offers {names}: vpmon takes Opus or PCMU")
    for media in description.media:  # aiortc would connect without a fingerprint, and then fail
        if not media.ice.usernameFragment or not media.ice.password:
            raise WhipRefusal(
                400, f"the offer's {media.kind} section has no ICE credentials (a=ice-ufrag, a=ice-pwd)"
            )
        if media.dtls is None:  # aiortc keeps no DTLS parameters for a section without a=setup
            raise WhipRefusal(400, f"the offer's {media.kind} section has no DTLS role (a=setup:actpass)")
        if not media.dtls.fingerprints:
            raise WhipRefusal(
                400, f"the offer's {media.kind} section has no DTLS fingerprint (a=fingerprint)"
            )
    return OfferedAudio(codec, any(m.kind == "application" for m in description.media))


# -------------------------------------------------------------------------------------------- one call


class WhipCall(AdapterBase):
    """One WebRTC call's audio (see the module docstring). ``start()`` queues ``CallStarted``; then
    ``receive_audio`` per decoded frame, and ``stop()`` when the publisher DELETEs the session."""

    pushes_verdicts = True  # verdict and alert frames, after a normal stop too

    def __init__(self, call_id: str, codec: Codec, agent_id: str | None = None) -> None:
        super().__init__()
        self.call_id = call_id
        self.codec = codec
        self.agent_id = agent_id
        self.sample_rate, self.channels = DECODED_FORMATS[codec]
        self._last_pts: int | None = None  # the previous frame's RTP timestamp, as sent (32 bits)
        self._last_start = 0  # where that frame started on the call's clock, in time-base ticks
        self._expected = Fraction(0)  # where the next frame should start, in seconds of media
        self.frames = 0
        self.frames_late = 0  # dropped: their place on the call's clock had passed
        self.discarded_seconds = 0.0

    def start(self) -> None:
        self._start(
            CallStarted(
                call_id=self.call_id,
                encoding="pcm16",
                sample_rate=self.sample_rate,
                channels=self.channels,
                agent_id=self.agent_id,
                # Opus is decoded to stereo; a browser's microphone is mono, so both channels are the same.
                agent_channel=0 if self.channels > 1 else None,
                metadata={"codec": self.codec},
            )
        )

    def stop(self, reason: str = "session deleted") -> None:
        """The publisher ended the session (DELETE), or the server shuts down: a normal end, the last
        verdicts still go out."""
        if self.phase is Phase.LIVE and not self._closing:
            self._stop("stop", reason)

    def receive_audio(
        self,
        pcm: bytes,
        *,
        sample_format: str,
        sample_rate: int,
        channels: int,
        pts: int | None,
        time_base: Fraction | None,
    ) -> None:
        """One decoded frame: ``pcm`` interleaved s16 (``sample_format`` "s16"), its RTP timestamp
        ``pts`` in units of ``time_base``."""
        if self._closing or self.phase is not Phase.LIVE:
            return
        try:
            self._audio(pcm, sample_format, sample_rate, channels, pts, time_base)
        except Violation as violation:
            self._violate(violation)

    def _audio(
        self,
        pcm: bytes,
        sample_format: str,
        sample_rate: int,
        channels: int,
        pts: int | None,
        time_base: Fraction | None,
    ) -> None:
        if (sample_format, sample_rate, channels) != ("s16", self.sample_rate, self.channels):
            raise Violation(
                CLOSE_UNSUPPORTED_DATA,
                f"decoded {self.codec} audio arrived as {sample_format} {sample_rate} Hz {channels} ch, "
                f"expected s16 {self.sample_rate} Hz {self.channels} ch",
            )
        if len(pcm) % (2 * channels):
            raise Violation(CLOSE_UNSUPPORTED_DATA, f"{len(pcm)} bytes are not whole s16 sample frames")
        duration = Fraction(len(pcm) // (2 * channels), sample_rate)
        start = self._media_start(pts, time_base)
        if start < self._expected - Fraction(_TOLERANCE_SECONDS):
            self.frames_late += 1
            return  # a frame again or late, whose place on the clock has passed: already heard
        gap = start - self._expected
        if gap > _TOLERANCE_SECONDS:
            self.discarded_seconds += float(gap)
            self._events.append(AudioDiscarded(media_time=float(self._expected), seconds=float(gap)))
        else:
            start = self._expected  # contiguous: no rounding drift
        self.frames += 1
        self._events.append(AudioChunk(pcm, media_time=float(start)))
        self._expected = start + duration

    def _media_start(self, pts: int | None, time_base: Fraction | None) -> Fraction:
        """Where a frame starts on the call's clock, from its 32-bit RTP timestamp (which starts at a
        random value and wraps around)."""
        if pts is None or time_base is None:
            return self._expected
        if self._last_pts is None:
            self._last_pts, self._last_start = pts, 0
            return self._expected  # the first frame starts the clock
        step = (pts - self._last_pts + 2**31) % 2**32 - 2**31  # signed distance, across a wrap
        start = (self._last_start + step) * time_base
        if abs(start - self._expected) > MAX_GAP_SECONDS:
            # A new RTP clock: re-anchor it where the call's clock stands.
            start = self._expected
            step = round(start / time_base) - self._last_start
        self._last_pts, self._last_start = pts, self._last_start + step
        return start

    # -- to the publisher (the data channel)

    def _queue_goodbye(self, code: int, reason: str) -> None:
        self._send_json({"type": "error", "code": code, "reason": reason})

    # -- from the publisher: the data channel carries nothing vpmon reads yet (room to grow)

    def _handle_text(self, text: str) -> None:
        pass

    def _handle_bytes(self, data: bytes) -> None:
        pass
