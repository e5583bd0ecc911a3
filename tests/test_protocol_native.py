"""Transcript tests of the vpmon native protocol adapter: JSON text and audio bytes in, events out;
events in, JSON text out."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from streamer.protocols.events import (
    AgentChanged,
    AudioChunk,
    CallEnded,
    CallProtocol,
    CallStarted,
    CloseRequest,
    Event,
    ProtocolViolation,
)
from streamer.protocols.native import NativeStream
from verifier.audio import encode_alaw, encode_mulaw, to_pcm16

CALL_ID = "call-2024-06-01:0001@pbx1"


def stereo_pcm16(milliseconds: int = 20, rate: int = 16000) -> bytes:
    """Interleaved little-endian PCM16: a customer tone on channel 0, an agent tone on channel 1."""
    t = np.arange(rate * milliseconds // 1000) / rate
    customer, agent = 0.2 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 220 * t)
    return to_pcm16(np.stack([customer, agent], axis=1)).astype("<i2").tobytes()


def start(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "start",
        "call_id": CALL_ID,
        "tenant": "acme",
        "agent_id": "agent-042",
        "encoding": "pcm16",
        "sample_rate": 16000,
        "channels": 2,
        "agent_channel": 1,
    }
    message.update(changes)
    return {key: value for key, value in message.items() if value is not ...}  # ... drops a field


def feed(adapter: CallProtocol, *frames: dict[str, Any] | str | bytes) -> list[Event]:
    for frame in frames:
        if isinstance(frame, bytes):
            adapter.receive_bytes(frame)
        else:
            adapter.receive_text(frame if isinstance(frame, str) else json.dumps(frame))
    return adapter.events_received()


def sent(adapter: NativeStream) -> list[dict[str, Any]]:
    data = adapter.data_to_send()
    assert all(isinstance(item, str) for item in data)
    return [json.loads(item) for item in data]


STARTED = CallStarted(
    call_id=CALL_ID,
    encoding="pcm16",
    sample_rate=16000,
    channels=2,
    tenant="acme",
    agent_id="agent-042",
    agent_channel=1,
)


# ------------------------------------------------------------------------------------------ transcripts


def test_a_whole_stereo_call_with_a_transfer_verdicts_and_an_alert() -> None:
    audio = [stereo_pcm16(20), stereo_pcm16(40), stereo_pcm16(20)]
    adapter = NativeStream()
    events = feed(adapter, start(), audio[0], audio[1])
    assert events == [STARTED, AudioChunk(audio[0]), AudioChunk(audio[1])]
    assert sent(adapter) == [{"type": "started", "call_id": CALL_ID}]

    adapter.send_verdict({"state": "MATCH", "score": 0.71, "threshold": 0.42, "net_speech_s": 4.2})
    events = feed(adapter, {"type": "agent", "agent_id": "agent-077", "agent_channel": 0}, audio[2])
    assert events == [AgentChanged("agent-077", agent_channel=0), AudioChunk(audio[2])]
    adapter.send_alert({"state": "MISMATCH", "agent_id": "agent-077", "type": "ignored"})
    assert sent(adapter) == [
        {"type": "verdict", "state": "MATCH", "score": 0.71, "threshold": 0.42, "net_speech_s": 4.2},
        {"type": "alert", "state": "MISMATCH", "agent_id": "agent-077"},  # the body cannot rename the type
    ]

    assert feed(adapter, {"type": "stop"}) == [CallEnded("stop")]
    assert adapter.close_requested == CloseRequest(1000, "call stopped")
    assert adapter.data_to_send() == []  # a clean stop needs no error message


def test_mono_g711_needs_no_agent_channel() -> None:
    t = np.arange(160) / 8000
    mulaw, alaw = (
        encode_mulaw(0.3 * np.sin(2 * np.pi * 300 * t)),
        encode_alaw(0.3 * np.sin(2 * np.pi * 300 * t)),
    )
    for encoding, payload in (("mulaw", mulaw), ("alaw", alaw)):
        adapter = NativeStream()
        message = start(
            encoding=encoding, sample_rate=8000, channels=1, agent_channel=..., tenant=..., agent_id=...
        )
        assert feed(adapter, message, payload) == [
            CallStarted(call_id=CALL_ID, encoding=encoding, sample_rate=8000, channels=1),
            AudioChunk(payload),
        ]


def test_mono_accepts_agent_channel_zero_and_an_agent_change_without_a_channel() -> None:
    adapter = NativeStream()
    events = feed(
        adapter,
        start(channels=1, agent_channel=0),
        {"type": "agent", "agent_id": "agent-077"},
        {"type": "agent", "agent_id": "agent-078", "agent_channel": 0},
    )
    assert events[0].agent_channel is None  # type: ignore[union-attr]  # mono: all of it is the agent's
    assert events[1:] == [AgentChanged("agent-077"), AgentChanged("agent-078")]


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000])
def test_every_standard_rate_is_accepted(rate: int) -> None:
    adapter = NativeStream()
    assert feed(adapter, start(sample_rate=rate))[0] == CallStarted(
        call_id=CALL_ID,
        encoding="pcm16",
        sample_rate=rate,
        channels=2,
        tenant="acme",
        agent_id="agent-042",
        agent_channel=1,
    )


def test_unknown_fields_are_ignored() -> None:
    adapter = NativeStream()
    assert feed(adapter, start(client="acme-dialer 2.1")) == [STARTED]


def test_an_empty_audio_frame_is_no_event() -> None:
    adapter = NativeStream()
    assert feed(adapter, start(), b"") == [STARTED]
    assert adapter.close_requested is None


def test_allowed_rates_and_frame_limit_are_options() -> None:
    adapter = NativeStream(allowed_rates=[16000], max_frame_bytes=640)
    assert feed(adapter, start(), stereo_pcm16(10)) == [STARTED, AudioChunk(stereo_pcm16(10))]
    assert feed(adapter, stereo_pcm16(20))[0] == ProtocolViolation(
        1009, "binary frame of 1280 bytes exceeds the 640-byte limit"
    )
    events = feed(NativeStream(allowed_rates=[16000]), start(sample_rate=8000))
    assert events == [ProtocolViolation(1003, "sample_rate 8000 is not supported: use 16000 Hz")]
    with pytest.raises(ValueError, match="allowed_rates is empty"):
        NativeStream(allowed_rates=[])


def test_nothing_is_read_after_stop_but_last_verdicts_go_out() -> None:
    adapter = NativeStream()
    feed(adapter, start(), {"type": "stop"})
    adapter.data_to_send()
    assert feed(adapter, stereo_pcm16(), {"type": "start"}, "not json") == []
    # The verdicts of the call's last windows are computed after its stop: they go out before the close.
    adapter.send_verdict({"state": "MATCH"})
    adapter.send_alert({"kind": "takeover"})
    assert [json.loads(m)["type"] for m in adapter.data_to_send()] == ["verdict", "alert"]
    adapter.fail(1011, "too late")
    adapter.connection_lost()
    adapter.send_verdict({"state": "MATCH"})  # the connection is gone: nothing more
    assert adapter.data_to_send() == [] and adapter.events_received() == []
    assert adapter.close_requested == CloseRequest(1000, "call stopped")


def test_no_verdicts_after_a_failure() -> None:
    adapter = NativeStream()
    feed(adapter, start())
    adapter.fail(1011, "overloaded")
    adapter.data_to_send()
    adapter.send_verdict({"state": "MATCH"})
    assert adapter.data_to_send() == []


def test_connection_lost_ends_a_live_call_once() -> None:
    adapter = NativeStream()
    feed(adapter, start(), stereo_pcm16())
    adapter.connection_lost()
    adapter.connection_lost()
    assert adapter.events_received() == [CallEnded("connection lost")]
    adapter.send_verdict({"state": "MATCH"})
    assert sent(adapter) == [{"type": "started", "call_id": CALL_ID}]  # nothing after the loss
    assert feed(adapter, stereo_pcm16()) == []


def test_connection_lost_before_start_ends_nothing() -> None:
    adapter = NativeStream()
    adapter.connection_lost()
    assert adapter.events_received() == []


def test_fail_sends_an_error_then_closes_and_ends_the_call() -> None:
    adapter = NativeStream()
    feed(adapter, start())
    adapter.data_to_send()
    adapter.fail(4004, "agent agent-042 is not enrolled for tenant acme")
    adapter.fail(1011, "second failure")  # the first close wins
    assert sent(adapter) == [
        {"type": "error", "code": 4004, "reason": "agent agent-042 is not enrolled for tenant acme"}
    ]
    assert adapter.close_requested == CloseRequest(4004, "agent agent-042 is not enrolled for tenant acme")
    assert adapter.events_received() == [CallEnded("agent agent-042 is not enrolled for tenant acme")]


def test_fail_before_start_sends_the_error_without_ending_a_call() -> None:
    adapter = NativeStream()
    adapter.fail(1013, "overloaded: try again later")
    assert sent(adapter) == [{"type": "error", "code": 1013, "reason": "overloaded: try again later"}]
    assert adapter.events_received() == []


def test_a_verdict_that_is_not_json_fails_loudly() -> None:
    adapter = NativeStream()
    feed(adapter, start())
    with pytest.raises(ValueError):
        adapter.send_verdict({"score": float("nan")})  # NaN is not JSON; browsers would choke on it


# ------------------------------------------------------------------------------------------ bad input


BAD_INPUT: list[tuple[str, list[dict[str, Any] | str | bytes], int, str]] = [
    # (name, frames, close code, words the reason must contain)
    ("audio before start", [b"\x00\x00"], 1002, "audio before start: send the start message first"),
    ("agent before start", [{"type": "agent", "agent_id": "a"}], 1002, "agent message before start"),
    ("stop before start", [{"type": "stop"}], 1002, "stop message before start"),
    ("second start", [start(), start()], 1002, "second start message"),
    ("not json", ["start"], 1003, "not JSON: Expecting value at character 0"),
    ("json array", ["[]"], 1003, "must be a JSON object, got array"),
    ("json null", ["null"], 1003, "got null"),
    (
        "no type",
        [{"call_id": CALL_ID}],
        1003,
        'message has no "type" string (got none): expected start, agent or stop',
    ),
    ("type not a string", [{"type": ["start"]}], 1003, "(got array)"),
    ("unknown type", [start(), {"type": "pause"}], 1003, 'unknown message type "pause"'),
    ("lone surrogate", ['{"type": "st\\udfffart"}'], 1003, 'unknown message type "st\\udfffart"'),
    (
        "text too big",
        [json.dumps({"type": "stop", "pad": "x" * 17_000})],
        1009,
        "exceeds the 16384-byte limit",
    ),
    (
        "audio too big",
        [start(), bytes(64 * 1024 + 4)],
        1009,
        "binary frame of 65540 bytes exceeds the 65536-byte",
    ),
    (
        "odd pcm16 mono frame",
        [start(channels=1, agent_channel=...), b"\x00\x00\x00"],
        1003,
        "audio frame of 3 bytes is not a whole number of 2-byte sample frames (pcm16, 1 ch)",
    ),
    (
        "split stereo pcm16 frame",
        [start(), bytes(6)],
        1003,
        "6 bytes is not a whole number of 4-byte sample frames",
    ),
    (
        "split stereo mulaw frame",
        [start(encoding="mulaw", sample_rate=8000), bytes(3)],
        1003,
        "3 bytes is not a whole number of 2-byte sample frames (mulaw, 2 ch)",
    ),
    ("no call id", [start(call_id=...)], 1003, "call_id is missing"),
    (
        "call id with a space",
        [start(call_id="call 1")],
        1003,
        'call_id "call 1" is invalid: use 1-128 of A-Z a-z',
    ),
    ("call id too long", [start(call_id="c" * 129)], 1003, 'call_id "cccc'),
    ("call id a number", [start(call_id=42)], 1003, "call_id 42 is invalid"),
    ("empty call id", [start(call_id="")], 1003, 'call_id "" is invalid'),
    ("bad tenant", [start(tenant="acme corp")], 1003, 'tenant "acme corp" is invalid: use 1-64 of'),
    ("bad agent id", [start(agent_id="bob/smith")], 1003, 'agent_id "bob/smith" is invalid'),
    (
        "unknown encoding",
        [start(encoding="opus")],
        1003,
        'encoding "opus" is not supported: use pcm16, mulaw or alaw',
    ),
    ("no encoding", [start(encoding=...)], 1003, "encoding null is not supported"),
    (
        "rate too low",
        [start(sample_rate=7000)],
        1003,
        "sample_rate 7000 is not supported: use 8000, 11025, 16000, 22050, 24000, 32000, 44100 or 48000 Hz",
    ),
    ("odd rate", [start(sample_rate=9000)], 1003, "sample_rate 9000 is not supported"),
    ("rate as a string", [start(sample_rate="16000")], 1003, 'sample_rate "16000" is not supported'),
    ("rate as a float", [start(sample_rate=16000.0)], 1003, "sample_rate 16000.0 is not supported"),
    ("three channels", [start(channels=3)], 1003, "channels 3 is not supported: use 1 or 2"),
    ("channels as true", [start(channels=True)], 1003, "channels true is not supported"),
    (
        "stereo without agent channel",
        [start(agent_channel=...)],
        1003,
        "agent_channel is required with 2 channels: say which one (0 or 1) is the agent",
    ),
    (
        "agent channel out of range",
        [start(agent_channel=2)],
        1003,
        "agent_channel 2 must be 0 or 1 with 2 channel(s)",
    ),
    ("negative agent channel", [start(agent_channel=-1)], 1003, "agent_channel -1 must be 0 or 1"),
    (
        "mono agent channel 1",
        [start(channels=1, agent_channel=1)],
        1003,
        "agent_channel 1 must be 0 with 1 channel(s)",
    ),
    ("agent channel a string", [start(agent_channel="1")], 1003, 'agent_channel "1" must be 0 or 1'),
    ("agent without id", [start(), {"type": "agent"}], 1003, "agent_id is missing"),
    (
        "agent with a bad id",
        [start(), {"type": "agent", "agent_id": "a b"}],
        1003,
        'agent_id "a b" is invalid',
    ),
    (
        "agent with a bad channel",
        [start(), {"type": "agent", "agent_id": "agent-077", "agent_channel": 5}],
        1003,
        "agent_channel 5 must be 0 or 1 with 2 channel(s)",
    ),
]


@pytest.mark.parametrize(
    ("frames", "code", "words"), [case[1:] for case in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_is_a_violation_with_a_precise_reason(
    frames: list[dict[str, Any] | str | bytes], code: int, words: str
) -> None:
    adapter = NativeStream()
    events = feed(adapter, *frames)
    violations = [event for event in events if isinstance(event, ProtocolViolation)]
    assert len(violations) == 1, events
    violation = violations[0]
    assert (violation.code, words in violation.reason) == (code, True), violation.reason
    assert len(violation.reason.encode()) <= 123
    assert adapter.close_requested == CloseRequest(code, violation.reason)
    # The client hears why before the socket closes.
    assert sent(adapter)[-1] == {"type": "error", "code": code, "reason": violation.reason}
    started = any(isinstance(event, CallStarted) for event in events)
    assert events[-1] == (CallEnded("protocol violation") if started else violation)
    # Nothing is read or queued after a violation.
    assert feed(adapter, stereo_pcm16(), {"type": "stop"}) == []
    adapter.send_alert({"state": "MISMATCH"})
    assert adapter.data_to_send() == []


# ------------------------------------------------------------------------------------------ properties

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # hypothesis is in the test extra; without it only these tests are skipped
    given = None

if given is not None:
    # Any text, lone surrogates included: JSON escapes can carry them and reasons quote them.
    texts = st.text(st.characters(exclude_categories=()), max_size=20) | st.sampled_from(
        ["\ud800", "a\udfff"]
    )
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
        ),
        max_leaves=12,
    )
    # Messages shaped like ours, with any values in their fields: reaches the deep checks.
    native_like = st.fixed_dictionaries(
        {"type": st.sampled_from(["start", "agent", "stop", "pause"]) | texts},
        optional={
            "call_id": st.sampled_from([CALL_ID, "a b", ""]) | json_values,
            "agent_id": st.sampled_from(["agent-1", "a/b"]) | json_values,
            "encoding": st.sampled_from(["pcm16", "mulaw", "alaw", "opus"]) | json_values,
            "sample_rate": st.sampled_from([8000, 16000, 7000, 16000.0]) | json_values,
            "channels": st.sampled_from([1, 2, 3, True]) | json_values,
            "agent_channel": st.sampled_from([0, 1, 2, -1]) | json_values,
        },
    )
    frames = st.lists(
        st.text(max_size=200)
        | st.binary(max_size=64)
        | json_values.map(json.dumps)
        | native_like.map(json.dumps),
        max_size=12,
    )

    @given(frames=frames, preamble=st.sampled_from([None, start(), start(encoding="mulaw", channels=1)]))
    def test_any_input_gives_events_or_a_violation_never_an_exception(
        frames: list[str | bytes], preamble: dict[str, Any] | None
    ) -> None:
        adapter = NativeStream()
        events = feed(adapter, *([preamble] if preamble else []), *frames)
        adapter.send_verdict({"state": "UNKNOWN"})
        outgoing = sent(adapter)
        starts = [i for i, event in enumerate(events) if isinstance(event, CallStarted)]
        ends = [i for i, event in enumerate(events) if isinstance(event, CallEnded)]
        violations = [event for event in events if isinstance(event, ProtocolViolation)]
        assert len(starts) <= 1 and len(ends) <= 1 and len(violations) <= 1
        assert not ends or (starts and starts[0] < ends[0])
        assert [m["type"] for m in outgoing].count("started") == len(starts)
        for violation in violations:
            assert violation.code in (1002, 1003, 1009)
            assert len(violation.reason.encode()) <= 123
            assert adapter.close_requested == CloseRequest(violation.code, violation.reason)
            assert outgoing[-1] == {"type": "error", "code": violation.code, "reason": violation.reason}
        if adapter.close_requested is None:
            assert outgoing[-1] == {"type": "verdict", "state": "UNKNOWN"}

else:

    def test_property_tests_need_hypothesis() -> None:
        pytest.skip("hypothesis is not installed (pip install hypothesis)")
