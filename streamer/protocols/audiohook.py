"""Genesys Cloud AudioHook protocol v2 (the AudioHook Monitor role), sans-I/O: frames in, call events out.

Sources, in order of authority (the developer-center pages themselves are not in our document store, so
every fact below was taken from what Genesys published around them and is cited):

- [REF] purecloudlabs/audiohook-reference-implementation, Genesys' own TypeScript client and server:
  ``app/audiohook/src/protocol/{core,message,validators}.ts`` (message types, parameters, the
  ``PT{number}S`` duration form), ``server/serversessionimpl.ts`` (what a server checks and answers),
  ``client/clientsessionimpl.ts`` (what a compliant client accepts from a server),
  ``httpsignature/signature-verifier.ts`` and ``app/src/authenticator.ts`` (signature checks),
  ``test/audiohook-api-messages.test.ts`` and ``test/api-test-utils.ts`` (Genesys' server test suite).
- [WALK] developer.genesys.cloud/devapps/audiohook/session-walkthrough#establishing-connection: the
  example signed upgrade request, as quoted (with its secret) in the reference's
  ``signature-verifier.test.ts`` and in the Genesys developer forum threads 18703 and 30500.
- [HELP] help.mypurecloud.com FAQ "What happens during a successful session between Genesys Cloud and
  your AudioHook server?" and the developer-center "Features" page (AudioHook Monitor: "no in band data
  can be sent back to the client. Data returned by the server will be silently ignored").
- [FORUM] developer.genesys.cloud/forum/t/21187: a connection probe as Genesys sends it (open with the
  all-zero conversationId and participant id, then close as soon as ``opened`` arrives).

The protocol, as this adapter implements it:

- Every text frame is one JSON object ``{version: "2", id, type, seq, parameters, ...}`` [REF message.ts].
  Client messages add ``serverseq`` (the last server seq seen) and ``position`` (the media position);
  server messages add ``clientseq`` (the last client seq processed) and carry no ``position``.
  ``seq`` counts from 1 on each side, +1 per message; a client ``serverseq`` above our ``seq`` is an
  error [REF serversessionimpl.ts onTextMessage]. ``id`` is the session id (the Audiohook-Session-Id
  header). Durations are ``PT{number}S`` only, number = non-negative decimal [REF core.ts, validators.ts].
- Client messages: open, close, discarded, error, ping, update, paused, resumed [REF message.ts
  ClientMessage]. Server messages: opened, closed, pong, updated, disconnect, pause, resume, event,
  reconnect [REF ServerMessage]. The *client* reports ``paused`` / ``resumed`` (a hold, a secure pause,
  or the answer to a server ``pause``/``resume``); the server does not answer them [HELP; REF
  onPausedMessage]. ``resumed`` and ``discarded`` carry ``{start, discarded}``: where the gap began and
  how long it is; the stream position moves past the gap [REF test suite: resumed(start = position of
  the paused message, discarded = PT10S); mediasource-wav.ts].
- open → opened ``{media: [one offer, its fields as offered] or [], startPaused}``; "the server can select an
  empty array" [REF api-test-utils.ts validateMediaParams; client onOpenedMessage], and must not select
  more than one. ``supportedLanguages: []`` is added when the open asked for it [REF runSupportedLanguages].
- ping → pong ``{}``, whose ``clientseq`` the client checks against its ping's ``seq`` [REF client
  onPongMessage]. close → closed ``{}``; the client then closes the websocket
  ("It is always the client that initiates and terminates the session" [HELP]).
- Every message carries ``parameters``, ``{}`` when empty [REF validators.ts isMessageBase].
- The server ends a session with ``disconnect {reason: "completed" | "unauthorized" | "error", info?}``
  [REF DisconnectReason]; a compliant client answers with ``close {reason: "disconnect"}``, waits for
  ``closed`` and then closes the websocket [REF client onDisconnectMessage]. So after a ``disconnect``
  this adapter does NOT set ``close_requested``: it waits for the client's ``close`` (``awaiting_close``
  is True meanwhile), answers ``closed`` and only then asks for the close. If the client never
  completes that transaction, the I/O layer calls ``close_timeout_expired()`` after
  ``CLOSE_TIMEOUT_SECONDS`` (the reference client gives up on a close transaction after 10 s).
- Audio: binary frames, headerless, channels interleaved in the order of the selected offer; a frame's
  size must be a whole number of sample frames [REF audioframe.ts createAudioFrame]. Audio before
  ``opened`` or while paused is an error [REF onBinaryMessage: audio only in state ACTIVE].
- Authentication happens on the upgrade request, is signalled in-band on ``open`` as ``disconnect
  unauthorized`` [REF authenticator.ts], and also requires the open's ``organizationId`` to equal the
  Audiohook-Organization-Id header.
- Probe: an ``open`` whose conversationId is all zeros tests the connection; it is answered like any open
  and the client closes at once [FORUM]. It is authenticated too (that is what the probe tests).

Where the sources are silent, this adapter chooses (and the tests pin):

- Media choice: stereo with both "external" and "internal" (either order) > mono "internal" > mono
  "external" (``accept_external_only``), each in the order of ``formats`` (PCMU only by default; "L16"
  may be enabled: 16-bit samples, read little-endian as the reference does). No usable offer: opened
  with ``media: []``, no ``CallStarted``, and any audio after that is an error.
- ``CallStarted.agent_channel`` is the index of "internal" in the selected channels; with external-only
  audio it is None, ``metadata["agentChannel"]`` is "none" and every ``AudioChunk`` has ``is_agent=False``
  (the chunks are the customer's voice: the pipeline must not verify them against the agent).
- A probe yields no events at all: the pipeline never sees it (``is_probe`` says so to the I/O layer).
- The media position starts at the open's ``position``, advances by the audio received (8000 samples/s)
  and jumps to ``start + discarded`` on ``discarded`` and ``resumed`` (never backwards).
  ``AudioChunk.media_time`` is the position where the chunk starts, in seconds. The ``position`` of
  later messages is checked for form but not followed: whether it counts audio captured or audio sent
  (they differ while the client replays what it buffered before ``opened``) is not stated anywhere.
- Before ``open`` only open, ping, error and close are accepted; a second ``open`` is an error.
  ``paused`` when paused, ``resumed`` when not paused: ignored (no event), as the reference does.
  The Audio Connector's client messages (dtmf, playback_started, playback_completed) are ignored;
  any other type is an error.
- While awaiting the client's ``close`` after a ``disconnect``, bad input is ignored, audio is dropped,
  ping is still answered, and ``seq`` only has to rise (a message we rejected may have used a number).
- update → updated ``{}``: ``updated`` (no parameters) is a server message type [REF message.ts], which
  only makes sense as this answer; the reference server sends none and its client accepts it anywhere.
- ``close`` is honoured with any (or no) reason string; ``CallEnded.reason`` is that reason.
- ``fail(code, reason)``: disconnect reason "unauthorized" for 4001, "completed" for 1000, else "error";
  ``info`` is the reason. A ``fail`` while the client's close is awaited closes at once.
- ``send_verdict`` / ``send_alert`` do nothing: an AudioHook Monitor client ignores data from the server
  [HELP "Features"], and the reference client reads ``entities[0].type`` of ``event`` messages expecting
  its own entity types (transcript, agent assist), so there is no safe channel back.
- Close codes, as in ``_common``: 1002 out of place (seq, id, audio before opened), 1003 unusable (not
  JSON, bad field, unknown type, audio size), 1009 too big, 4001 unauthorized, 1000 after a normal close.

``required_headers_missing`` and ``verify_message_signature`` check the upgrade request (HTTP Message
Signatures, draft-ietf-httpbis-message-signatures as Genesys uses it: hmac-sha256 over
``@request-target``, ``@authority`` and the four AudioHook headers, keyed by the base64 client secret;
``keyid`` = X-API-KEY, a nonce, ``created``/``expires``) [REF signature-verifier.ts, authenticator.ts].
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from streamer.protocols._common import Violation, fit_close_reason, is_int, json_type, parse_json_object, show
from streamer.protocols.events import (
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_DATA,
    AudioChunk,
    AudioDiscarded,
    CallEnded,
    CallPaused,
    CallProtocol,
    CallResumed,
    CallStarted,
    CloseRequest,
    Encoding,
    Event,
    ProtocolViolation,
)

PROTOCOL_VERSION = "2"
NULL_UUID = "00000000-0000-0000-0000-000000000000"
SAMPLE_RATE = 8000  # the only rate AudioHook defines [REF core.ts MediaRate]
CHANNEL_NAMES = ("external", "internal")  # external = the customer, internal = what the customer hears
FORMATS = {"PCMU": ("mulaw", 1), "L16": ("pcm16", 2)}  # AudioHook format → (our encoding, bytes/sample)

DEFAULT_MAX_FRAME_BYTES = 512_000  # 32 s of stereo PCMU: room for the ~30 s replayed after opened
DEFAULT_MAX_TEXT_CHARS = 65_535  # the reference server's and client's limit on a text message
CLOSE_TIMEOUT_SECONDS = 10.0  # how long to wait for the client's close after a disconnect

REQUIRED_HEADERS = (
    "Audiohook-Organization-Id",
    "Audiohook-Session-Id",
    "Audiohook-Correlation-Id",
    "X-API-KEY",
)
SIGNED_COMPONENTS = (
    "@request-target",
    "@authority",
    "audiohook-organization-id",
    "audiohook-session-id",
    "audiohook-correlation-id",
    "x-api-key",
)
SIGNATURE_MAX_AGE_SECONDS = 10  # the reference server's maxSignatureAge
SIGNATURE_CLOCK_SKEW_SECONDS = 3  # the reference verifier's MAX_CLOCK_SKEW
SIGNATURE_MIN_NONCE_CHARS = 22  # the reference server's minimum (16 random bytes in base64)

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DURATION_RE = re.compile(r"PT((?:[0-9]*\.)?[0-9]+)S")  # [REF validators.ts durationRegex]
_MAX_DURATION_NS = 2**53 - 1  # the reference keeps positions as nanoseconds below 2^53
_NS_PER_SECOND = 1_000_000_000
_IGNORED_TYPES = frozenset({"dtmf", "playback_started", "playback_completed"})  # Audio Connector only
_CLIENT_TYPES = "open, ping, update, paused, resumed, discarded, error or close"


# ---------------------------------------------------------------------------------------------- durations


def _duration_ns(text: object) -> int | None:
    """A ``PT{number}S`` duration in whole nanoseconds (half-even), or None if it is not one."""
    if not isinstance(text, str) or len(text) > 40:
        return None
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        return None
    nanoseconds = int((Decimal(match.group(1)) * _NS_PER_SECOND).to_integral_value(ROUND_HALF_EVEN))
    return nanoseconds if nanoseconds <= _MAX_DURATION_NS else None


def _format_ns(nanoseconds: int) -> str:
    whole, fraction = divmod(nanoseconds, _NS_PER_SECOND)
    if fraction == 0:
        return f"PT{whole}S"
    return f"PT{whole}.{fraction:09d}".rstrip("0") + "S"


def parse_duration(text: str) -> float:
    """Seconds in an AudioHook duration: ``"PT6.3S"`` → 6.3.

    AudioHook writes every duration as ``PT{number}S``, the number a non-negative decimal ("PT0S",
    "PT12.125S", "PT.5S"); other ISO 8601 forms (minutes, hours, signs, exponents) are not AudioHook
    durations and raise ``ValueError``, as do values the reference cannot hold (2^53 ns, about 104 days).
    """
    nanoseconds = _duration_ns(text)
    if nanoseconds is None:
        raise ValueError(f"{text!r} is not an AudioHook duration: use PT<seconds>S, e.g. PT6.3S")
    return nanoseconds / _NS_PER_SECOND


def format_duration(seconds: float) -> str:
    """An AudioHook duration for ``seconds``: 6.3 → ``"PT6.3S"``, 0 → ``"PT0S"``, 1.5e-3 → ``"PT0.0015S"``.

    Nanosecond resolution, no trailing zeros, never an exponent (the reference reads ``PT{number}S``).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float | Decimal):
        raise TypeError(f"seconds must be a number, got {type(seconds).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration is a finite, non-negative number of seconds, got {seconds!r}")
    nanoseconds = int((Decimal(str(seconds)) * _NS_PER_SECOND).to_integral_value(ROUND_HALF_EVEN))
    if nanoseconds > _MAX_DURATION_NS:
        raise ValueError(f"{seconds} s is longer than an AudioHook duration can be (2^53 ns)")
    return _format_ns(nanoseconds)


# ---------------------------------------------------------------------------------------------- session


class State(enum.Enum):
    AWAITING_OPEN = "awaiting open"
    OPEN = "open"  # opened sent; audio flows
    PAUSED = "paused"  # the client said paused
    DISCONNECTING = "disconnecting"  # disconnect sent; waiting for the client's close
    CLOSED = "closed"  # closed sent; close_requested set
    LOST = "lost"  # the socket went away under us


class AudioHookSession(CallProtocol):
    """One AudioHook session (one websocket), server side, for a server that only receives audio.

    ``session_id`` is the Audiohook-Session-Id header; ``auth_error`` is None when the X-API-KEY (and the
    signature, if the key has a client secret) were valid, else why not (see ``verify_message_signature``);
    ``organization_id``, when given, is the Audiohook-Organization-Id header, which the open's
    ``organizationId`` must equal. ``formats`` lists the AudioHook formats to accept, preferred first.
    """

    def __init__(
        self,
        session_id: str,
        auth_error: str | None,
        *,
        organization_id: str | None = None,
        formats: Sequence[str] = ("PCMU",),
        accept_external_only: bool = True,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    ) -> None:
        if not isinstance(session_id, str) or not _UUID_RE.fullmatch(session_id):
            raise ValueError(
                f"session_id must be the Audiohook-Session-Id header, a UUID, got {session_id!r}: "
                "check required_headers_missing() before creating the session"
            )
        unknown = [name for name in formats if name not in FORMATS]
        if not formats or unknown or len(set(formats)) != len(formats):
            raise ValueError(f"formats must be distinct names among {sorted(FORMATS)}, got {list(formats)}")
        if max_frame_bytes < 2 or max_text_chars < 1:
            raise ValueError("max_frame_bytes must be >= 2 and max_text_chars >= 1")
        self.session_id = session_id
        self.auth_error = auth_error
        self.organization_id = organization_id
        self.formats = tuple(formats)
        self.accept_external_only = accept_external_only
        self.max_frame_bytes = max_frame_bytes
        self.max_text_chars = max_text_chars

        self.close_requested: CloseRequest | None = None
        self.state = State.AWAITING_OPEN
        self.is_probe = False
        self.conversation_id: str | None = None
        self.selected_media: dict[str, Any] | None = None  # the offer echoed in opened, None if none
        self.language: str | None = None
        self.last_rtt: float | None = None  # seconds, from the client's last ping
        self.client_error: tuple[int, str] | None = None  # the client's last error message (code, message)

        self._seq = 0  # the last server seq sent
        self._clientseq = 0  # the last client seq processed
        self._position_ns = 0
        self._frame_bytes = 1  # bytes per sample frame (all channels) of the selected media
        self._is_agent = True
        self._started = False  # CallStarted emitted
        self._ended = False  # CallEnded emitted
        self._pending_close = CloseRequest(CLOSE_NORMAL, "session closed")
        self._events: list[Event] = []
        self._outgoing: list[str | bytes] = []
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "open": self._on_open,
            "ping": self._on_ping,
            "update": self._on_update,
            "paused": self._on_paused,
            "resumed": self._on_resumed,
            "discarded": self._on_discarded,
            "error": self._on_error,
            "close": self._on_close,
        }

    # -- the CallProtocol interface

    @property
    def position(self) -> float:
        """The media position in seconds: where the next audio frame starts."""
        return self._position_ns / _NS_PER_SECOND

    @property
    def awaiting_close(self) -> bool:
        """A disconnect was sent and the client's close has not come: arm a ``CLOSE_TIMEOUT_SECONDS`` timer
        that calls ``close_timeout_expired()``."""
        return self.state is State.DISCONNECTING

    def receive_text(self, text: str) -> None:
        if self.state in (State.CLOSED, State.LOST):
            return  # crossed our closed on the wire
        ending = self.state is State.DISCONNECTING
        try:
            message = self._parse(text, lenient_seq=ending)
            if ending:
                if message["type"] in ("close", "ping"):
                    self._handlers[message["type"]](message)
                return
            handler = self._handlers.get(message["type"])
            if handler is None:
                if message["type"] in _IGNORED_TYPES:
                    return
                raise Violation(
                    CLOSE_UNSUPPORTED_DATA,
                    f"unknown message type {show(message['type'])}: expected {_CLIENT_TYPES}",
                )
            if self.state is State.AWAITING_OPEN and message["type"] not in (
                "open",
                "ping",
                "error",
                "close",
            ):
                raise Violation(CLOSE_PROTOCOL_ERROR, f"{message['type']} message before open")
            handler(message)
        except Violation as violation:
            if not ending:
                self._violate(violation)

    def receive_bytes(self, data: bytes) -> None:
        if self.state in (State.CLOSED, State.LOST, State.DISCONNECTING):
            return  # audio that crossed our disconnect or closed
        try:
            self._on_audio(data)
        except Violation as violation:
            self._violate(violation)

    def events_received(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[str | bytes]:
        data, self._outgoing = self._outgoing, []
        return data

    def connection_lost(self) -> None:
        self.state = State.LOST
        self._end("connection lost")

    def fail(self, code: int, reason: str) -> None:
        """End the session from our side: send ``disconnect`` (its reason from ``code``), await the close.

        Called again while the close is awaited (an idle timeout, a shutdown), it closes at once, as
        ``close_timeout_expired`` does.
        """
        if self.state is State.DISCONNECTING:
            self.close_timeout_expired()
        if self.state in (State.DISCONNECTING, State.CLOSED, State.LOST):
            return
        if code == CLOSE_UNAUTHORIZED:
            wire_reason = "unauthorized"
        elif code == CLOSE_NORMAL:
            wire_reason = "completed"
        else:
            wire_reason = "error"
        self._disconnect(wire_reason, reason, code)
        self._end(reason)

    def close_timeout_expired(self) -> None:
        """The client did not answer our disconnect with a close in time: close the websocket anyway."""
        if self.state is State.DISCONNECTING:
            self.state = State.CLOSED
            self.close_requested = self._pending_close

    def send_verdict(self, verdict: Mapping[str, object]) -> None:
        """Nothing: an AudioHook Monitor client ignores what the server sends (see the module doc)."""

    def send_alert(self, alert: Mapping[str, object]) -> None:
        """Nothing, as ``send_verdict``."""

    # -- envelope

    def _parse(self, text: str, *, lenient_seq: bool) -> dict[str, Any]:
        """Check a client message's envelope in the reference server's order; return the message."""
        if len(text) > self.max_text_chars:
            raise Violation(
                CLOSE_TOO_BIG,
                f"text message of {len(text)} characters exceeds the {self.max_text_chars} limit",
            )
        message = parse_json_object(text, 4 * self.max_text_chars)
        version = message.get("version")
        if version != PROTOCOL_VERSION:
            raise Violation(CLOSE_UNSUPPORTED_DATA, f'version {show(version)} is not supported: expected "2"')
        for key, check, what in (
            ("id", _is_uuid, "a UUID"),
            ("type", _is_str, "a string"),
            ("seq", _is_count, "a non-negative integer"),
            ("serverseq", _is_count, "a non-negative integer"),
            ("position", _is_duration, "a duration PT<seconds>S"),
            ("parameters", _is_object, "an object"),
        ):
            value = message.get(key)
            if not check(value):
                got = "missing" if key not in message else show(value)
                raise Violation(
                    CLOSE_UNSUPPORTED_DATA, f"client message field {key} must be {what}, got {got}"
                )
        seq = message["seq"]
        if seq != self._clientseq + 1 and not (lenient_seq and seq > self._clientseq):
            raise Violation(
                CLOSE_PROTOCOL_ERROR,
                f"{message['type']} message has seq {seq} after {self._clientseq}: seq must rise by 1",
            )
        self._clientseq = seq
        if message["serverseq"] > self._seq:
            raise Violation(
                CLOSE_PROTOCOL_ERROR,
                f"serverseq {message['serverseq']} is above the last server seq {self._seq}",
            )
        if message["id"].lower() != self.session_id.lower():
            raise Violation(
                CLOSE_PROTOCOL_ERROR, f"message id {message['id']} is not this session's id {self.session_id}"
            )
        return message

    # -- client messages

    def _on_open(self, message: dict[str, Any]) -> None:
        if self.state is not State.AWAITING_OPEN:
            raise Violation(CLOSE_PROTOCOL_ERROR, "second open message: a session opens once")
        params = message["parameters"]
        organization_id = _get(params, "organizationId", _is_uuid, "a UUID", "open")
        conversation_id = _get(params, "conversationId", _is_uuid, "a UUID", "open")
        participant = _get(params, "participant", _is_object, "an object", "open")
        offers = _get(params, "media", _is_list, "an array", "open")
        for key in ("id", "ani", "aniName", "dnis"):
            _get(participant, key, _is_str, "a string", "open participant", required=False)
        language = _get(params, "language", _is_str, "a string", "open", required=False)
        wants_languages = _get(params, "supportedLanguages", _is_bool, "a boolean", "open", required=False)
        custom_config = _get(params, "customConfig", _is_object, "an object", "open", required=False)
        for index, offer in enumerate(offers):
            _check_offer(offer, index)

        self.conversation_id = conversation_id
        self.is_probe = conversation_id == NULL_UUID
        if self.auth_error is not None:
            self._disconnect("unauthorized", self.auth_error, CLOSE_UNAUTHORIZED)
            return
        if self.organization_id is not None and organization_id.lower() != self.organization_id.lower():
            self._disconnect(
                "unauthorized",
                "organizationId of the open message does not match the Audiohook-Organization-Id header",
                CLOSE_UNAUTHORIZED,
            )
            return

        self.language = language
        self._position_ns = _duration_ns(message["position"]) or 0
        selected = self._select(offers)
        self.selected_media = selected
        opened: dict[str, Any] = {"media": [selected] if selected is not None else [], "startPaused": False}
        if wants_languages:
            opened["supportedLanguages"] = []  # we transcribe nothing
        self._send("opened", opened)
        self.state = State.OPEN
        if selected is None:
            return
        channels: list[str] = selected["channels"]
        encoding, bytes_per_sample = FORMATS[selected["format"]]
        self._frame_bytes = bytes_per_sample * len(channels)
        agent_channel = channels.index("internal") if "internal" in channels else None
        self._is_agent = agent_channel is not None
        if self.is_probe:
            return  # a connection test: the pipeline never hears of it
        metadata = {
            "protocol": "audiohook",
            "sessionId": self.session_id,
            "organizationId": organization_id,
            "conversationId": conversation_id,
            "participantId": participant.get("id", ""),
            "ani": participant.get("ani", ""),
            "aniName": participant.get("aniName", ""),
            "dnis": participant.get("dnis", ""),
            "mediaFormat": selected["format"],
            "mediaChannels": ",".join(channels),
            "agentChannel": "internal" if agent_channel is not None else "none",
            "startPosition": _format_ns(self._position_ns),
        }
        if language is not None:
            metadata["language"] = language
        if custom_config is not None:
            metadata["customConfig"] = json.dumps(custom_config, sort_keys=True, separators=(",", ":"))
        self._started = True
        self._events.append(
            CallStarted(
                call_id=conversation_id,
                encoding=_encoding(encoding),
                sample_rate=SAMPLE_RATE,
                channels=len(channels),
                tenant=None,
                agent_id=None,
                agent_channel=agent_channel,
                metadata=metadata,
            )
        )

    def _select(self, offers: list[Any]) -> dict[str, Any] | None:
        layouts: list[Callable[[list[str]], bool]] = [
            lambda ch: sorted(ch) == ["external", "internal"],
            lambda ch: ch == ["internal"],
        ]
        if self.accept_external_only:
            layouts.append(lambda ch: ch == ["external"])
        for layout in layouts:
            for media_format in self.formats:
                for offer in offers:
                    if (
                        offer["type"] == "audio"
                        and offer["format"] == media_format
                        and offer["rate"] == SAMPLE_RATE
                        and layout(offer["channels"])
                    ):
                        # Echo the offer's four fields (an extra field could hold what JSON cannot carry).
                        return {key: offer[key] for key in ("type", "format", "channels", "rate")}
        return None

    def _on_ping(self, message: dict[str, Any]) -> None:
        rtt = _get(message["parameters"], "rtt", _is_duration, "a duration", "ping", required=False)
        if rtt is not None:
            self.last_rtt = parse_duration(rtt)
        self._send("pong", {})

    def _on_update(self, message: dict[str, Any]) -> None:
        language = _get(message["parameters"], "language", _is_str, "a string", "update", required=False)
        if language is not None:
            self.language = language
        self._send("updated", {})

    def _on_paused(self, message: dict[str, Any]) -> None:
        if self.state is State.OPEN:
            self.state = State.PAUSED
            if self._started:
                self._events.append(CallPaused())

    def _on_resumed(self, message: dict[str, Any]) -> None:
        params = message["parameters"]
        start = _get(params, "start", _is_duration, "a duration", "resumed")
        discarded = _get(params, "discarded", _is_duration, "a duration", "resumed")
        if self.state is State.PAUSED:
            self.state = State.OPEN
            self._skip(start, discarded)
            if self._started:
                self._events.append(CallResumed())

    def _on_discarded(self, message: dict[str, Any]) -> None:
        params = message["parameters"]
        start = _get(params, "start", _is_duration, "a duration", "discarded")
        discarded = _get(params, "discarded", _is_duration, "a duration", "discarded")
        self._skip(start, discarded)
        if self._started:
            self._events.append(AudioDiscarded(parse_duration(start), parse_duration(discarded)))

    def _skip(self, start: str, discarded: str) -> None:
        """A gap in the audio from ``start`` lasting ``discarded``: the next audio starts after it."""
        gap_end = (_duration_ns(start) or 0) + (_duration_ns(discarded) or 0)
        self._position_ns = max(self._position_ns, gap_end)  # media_time never goes back

    def _on_error(self, message: dict[str, Any]) -> None:
        params = message["parameters"]
        code = _get(params, "code", _is_count, "an integer", "error")
        text = _get(params, "message", _is_str, "a string", "error")
        self.client_error = (code, text)

    def _on_close(self, message: dict[str, Any]) -> None:
        reason = message["parameters"].get("reason")
        self._end(reason if isinstance(reason, str) and reason else "close")
        self._send("closed", {})
        self.state = State.CLOSED
        self.close_requested = self._pending_close

    # -- audio

    def _on_audio(self, data: bytes) -> None:
        if self.state is State.AWAITING_OPEN:
            raise Violation(CLOSE_PROTOCOL_ERROR, "audio before opened: the client must wait for opened")
        if self.state is State.PAUSED:
            raise Violation(CLOSE_PROTOCOL_ERROR, "audio while paused: the client said paused")
        if self.selected_media is None:
            raise Violation(CLOSE_PROTOCOL_ERROR, "audio after opened selected no media")
        if len(data) > self.max_frame_bytes:
            raise Violation(
                CLOSE_TOO_BIG,
                f"audio frame of {len(data)} bytes exceeds the {self.max_frame_bytes}-byte limit",
            )
        if len(data) % self._frame_bytes:
            raise Violation(
                CLOSE_UNSUPPORTED_DATA,
                f"audio frame of {len(data)} bytes is not a whole number of {self._frame_bytes}-byte "
                f"sample frames ({self.selected_media['format']}, {len(self.selected_media['channels'])} ch)",
            )
        start_ns = self._position_ns
        self._position_ns += (len(data) // self._frame_bytes) * _NS_PER_SECOND // SAMPLE_RATE
        if data and self._started:
            self._events.append(AudioChunk(bytes(data), self._is_agent, start_ns / _NS_PER_SECOND))

    # -- sending and ending

    def _send(self, message_type: str, parameters: dict[str, Any]) -> None:
        self._seq += 1
        message = {
            "version": PROTOCOL_VERSION,
            "id": self.session_id,
            "type": message_type,
            "seq": self._seq,
            "clientseq": self._clientseq,
            "parameters": parameters,
        }
        self._outgoing.append(json.dumps(message, separators=(",", ":"), allow_nan=False))

    def _disconnect(self, reason: str, info: str, code: int) -> None:
        self._send("disconnect", {"reason": reason, "info": info})
        self.state = State.DISCONNECTING
        self._pending_close = CloseRequest(code, fit_close_reason(info))

    def _violate(self, violation: Violation) -> None:
        reason = fit_close_reason(violation.reason)
        self._events.append(ProtocolViolation(violation.code, reason))
        self._disconnect("error", violation.reason, violation.code)
        self._end("protocol violation")

    def _end(self, reason: str) -> None:
        if self._started and not self._ended:
            self._ended = True
            self._events.append(CallEnded(reason))


# ---------------------------------------------------------------------------------------------- fields


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_object(value: object) -> bool:
    return isinstance(value, dict)


def _is_list(value: object) -> bool:
    return isinstance(value, list)


def _is_count(value: object) -> bool:
    return is_int(value) and value >= 0  # type: ignore[operator]


def _is_uuid(value: object) -> bool:
    return isinstance(value, str) and _UUID_RE.fullmatch(value) is not None


def _is_duration(value: object) -> bool:
    return _duration_ns(value) is not None


def _get(
    params: dict[str, Any],
    key: str,
    check: Callable[[object], bool],
    what: str,
    where: str,
    *,
    required: bool = True,
) -> Any:
    value = params.get(key)
    if value is None and not required and key not in params:
        return None
    if not check(value):
        got = "missing" if key not in params else f"{show(value)} ({json_type(value)})"
        raise Violation(CLOSE_UNSUPPORTED_DATA, f"{where} parameter {key} must be {what}, got {got}")
    return value


def _check_offer(offer: object, index: int) -> None:
    """A media offer's shape [REF MediaParameter]; values we cannot use are not errors, just not chosen."""
    where = f"open media[{index}]"
    if not isinstance(offer, dict):
        raise Violation(CLOSE_UNSUPPORTED_DATA, f"{where} must be an object, got {json_type(offer)}")
    _get(offer, "type", _is_str, "a string", where)
    _get(offer, "format", _is_str, "a string", where)
    _get(offer, "rate", is_int, "an integer", where)
    channels = _get(offer, "channels", _is_list, "an array", where)
    if not channels or not all(isinstance(channel, str) for channel in channels):
        raise Violation(
            CLOSE_UNSUPPORTED_DATA,
            f"{where} channels must be a non-empty array of names, got {show(channels)}",
        )


def _encoding(name: str) -> Encoding:
    return "pcm16" if name == "pcm16" else "mulaw"


# ---------------------------------------------------------------------------------------------- upgrade


def _header_values(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Header fields by lower-case name, every value kept (a Mapping, or name/value pairs)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    values: dict[str, list[str]] = {}
    for name, value in pairs:
        values.setdefault(name.lower(), []).append(value)
    return values


def _canonical(values: list[str] | None) -> str | None:
    """A field's value as signatures cover it: trimmed, obs-fold replaced, several lines joined by ", "."""
    if not values:
        return None
    return ", ".join(re.sub(r"[ \t]*\r\n[ \t]+", " ", value.strip()) for value in values)


def required_headers_missing(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[str]:
    """The AudioHook upgrade headers that are absent or empty, or, for the three Audiohook-*-Id, not a UUID.

    An empty list means the upgrade may proceed; otherwise refuse it (HTTP 400) naming the list.
    """
    values = _header_values(headers)
    missing = []
    for name in REQUIRED_HEADERS:
        value = _canonical(values.get(name.lower()))
        if not value or (name.startswith("Audiohook-") and not _UUID_RE.fullmatch(value)):
            missing.append(name)
    return missing


class _Token(str):
    """An RFC 8941 token, kept apart from strings (they serialise differently)."""


_SF_KEY_RE = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_SF_TOKEN_RE = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_SF_NUMBER_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_SF_BYTES_RE = re.compile(r":([A-Za-z0-9+/=]*):")

_SfItem = tuple[Any, list[tuple[str, Any]]]  # (bare item or inner list of items, parameters)


class _SfParser:
    """A parser for RFC 8941 Dictionary fields (what Signature and Signature-Input are)."""

    def __init__(self, text: str) -> None:
        self.text = text.strip(" ")
        self.pos = 0

    def dictionary(self) -> dict[str, _SfItem]:
        members: dict[str, _SfItem] = {}
        while self.pos < len(self.text):
            key = self._key()
            if self._peek("="):
                self.pos += 1
                members[key] = self._inner_list() if self._peek("(") else self._item()
            else:
                members[key] = (True, self._params())
            self._skip(" \t")
            if self.pos >= len(self.text):
                break
            self._expect(",")
            self._skip(" \t")
            if self.pos >= len(self.text):
                raise ValueError("trailing comma")
        return members

    def _peek(self, char: str) -> bool:
        return self.text.startswith(char, self.pos)

    def _skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def _expect(self, char: str) -> None:
        if not self._peek(char):
            raise ValueError(f"expected {char!r} at {self.pos}")
        self.pos += 1

    def _match(self, pattern: re.Pattern[str], what: str) -> str:
        match = pattern.match(self.text, self.pos)
        if match is None:
            raise ValueError(f"expected {what} at {self.pos}")
        self.pos = match.end()
        return match.group(0)

    def _key(self) -> str:
        return self._match(_SF_KEY_RE, "a key")

    def _inner_list(self) -> _SfItem:
        self._expect("(")
        items: list[_SfItem] = []
        while True:
            self._skip(" ")
            if self._peek(")"):
                self.pos += 1
                return items, self._params()
            items.append(self._item())
            if not (self._peek(" ") or self._peek(")")):
                raise ValueError(f"expected ' ' or ')' at {self.pos}")

    def _item(self) -> _SfItem:
        return self._bare(), self._params()

    def _params(self) -> list[tuple[str, Any]]:
        params: list[tuple[str, Any]] = []
        while self._peek(";"):
            self.pos += 1
            self._skip(" ")
            key = self._key()
            value: Any = True
            if self._peek("="):
                self.pos += 1
                value = self._bare()
            params = [(k, v) for k, v in params if k != key] + [(key, value)]
        return params

    def _bare(self) -> Any:
        char = self.text[self.pos] if self.pos < len(self.text) else ""
        if char == "-" or char.isdigit():
            number = self._match(_SF_NUMBER_RE, "a number")
            if "." in number:
                return Decimal(number)
            if len(number.lstrip("-")) > 15:
                raise ValueError("integer too long")
            return int(number)
        if char == '"':
            return self._string()
        if char == ":":
            encoded = self._match(_SF_BYTES_RE, "a byte sequence")[1:-1]
            return base64.b64decode(encoded, validate=True)
        if char == "?":
            value = self.text[self.pos + 1 : self.pos + 2]
            if value not in ("0", "1"):
                raise ValueError("bad boolean")
            self.pos += 2
            return value == "1"
        return _Token(self._match(_SF_TOKEN_RE, "an item"))

    def _string(self) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\":
                escaped = self.text[self.pos : self.pos + 1]
                if escaped not in ('"', "\\"):
                    raise ValueError("bad escape in string")
                out.append(escaped)
                self.pos += 1
            elif char == '"':
                return "".join(out)
            elif not " " <= char <= "~":
                raise ValueError("non-printable character in string")
            else:
                out.append(char)
        raise ValueError("unterminated string")


def _sf_bare(value: Any) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, _Token):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bytes):
        return ":" + base64.b64encode(value).decode("ascii") + ":"
    return str(value)  # int or Decimal


def _sf_params(params: list[tuple[str, Any]]) -> str:
    return "".join(f";{key}" if value is True else f";{key}={_sf_bare(value)}" for key, value in params)


def _sf_inner_list(items: list[_SfItem], params: list[tuple[str, Any]]) -> str:
    return "(" + " ".join(_sf_bare(value) + _sf_params(p) for value, p in items) + ")" + _sf_params(params)


def verify_message_signature(
    method: str,
    authority: str | None,
    path: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    client_secret_base64: str | None,
    now: float,
    *,
    max_age: float = SIGNATURE_MAX_AGE_SECONDS,
    clock_skew: float = SIGNATURE_CLOCK_SKEW_SECONDS,
) -> str | None:
    """Check the HTTP message signature of an AudioHook upgrade request; None if valid, else why not.

    ``authority`` is the request's host[:port] as the client sent it (None: the Host header); ``path`` is the
    request target as in the request line (path and query); ``now`` is the Unix time. The X-API-KEY must
    already have been looked up to find ``client_secret_base64`` (None or "" when the key has no secret:
    then an unsigned request is valid, as in the reference server). What this checks, as the reference
    server does: one signature, hmac-sha256, covering @request-target, @authority and the four AudioHook
    headers; ``keyid`` equal to X-API-KEY; a nonce of at least 22 characters; ``created`` no later than
    ``now + clock_skew`` and no older than ``max_age + clock_skew``; ``expires`` (if any) not passed.
    Replayed nonces can only be caught by the caller (remember nonces for ``max_age + clock_skew``), and
    failures should be answered after a fixed delay, so timing tells an attacker nothing.
    """
    fields = _header_values(headers)
    api_key = _canonical(fields.get("x-api-key"))
    if not api_key:
        return "missing X-API-KEY header"
    try:
        secret = base64.b64decode(client_secret_base64 or "", validate=True)
    except (binascii.Error, ValueError):
        return "the client secret configured for this API key is not valid base64"
    raw_input, raw_signature = _canonical(fields.get("signature-input")), _canonical(fields.get("signature"))
    if raw_input is None and raw_signature is None:
        return None if not secret else "request is not signed, but its API key has a client secret"
    if raw_input is None or raw_signature is None:
        return "Signature and Signature-Input headers must come together"
    try:
        inputs = _SfParser(raw_input).dictionary()
        signatures = _SfParser(raw_signature).dictionary()
    except (ValueError, binascii.Error) as error:
        return f"malformed Signature or Signature-Input header: {error}"
    if not inputs:
        return "Signature-Input header has no signature"
    label, (covered, sig_params) = next(iter(inputs.items()))
    signature_item = signatures.get(label)
    if signature_item is None or not isinstance(signature_item[0], bytes):
        return f"no byte-sequence Signature for label {label!r}"
    if not isinstance(covered, list):
        return "Signature-Input member must be an inner list of components"

    params: dict[str, Any] = {}
    for key, value in sig_params:
        expected = {"alg": str, "keyid": str, "nonce": str, "created": int, "expires": int}.get(key)
        if expected is None:
            return f"unknown signature parameter {key!r}"
        wrong_type = isinstance(value, bool | _Token) or not isinstance(value, expected)
        if wrong_type or (expected is int and value < 0):
            return f"signature parameter {key!r} has the wrong type"
        params[key] = value
    created, expires = params.get("created"), params.get("expires")
    if created is None:
        return "signature has no created parameter, so its age is unknown"
    if created > now + clock_skew:
        return "signature created in the future: check the clocks"
    if now - created > max_age + clock_skew:
        return f"signature is older than {max_age:g} s"
    if expires is not None and expires < now - clock_skew:
        return "signature expired"
    nonce = params.get("nonce")
    if nonce is None or len(nonce) < SIGNATURE_MIN_NONCE_CHARS:
        return f"signature nonce is missing or shorter than {SIGNATURE_MIN_NONCE_CHARS} characters"
    if params.get("keyid") != api_key:
        return "signature keyid does not match the X-API-KEY header"
    if params.get("alg", "hmac-sha256") != "hmac-sha256":
        return f"signature algorithm {params['alg']!r} is not supported: use hmac-sha256"

    target = path or "/"
    derived = {
        "@method": method.upper(),
        "@authority": authority if authority is not None else _canonical(fields.get("host")),
        "@request-target": target,
        "@path": target.split("?", 1)[0],
        "@query": "?" + target.split("?", 1)[1] if "?" in target else "?",
    }
    lines: list[str] = []
    seen: set[str] = set()
    for name, component_params in covered:
        if not isinstance(name, str) or isinstance(name, _Token):
            return "signature components must be strings"
        if component_params:
            return f"signature component parameters are not supported ({name})"
        if name in seen:
            return f"signature covers {name} twice"
        seen.add(name)
        if name.startswith("@"):
            value = derived.get(name)
            if name not in derived:
                return f"signature component {name} is not supported"
        else:
            value = _canonical(fields.get(name))
        if value is None:
            return f"signature covers {name}, which the request does not have"
        lines.append(f"{_sf_bare(name)}: {value}")
    uncovered = [name for name in SIGNED_COMPONENTS if name not in seen]
    if uncovered:
        return "signature does not cover " + ", ".join(uncovered)
    lines.append('"@signature-params": ' + _sf_inner_list(covered, sig_params))
    expected_mac = hmac.new(secret, "\n".join(lines).encode("utf-8"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected_mac, signature_item[0]):
        return "signature does not match"
    return None
