"""What every protocol adapter turns its wire messages into, and the interface the I/O layer drives.

The adapters follow the split of the ``websockets`` library's sans-I/O core: the I/O layer feeds what the
socket received (``receive_text`` / ``receive_bytes``), then collects ``events_received()`` for the call
pipeline and ``data_to_send()`` for the socket, and closes the socket when ``close_requested`` is set
(after sending what is pending). Nothing here blocks, sleeps or reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

Encoding = Literal["mulaw", "alaw", "pcm16"]


@dataclass(frozen=True)
class CallStarted:
    """The stream is open and its audio format known.

    ``tenant`` and ``agent_id`` are what the protocol carried in-band (None when it carries none: the
    agent-binding API or the key then decide). ``agent_channel`` is the index of the agent's channel in
    interleaved audio (None for mono audio that is all agent, or per-track audio: see ``AudioChunk``).
    """

    call_id: str
    encoding: Encoding
    sample_rate: int
    channels: int
    tenant: str | None = None
    agent_id: str | None = None
    agent_channel: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)  # protocol ids: streamSid, conversationId…


@dataclass(frozen=True)
class AudioChunk:
    """Encoded audio as it arrived (interleaved if ``channels`` > 1), in the format of ``CallStarted``.

    ``is_agent`` says whether this chunk carries the agent's voice: False for a Twilio track that is not
    the agent's, True otherwise (multi-channel audio is split by ``CallStarted.agent_channel``).
    ``media_time`` is where the chunk starts on the call's media clock in seconds, when the protocol says.
    """

    payload: bytes
    is_agent: bool = True
    media_time: float | None = None


@dataclass(frozen=True)
class AgentChanged:
    """The protocol named a (new) agent mid-call: a transfer. Evidence resets."""

    agent_id: str
    agent_channel: int | None = None  # None: the agent's channel is unchanged


@dataclass(frozen=True)
class CallPaused:
    """No audio until ``CallResumed`` (a hold or a pause asked by the client): not a gap to fill."""


@dataclass(frozen=True)
class CallResumed:
    pass


@dataclass(frozen=True)
class AudioDiscarded:
    """The client dropped ``seconds`` of audio at ``media_time`` (AudioHook ``discarded``)."""

    media_time: float
    seconds: float


@dataclass(frozen=True)
class CallEnded:
    """The call is over: the client said so (``reason`` e.g. "stop", "end") or the adapter closed it."""

    reason: str


@dataclass(frozen=True)
class ProtocolViolation:
    """The peer broke the protocol. The adapter has already queued what the protocol requires (an
    AudioHook ``disconnect``) and set ``close_requested``; this event is for logs and metrics."""

    code: int  # the websocket close code the adapter will use
    reason: str


Event = (
    CallStarted
    | AudioChunk
    | AgentChanged
    | CallPaused
    | CallResumed
    | AudioDiscarded
    | CallEnded
    | ProtocolViolation
)


@dataclass(frozen=True)
class CloseRequest:
    """Close the websocket with this code and reason once ``data_to_send()`` is flushed."""

    code: int
    reason: str


# Close codes (RFC 6455 §7.4.1 and the registered 4000-4999 private range).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server shuts down
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013  # overloaded
CLOSE_UNAUTHORIZED = 4001  # private: a failed API key or signature
CLOSE_UNKNOWN_AGENT = 4004  # private: the agent named is not enrolled


class CallProtocol(Protocol):
    """The interface every adapter offers the I/O layer.

    Every ``CallStarted`` is followed by exactly one ``CallEnded`` (stop, ``fail``, a violation or
    ``connection_lost``); ``connection_lost`` before a start emits nothing. Once a close is requested or
    the connection is lost, input is ignored and nothing more is queued; the first close request wins.
    """

    close_requested: CloseRequest | None

    def receive_text(self, text: str) -> None: ...
    def receive_bytes(self, data: bytes) -> None: ...
    def events_received(self) -> list[Event]: ...
    def data_to_send(self) -> list[str | bytes]: ...
    @property
    def pending_output(self) -> bool:
        """Whether ``data_to_send`` has something (without taking it)."""
        ...

    def connection_lost(self) -> None:
        """The socket closed under us: queue ``CallEnded`` if the call had not ended."""

    def fail(self, code: int, reason: str) -> None:
        """The server ends the call (unknown agent, overload, shutdown) the way the protocol wants."""

    def send_verdict(self, verdict: Mapping[str, object]) -> None:
        """Push a verdict to the peer where the protocol has a way to (native); otherwise nothing."""

    def send_alert(self, alert: Mapping[str, object]) -> None:
        """Push an alert to the peer where the protocol has a way to (native); otherwise nothing."""
