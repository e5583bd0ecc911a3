"""What the protocol adapters share: the adapter skeleton, JSON framing, field checks and close reasons.

Close codes mean the same thing in every adapter (RFC 6455 §7.4.1), so logs and metrics read alike:

- 1002 (protocol error): a message in the wrong place: audio before start, a second start, a sequence
  number out of order, a message for another stream.
- 1003 (unsupported data): a frame the adapter cannot use: not JSON, not an object, no or an unknown
  message type, a field of the wrong type or value, an audio format it does not take, a binary frame
  where the protocol only defines text (or the reverse).
- 1009 (too big): a frame or an audio payload over the adapter's limit.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any, TypeGuard

from streamer.protocols.events import (
    CLOSE_NORMAL,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
    CallEnded,
    CallStarted,
    CloseRequest,
    Event,
    ProtocolViolation,
)
from streamer.store import SPEAKER_RE, TENANT_RE

# RFC 6455 §5.5: a control frame carries at most 125 bytes, 2 of them the close code.
MAX_CLOSE_REASON_BYTES = 123
_SHOW_CHARS = 40  # how much of a peer's value a reason quotes
_ELLIPSIS = "…".encode()


class Violation(Exception):
    """The peer broke the protocol. Raised inside an adapter's handlers and turned by ``AdapterBase`` into
    a ``ProtocolViolation`` event and a close; it never escapes ``receive_text`` / ``receive_bytes``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Phase(enum.Enum):
    AWAITING_START = "awaiting start"
    LIVE = "live"  # CallStarted emitted, CallEnded not yet
    ENDED = "ended"


class AdapterBase:
    """The bookkeeping every adapter shares, behind the ``CallProtocol`` interface.

    Subclasses implement ``_handle_text`` / ``_handle_bytes`` (raising ``Violation`` on bad input) and may
    override ``_queue_goodbye`` to send what their protocol sends before a server-side close.

    Invariants the session can rely on: every ``CallStarted`` is followed by exactly one ``CallEnded``
    (stop, ``fail``, a violation or ``connection_lost``); once a close is requested or the connection
    is lost, input is ignored and nothing more is queued; the first close request wins.
    """

    def __init__(self) -> None:
        self.close_requested: CloseRequest | None = None
        self.phase = Phase.AWAITING_START
        self._events: list[Event] = []
        self._outgoing: list[str | bytes] = []
        self._lost = False

    # -- the CallProtocol interface

    def receive_text(self, text: str) -> None:
        if self._closing:
            return  # a message that crossed our close (or the peer's stop) on the wire
        try:
            self._handle_text(text)
        except Violation as violation:
            self._violate(violation)

    def receive_bytes(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._handle_bytes(data)
        except Violation as violation:
            self._violate(violation)

    def events_received(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[str | bytes]:
        data, self._outgoing = self._outgoing, []
        return data

    @property
    def pending_output(self) -> bool:
        return bool(self._outgoing)

    def connection_lost(self) -> None:
        self._lost = True
        if self.phase is Phase.LIVE:
            self._end("connection lost")

    def fail(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._close(code, reason)
        if self.phase is Phase.LIVE:
            self._end(reason)

    # Whether the client gets verdict and alert frames ({"type": "verdict" | "alert", …}): the native
    # protocol and WHIP's data channel do; telephony protocols have no channel back for them.
    pushes_verdicts = False

    def send_verdict(self, verdict: Mapping[str, object]) -> None:
        self._send_typed("verdict", verdict)

    def send_alert(self, alert: Mapping[str, object]) -> None:
        self._send_typed("alert", alert)

    def _send_typed(self, kind: str, body: Mapping[str, object]) -> None:
        if not self.pushes_verdicts:
            return
        message = {"type": kind, **body}
        message["type"] = kind  # a "type" key in the body must not change what the client sees
        self._send_json(message, after_stop=True)

    # -- for subclasses

    def _handle_text(self, text: str) -> None:
        raise NotImplementedError

    def _handle_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    def _queue_goodbye(self, code: int, reason: str) -> None:
        """Queue what the protocol sends before the server closes (an error message); none by default."""

    @property
    def _closing(self) -> bool:
        return self.close_requested is not None or self._lost

    def _send_json(self, message: Mapping[str, object], after_stop: bool = False) -> None:
        """Queue a JSON text frame. ``after_stop``: also after the peer's own normal stop (the close is
        then requested but not yet sent: the I/O layer flushes first), e.g. the verdicts of the call's
        last windows; never after a failure or a lost connection."""
        stopped_normally = self.close_requested is not None and self.close_requested.code == CLOSE_NORMAL
        if not self._closing or (after_stop and stopped_normally and not self._lost):
            # allow_nan=False: NaN is not JSON and breaks browsers' JSON.parse; fail loudly here instead.
            self._outgoing.append(json.dumps(message, separators=(",", ":"), allow_nan=False))

    def _start(self, event: CallStarted) -> None:
        self.phase = Phase.LIVE
        self._events.append(event)

    def _stop(self, reason: str, close_reason: str) -> None:
        """The client ended the call cleanly."""
        self._end(reason)
        self._close(CLOSE_NORMAL, close_reason, goodbye=False)

    def _end(self, reason: str) -> None:
        self.phase = Phase.ENDED
        self._events.append(CallEnded(reason))

    def _close(self, code: int, reason: str, *, goodbye: bool = True) -> None:
        reason = fit_close_reason(reason)
        if goodbye:
            self._queue_goodbye(code, reason)
        self.close_requested = CloseRequest(code, reason)

    def _violate(self, violation: Violation) -> None:
        reason = fit_close_reason(violation.reason)
        self._events.append(ProtocolViolation(violation.code, reason))
        self._close(violation.code, reason)
        if self.phase is Phase.LIVE:
            self._end("protocol violation")


# -------------------------------------------------------------------------------------------- reasons


def fit_close_reason(reason: str) -> str:
    """Cut a reason to the 123 UTF-8 bytes a close frame holds, on a character boundary, marked with ….

    Lone surrogates (a peer can send them as JSON escapes, and reasons quote the peer) become ``\\udxxx``
    escapes: a close reason must be valid UTF-8.
    """
    encoded = reason.encode("utf-8", "backslashreplace")
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return encoded.decode()
    # "ignore" drops the character the cut may split in two
    return encoded[: MAX_CLOSE_REASON_BYTES - len(_ELLIPSIS)].decode("utf-8", "ignore") + "…"


def show(value: object) -> str:
    """A peer's value, quoted as JSON and shortened, so reasons say what arrived without being flooded."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # nested deeper than the stack allows (repr would be too)
        text = f"(a deeply nested {json_type(value)})"
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 1] + "…"


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for reasons ("got array")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


# -------------------------------------------------------------------------------------------- framing


def utf8_size(text: str) -> int:
    """The size of a text frame on the wire (ASCII, the usual case, is free to measure)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_binary_size(data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise Violation(
            CLOSE_TOO_BIG, f"binary frame of {len(data)} bytes exceeds the {max_bytes}-byte limit"
        )


def parse_json_object(text: str, max_bytes: int) -> dict[str, Any]:
    """Parse a text frame that must hold one JSON object of at most ``max_bytes`` UTF-8 bytes."""
    size = utf8_size(text)
    if size > max_bytes:
        raise Violation(CLOSE_TOO_BIG, f"text frame of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise Violation(
            CLOSE_UNSUPPORTED_DATA, f"text frame is not JSON: {error.msg} at character {error.pos}"
        ) from None
    except (ValueError, RecursionError):  # an integer of over 4300 digits; nesting deeper than the stack
        raise Violation(
            CLOSE_UNSUPPORTED_DATA, "text frame is not usable JSON (too deep or too long a number)"
        ) from None
    if not isinstance(value, dict):
        raise Violation(CLOSE_UNSUPPORTED_DATA, f"a message must be a JSON object, got {json_type(value)}")
    return value


# -------------------------------------------------------------------------------------------- fields


def is_int(value: object) -> TypeGuard[int]:
    """A JSON integer (``true`` is not 1 here, nor is 8000.0 8000)."""
    return isinstance(value, int) and not isinstance(value, bool)


def get_object(message: Mapping[str, Any], key: str, name: str) -> dict[str, Any]:
    value = message.get(key)
    if not isinstance(value, dict):
        what = "is missing" if value is None else f"must be an object, got {json_type(value)}"
        raise Violation(CLOSE_UNSUPPORTED_DATA, f"{name} {what}")
    return value


def check_tenant(value: object, name: str) -> str | None:
    """An optional tenant id, in the alphabet the voiceprint store accepts."""
    if value is None:
        return None
    if not isinstance(value, str) or not TENANT_RE.fullmatch(value):
        raise Violation(
            CLOSE_UNSUPPORTED_DATA, f"{name} {show(value)} is invalid: use 1-64 of A-Z a-z 0-9 _ . -"
        )
    return value


def check_speaker(value: object, name: str) -> str:
    """An agent or call id, in the voiceprint store's speaker-id alphabet."""
    if value is None:
        raise Violation(CLOSE_UNSUPPORTED_DATA, f"{name} is missing")
    if not isinstance(value, str) or not SPEAKER_RE.fullmatch(value):
        raise Violation(
            CLOSE_UNSUPPORTED_DATA, f"{name} {show(value)} is invalid: use 1-128 of A-Z a-z 0-9 _ . : @ + -"
        )
    return value
