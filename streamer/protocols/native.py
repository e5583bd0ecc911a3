"""The vpmon native websocket protocol, sans-I/O: the simplest way for an integrator to stream a call.

Client to server:

- first, a text frame ``{"type": "start", "call_id": …, "tenant"?: …, "agent_id"?: …,
  "encoding": "pcm16" | "mulaw" | "alaw", "sample_rate": …, "channels": 1 | 2, "agent_channel": …}``;
  ``agent_channel`` (which channel carries the agent) is required with 2 channels, optional (0) with 1;
- binary frames of raw audio (little-endian for pcm16, interleaved when stereo), each a whole number of
  sample frames and at most ``max_frame_bytes``;
- ``{"type": "agent", "agent_id": …, "agent_channel"?: …}`` at any time during the call: another agent
  took over (a transfer), so the evidence about the previous one resets (``AgentChanged``);
- ``{"type": "stop"}`` at the end; the server then closes with 1000.

Server to client: ``{"type": "started", "call_id": …}`` once the start is accepted; ``{"type": "verdict", …}``
and ``{"type": "alert", …}`` as they happen; ``{"type": "error", "code": …, "reason": …}`` right before the
server closes the socket with that code and reason (a protocol violation, or the server ending the call).

Beyond PROTOCOLS.md: the ``agent`` message, the ``alaw`` encoding, every standard rate from 8000 to
48000 Hz, and the ``started`` / ``error`` messages. Unknown fields are ignored (room to grow); unknown
message types are not (a typo must not pass silently). Identifiers use the voiceprint store's alphabets.
Close codes follow ``_common``: 1003 for frames we cannot use, 1002 for messages out of place (audio or
``agent`` before ``start``, a second ``start``), 1009 for frames over the limits.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, cast, get_args

from streamer.protocols._common import (
    AdapterBase,
    Phase,
    Violation,
    check_binary_size,
    check_speaker,
    check_tenant,
    is_int,
    json_type,
    parse_json_object,
    show,
)
from streamer.protocols.events import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    AgentChanged,
    AudioChunk,
    CallStarted,
    Encoding,
)

STANDARD_RATES: tuple[int, ...] = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
ENCODINGS: tuple[Encoding, ...] = get_args(Encoding)
DEFAULT_MAX_FRAME_BYTES = 64 * 1024  # binary frames: 2 s of 16 kHz stereo PCM16
MAX_TEXT_BYTES = 16 * 1024  # control messages are small; a big one is a mistake, not a message
_TYPES = "start, agent or stop"


@dataclass(frozen=True)
class _Format:
    encoding: Encoding
    channels: int

    @property
    def frame_bytes(self) -> int:
        """Bytes per sample frame: one sample of every channel."""
        return (2 if self.encoding == "pcm16" else 1) * self.channels


class NativeStream(AdapterBase):
    """One call on the vpmon native protocol (see the module docstring for the messages)."""

    pushes_verdicts = True  # verdict and alert frames, after a normal stop too

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        allowed_rates: Collection[int] = STANDARD_RATES,
    ) -> None:
        if not allowed_rates:
            raise ValueError("allowed_rates is empty: no call could start")
        super().__init__()
        self.max_frame_bytes = max_frame_bytes
        self.allowed_rates = frozenset(allowed_rates)
        self._format: _Format | None = None
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "start": self._on_start,
            "agent": self._on_agent,
            "stop": self._on_stop,
        }

    # -- to the client

    def _queue_goodbye(self, code: int, reason: str) -> None:
        self._send_json({"type": "error", "code": code, "reason": reason})

    # -- from the client

    def _handle_bytes(self, data: bytes) -> None:
        if self._format is None:
            raise Violation(CLOSE_PROTOCOL_ERROR, "audio before start: send the start message first")
        check_binary_size(data, self.max_frame_bytes)
        frame = self._format.frame_bytes
        if len(data) % frame:
            raise Violation(
                CLOSE_UNSUPPORTED_DATA,
                f"audio frame of {len(data)} bytes is not a whole number of {frame}-byte sample frames "
                f"({self._format.encoding}, {self._format.channels} ch)",
            )
        if data:
            self._events.append(AudioChunk(bytes(data)))

    def _handle_text(self, text: str) -> None:
        message = parse_json_object(text, MAX_TEXT_BYTES)
        kind = message.get("type")
        if not isinstance(kind, str):
            got = "none" if kind is None else json_type(kind)
            raise Violation(
                CLOSE_UNSUPPORTED_DATA, f'message has no "type" string (got {got}): expected {_TYPES}'
            )
        handler = self._handlers.get(kind)
        if handler is None:
            raise Violation(CLOSE_UNSUPPORTED_DATA, f"unknown message type {show(kind)}: expected {_TYPES}")
        if kind == "start" and self.phase is not Phase.AWAITING_START:
            raise Violation(CLOSE_PROTOCOL_ERROR, "second start message: a call starts once")
        if kind != "start" and self.phase is Phase.AWAITING_START:
            raise Violation(CLOSE_PROTOCOL_ERROR, f"{kind} message before start: send start first")
        handler(message)

    def _on_start(self, message: dict[str, Any]) -> None:
        call_id = check_speaker(message.get("call_id"), "call_id")
        tenant = check_tenant(message.get("tenant"), "tenant")
        agent_id = message.get("agent_id")
        if agent_id is not None:
            agent_id = check_speaker(agent_id, "agent_id")
        encoding = message.get("encoding")
        if encoding not in ENCODINGS:
            raise Violation(
                CLOSE_UNSUPPORTED_DATA,
                f"encoding {show(encoding)} is not supported: use pcm16, mulaw or alaw",
            )
        rate = message.get("sample_rate")
        if not is_int(rate) or rate not in self.allowed_rates:
            *others, last = sorted(self.allowed_rates)
            listed = f"{', '.join(map(str, others))} or {last}" if others else str(last)
            raise Violation(
                CLOSE_UNSUPPORTED_DATA, f"sample_rate {show(rate)} is not supported: use {listed} Hz"
            )
        channels = message.get("channels")
        if not is_int(channels) or channels not in (1, 2):
            raise Violation(CLOSE_UNSUPPORTED_DATA, f"channels {show(channels)} is not supported: use 1 or 2")
        if channels == 2 and message.get("agent_channel") is None:
            raise Violation(
                CLOSE_UNSUPPORTED_DATA,
                "agent_channel is required with 2 channels: say which one (0 or 1) is the agent",
            )
        agent_channel = self._agent_channel(message.get("agent_channel"), channels)

        encoding = cast(Encoding, encoding)  # checked against ENCODINGS above
        self._format = _Format(encoding=encoding, channels=channels)
        self._start(
            CallStarted(
                call_id=call_id,
                encoding=encoding,
                sample_rate=rate,
                channels=channels,
                tenant=tenant,
                agent_id=agent_id,
                agent_channel=agent_channel,
            )
        )
        self._send_json({"type": "started", "call_id": call_id})

    def _on_agent(self, message: dict[str, Any]) -> None:
        assert self._format is not None  # _handle_text lets agent through only after start
        agent_id = check_speaker(message.get("agent_id"), "agent_id")
        agent_channel = self._agent_channel(message.get("agent_channel"), self._format.channels)
        self._events.append(AgentChanged(agent_id=agent_id, agent_channel=agent_channel))

    def _on_stop(self, message: dict[str, Any]) -> None:
        self._stop("stop", "call stopped")

    @staticmethod
    def _agent_channel(value: object, channels: int) -> int | None:
        """A valid channel index for interleaved audio; None for mono (all of it is the agent's) or when
        absent (an ``agent`` message that keeps the channel)."""
        if value is None:
            return None
        if not is_int(value) or not 0 <= value < channels:
            allowed = " or ".join(str(index) for index in range(channels))
            raise Violation(
                CLOSE_UNSUPPORTED_DATA,
                f"agent_channel {show(value)} must be {allowed} with {channels} channel(s)",
            )
        return value if channels > 1 else None
