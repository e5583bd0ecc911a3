"""Twilio Media Streams, sans-I/O: Twilio's JSON text frames in, call events out.

The wire format (https://www.twilio.com/docs/voice/media-streams/websocket-messages): ``connected``, then
``start`` (stream and call ids, ``customParameters`` from the TwiML ``<Parameter>``s, the media format),
then ``media`` (base64 μ-law, 8 kHz mono, one track per message), ``mark`` and ``dtmf`` as they occur,
and ``stop``. The same format is spoken by several other carriers' "Twilio-compatible" streams.

Where the docs are silent, this adapter chooses (and the tests pin):

- ``sequenceNumber``: ``connected`` carries none; ``start`` carries the first ("1"). Counting starts at
  whatever ``start`` carries and every later message must carry the next number: a repeat, a step back or
  a gap is a protocol error (1002), as the number exists to detect exactly that. It is read as a decimal
  string (what Twilio sends) or a JSON integer.
- ``connected`` may be missing (some compatible carriers skip it); a second one, or one after ``start``,
  is a protocol error. Every other event needs ``start`` first, and must name the start's ``streamSid``.
- ``start`` must announce audio/x-mulaw, 8000 Hz, 1 channel (Twilio's only format) and, when it lists
  ``tracks``, the agent's track: a stream without the agent's voice cannot be verified, and failing at
  once names the TwiML fix. ``tenant`` and ``agent_id`` come from ``customParameters``.
- ``media`` with an empty payload yields no event; ``media.chunk`` is not checked (``sequenceNumber``
  already orders messages); ``media.timestamp`` (ms from the stream's start) becomes ``media_time``.
- ``mark`` and ``dtmf`` are accepted and produce no event: they say nothing about who is speaking.
- After ``stop`` (or any close) further messages are ignored: they crossed our close on the wire.
- Close codes follow ``_common``: 1003 for frames we cannot use (not JSON, unknown event, bad field,
  unsupported format, binary frames), 1002 for messages out of place, 1009 for oversized ones.
- ``send_verdict`` / ``send_alert`` do nothing: ``<Start><Stream>`` is one-way, and even a bidirectional
  ``<Connect><Stream>`` only takes media, mark and clear from us.

``twilio_signature`` / ``validate_twilio_signature`` check ``X-Twilio-Signature`` on the upgrade request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from streamer.protocols._common import (
    AdapterBase,
    Violation,
    check_speaker,
    check_tenant,
    get_object,
    is_int,
    json_type,
    parse_json_object,
    show,
)
from streamer.protocols.events import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
    AudioChunk,
    CallStarted,
)

Track = Literal["inbound", "outbound"]
TRACKS: tuple[Track, ...] = ("inbound", "outbound")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
# Twilio sends 20 ms (160 bytes) per message; a second of audio in one message means a broken client.
DEFAULT_MAX_PAYLOAD_BYTES = 8000
MEDIA_FORMAT = ("audio/x-mulaw", 8000, 1)  # encoding, sampleRate, channels: Twilio's only format

_COUNTER_RE = re.compile(r"[0-9]{1,15}")  # ASCII digits only: str.isdigit() also accepts "²"
_EVENTS = "connected, start, media, mark, dtmf or stop"


@dataclass(frozen=True)
class _Stream:
    stream_sid: str
    call_sid: str


def _counter(value: object) -> int | None:
    """A non-negative whole number sent as a decimal string (Twilio's way) or a JSON integer."""
    if is_int(value):
        return value if value >= 0 else None
    if isinstance(value, str) and _COUNTER_RE.fullmatch(value):
        return int(value)
    return None


class TwilioMediaStream(AdapterBase):
    """One Twilio Media Stream: feed it the websocket's frames, collect ``CallStarted``, ``AudioChunk``s
    (``is_agent`` from the track) and ``CallEnded``.

    ``agent_track`` is the track that carries the agent's voice: "outbound" on the customer's call leg
    (what the customer hears), "inbound" when the stream is on the agent's own leg.
    """

    def __init__(
        self,
        agent_track: Track = "outbound",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        if agent_track not in TRACKS:
            raise ValueError(f"agent_track must be 'inbound' or 'outbound', got {agent_track!r}")
        super().__init__()
        self.agent_track = agent_track
        self.max_message_bytes = max_message_bytes
        self.max_payload_bytes = max_payload_bytes
        self._connected = False
        self._stream: _Stream | None = None
        self._sequence: int | None = None  # the last sequenceNumber seen
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "start": self._on_start,
            "media": self._on_media,
            "mark": self._on_ignored,
            "dtmf": self._on_ignored,
            "stop": self._on_stop,
        }

    def _handle_bytes(self, data: bytes) -> None:
        raise Violation(
            CLOSE_UNSUPPORTED_DATA,
            f"binary frame of {len(data)} bytes: Twilio Media Streams send JSON text only",
        )

    def _handle_text(self, text: str) -> None:
        message = parse_json_object(text, self.max_message_bytes)
        event = message.get("event")
        if not isinstance(event, str):
            got = "none" if event is None else json_type(event)
            raise Violation(
                CLOSE_UNSUPPORTED_DATA, f'message has no "event" string (got {got}): expected {_EVENTS}'
            )
        if event == "connected":
            self._on_connected()
            return
        handler = self._handlers.get(event)
        if handler is None:
            raise Violation(CLOSE_UNSUPPORTED_DATA, f"unknown event {show(event)}: expected {_EVENTS}")
        if event == "start" and self._stream is not None:
            raise Violation(CLOSE_PROTOCOL_ERROR, "second start message: a stream starts once")
        if event != "start" and self._stream is None:
            raise Violation(CLOSE_PROTOCOL_ERROR, f"{event} message before start: Twilio sends start first")
        self._check_sequence(message, event)
        if self._stream is not None:
            self._check_stream_sid(message, event, self._stream.stream_sid)
        handler(message)

    def _on_connected(self) -> None:
        if self._stream is not None:
            raise Violation(CLOSE_PROTOCOL_ERROR, "connected message after start: it must come first")
        if self._connected:
            raise Violation(CLOSE_PROTOCOL_ERROR, "second connected message: it is sent once")
        self._connected = True

    def _check_sequence(self, message: dict[str, Any], event: str) -> None:
        raw = message.get("sequenceNumber")
        number = _counter(raw)
        if number is None:
            what = "no sequenceNumber" if raw is None else f"sequenceNumber {show(raw)}, not a whole number"
            raise Violation(CLOSE_UNSUPPORTED_DATA, f"{event} message has {what}")
        last = self._sequence
        if last is not None and number != last + 1:
            if number <= last:
                reason = f"{event} sequenceNumber {number} after {last}: repeated or out of order"
            else:
                lost = number - last - 1
                reason = f"{event} sequenceNumber jumped from {last} to {number}: {lost} message(s) lost"
            raise Violation(CLOSE_PROTOCOL_ERROR, reason)
        self._sequence = number

    @staticmethod
    def _check_stream_sid(message: dict[str, Any], event: str, stream_sid: str) -> None:
        sid = message.get("streamSid")
        if sid is None:
            raise Violation(CLOSE_UNSUPPORTED_DATA, f"{event} message has no streamSid")
        if sid != stream_sid:
            raise Violation(
                CLOSE_PROTOCOL_ERROR, f"{event} for stream {show(sid)}, not this stream {stream_sid}"
            )

    def _on_start(self, message: dict[str, Any]) -> None:
        start = get_object(message, "start", "start")
        # Ids go into logs, metrics and keys: the store's id alphabet (Twilio's "CA" + 32 hex, UUIDs) fits.
        stream_sid = check_speaker(start.get("streamSid"), "start.streamSid")
        call_sid = check_speaker(start.get("callSid"), "start.callSid")
        account_sid = start.get("accountSid")
        if account_sid is not None:
            account_sid = check_speaker(account_sid, "start.accountSid")
        self._check_stream_sid(message, "start", stream_sid)

        media_format = get_object(start, "mediaFormat", "start.mediaFormat")
        received = tuple(media_format.get(key) for key in ("encoding", "sampleRate", "channels"))
        # Compare types too: JSON true == 1 and 8000.0 == 8000 in Python, but not on the wire.
        if received != MEDIA_FORMAT or not all(is_int(value) for value in received[1:]):
            encoding, rate, channels = (show(value) for value in received)
            raise Violation(
                CLOSE_UNSUPPORTED_DATA,
                f"mediaFormat {encoding}, {rate} Hz, {channels} ch is not supported: "
                "Twilio streams audio/x-mulaw, 8000 Hz, 1 ch",
            )

        tracks = start.get("tracks")
        if tracks is not None:
            if not isinstance(tracks, list) or not all(track in TRACKS for track in tracks):
                raise Violation(
                    CLOSE_UNSUPPORTED_DATA, f"start.tracks {show(tracks)} is not a list of inbound/outbound"
                )
            if self.agent_track not in tracks:
                raise Violation(
                    CLOSE_UNSUPPORTED_DATA,
                    f'stream lacks the agent\'s {self.agent_track} track: set <Stream track="both_tracks">',
                )

        parameters = start.get("customParameters", {})
        if not isinstance(parameters, dict):
            raise Violation(
                CLOSE_UNSUPPORTED_DATA,
                f"start.customParameters must be an object, got {json_type(parameters)}",
            )
        tenant = check_tenant(parameters.get("tenant"), "customParameters.tenant")
        agent_id = parameters.get("agent_id")
        if agent_id is not None:
            agent_id = check_speaker(agent_id, "customParameters.agent_id")

        metadata = {"streamSid": stream_sid}
        if account_sid is not None:
            metadata["accountSid"] = account_sid
        if tracks is not None:
            metadata["tracks"] = ",".join(tracks)
        self._stream = _Stream(stream_sid=stream_sid, call_sid=call_sid)
        self._start(
            CallStarted(
                call_id=call_sid,
                encoding="mulaw",
                sample_rate=8000,
                channels=1,
                tenant=tenant,
                agent_id=agent_id,
                metadata=metadata,
            )
        )

    def _on_media(self, message: dict[str, Any]) -> None:
        media = get_object(message, "media", "media")
        track = media.get("track")
        if track not in TRACKS:
            raise Violation(CLOSE_UNSUPPORTED_DATA, f"media.track {show(track)} is not inbound or outbound")
        encoded = media.get("payload")
        if not isinstance(encoded, str):
            got = "missing" if encoded is None else f"a {json_type(encoded)}"
            raise Violation(CLOSE_UNSUPPORTED_DATA, f"media.payload must be a base64 string, got {got}")
        # base64 grows data by 4/3: refuse before decoding what cannot fit.
        if len(encoded) > (self.max_payload_bytes + 2) // 3 * 4:
            raise Violation(
                CLOSE_TOO_BIG,
                f"media.payload of about {len(encoded) * 3 // 4} bytes exceeds the "
                f"{self.max_payload_bytes}-byte limit (Twilio sends 160)",
            )
        try:
            payload = base64.b64decode(encoded, validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            raise Violation(
                CLOSE_UNSUPPORTED_DATA, f"media.payload {show(encoded)} is not valid base64"
            ) from None
        if len(payload) > self.max_payload_bytes:  # the length check above lets up to 2 bytes more through
            raise Violation(
                CLOSE_TOO_BIG,
                f"media.payload of {len(payload)} bytes exceeds the {self.max_payload_bytes}-byte limit "
                "(Twilio sends 160)",
            )
        timestamp = media.get("timestamp")
        media_time = None
        if timestamp is not None:
            milliseconds = _counter(timestamp)
            if milliseconds is None:
                raise Violation(
                    CLOSE_UNSUPPORTED_DATA, f"media.timestamp {show(timestamp)} is not a whole number of ms"
                )
            media_time = milliseconds / 1000
        if payload:
            self._events.append(
                AudioChunk(payload, is_agent=track == self.agent_track, media_time=media_time)
            )

    def _on_ignored(self, message: dict[str, Any]) -> None:
        """mark and dtmf: valid in a stream, no bearing on whose voice is on the line."""

    def _on_stop(self, message: dict[str, Any]) -> None:
        self._stop("stop", "stream stopped")


# -------------------------------------------------------------------------------------------- signatures

_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Twilio's request signature: base64 HMAC-SHA1, keyed with the auth token, of the full URL followed
    by every POST parameter's name and value, sorted by name, with no separators.

    A websocket upgrade (GET) has no POST parameters: pass the URL alone.
    """
    data = url + "".join(name + params[name] for name in sorted(params or {}))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def validate_twilio_signature(
    auth_token: str, url: str, signature: str, params: Mapping[str, str] | None = None
) -> bool:
    """Whether ``signature`` (the ``X-Twilio-Signature`` header) signs this request, compared in constant
    time. ``params`` are the POST form fields, one value per name. Like Twilio's own SDKs, the URL is also
    tried without its port and with the scheme's default port, as a proxy in front of us may add or drop
    it."""
    given = signature.encode("utf-8", "surrogatepass")
    return any(
        hmac.compare_digest(twilio_signature(auth_token, candidate, params).encode(), given)
        for candidate in _port_variants(url)
    )


def _port_variants(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bad port or bracketed host (the Host header is the client's): the URL as given
        return [url]
    userinfo, at, host = parts.netloc.rpartition("@")
    prefix = userinfo + at
    if port is not None:
        host = host[: host.rfind(":")]
    variants = [url, urlunsplit(parts._replace(netloc=prefix + host))]
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    if default is not None:
        variants.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}")))
    return list(dict.fromkeys(variants))
