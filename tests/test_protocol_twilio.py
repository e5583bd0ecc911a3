"""Transcript tests of the Twilio Media Streams adapter: JSON text in, events and close requests out."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import numpy as np
import pytest

from streamer.protocols.events import (
    AudioChunk,
    CallEnded,
    CallProtocol,
    CallStarted,
    CloseRequest,
    Event,
    ProtocolViolation,
)
from streamer.protocols.twilio import TwilioMediaStream, twilio_signature, validate_twilio_signature
from verifier.audio import encode_mulaw

STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
ACCOUNT_SID = "AC25e16e9a716a4a1786a7c83f58e30482"
CALL_SID = "CA8f2d6b4d5e1a4f0c9b7e3a2d1c0b9a87"


def tone(frequency: float, milliseconds: int = 20) -> bytes:
    """μ-law bytes of a sine, as a 20 ms Twilio media payload carries (160 bytes)."""
    t = np.arange(8 * milliseconds) / 8000
    return encode_mulaw(0.3 * np.sin(2 * np.pi * frequency * t))


AGENT_VOICE = [tone(220), tone(230), tone(240)]
CUSTOMER_VOICE = [tone(440), tone(450)]


def connected() -> dict[str, Any]:
    return {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def start(seq: int = 1, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "accountSid": ACCOUNT_SID,
        "streamSid": STREAM_SID,
        "callSid": CALL_SID,
        "tracks": ["inbound", "outbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"tenant": "acme", "agent_id": "agent-042", "queue": "billing"},
    }
    body.update(changes)
    return {"event": "start", "sequenceNumber": str(seq), "start": body, "streamSid": STREAM_SID}


def media(seq: int, track: str, chunk: int, timestamp: int, payload: bytes) -> dict[str, Any]:
    return {
        "event": "media",
        "sequenceNumber": str(seq),
        "media": {
            "track": track,
            "chunk": str(chunk),
            "timestamp": str(timestamp),
            "payload": base64.b64encode(payload).decode(),
        },
        "streamSid": STREAM_SID,
    }


def mark(seq: int) -> dict[str, Any]:
    return {
        "event": "mark",
        "sequenceNumber": str(seq),
        "streamSid": STREAM_SID,
        "mark": {"name": "greeting"},
    }


def dtmf(seq: int) -> dict[str, Any]:
    return {
        "event": "dtmf",
        "streamSid": STREAM_SID,
        "sequenceNumber": str(seq),
        "dtmf": {"track": "inbound_track", "digit": "1"},
    }


def stop(seq: int) -> dict[str, Any]:
    return {
        "event": "stop",
        "sequenceNumber": str(seq),
        "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID},
        "streamSid": STREAM_SID,
    }


def feed(adapter: CallProtocol, *frames: dict[str, Any] | str | bytes) -> list[Event]:
    """Send frames as the websocket layer would (dicts as JSON text) and collect the events."""
    for frame in frames:
        if isinstance(frame, bytes):
            adapter.receive_bytes(frame)
        else:
            adapter.receive_text(frame if isinstance(frame, str) else json.dumps(frame))
    return adapter.events_received()


STARTED = CallStarted(
    call_id=CALL_SID,
    encoding="mulaw",
    sample_rate=8000,
    channels=1,
    tenant="acme",
    agent_id="agent-042",
    agent_channel=None,
    metadata={"streamSid": STREAM_SID, "accountSid": ACCOUNT_SID, "tracks": "inbound,outbound"},
)


# ------------------------------------------------------------------------------------------ transcripts


def test_a_whole_call_on_both_tracks() -> None:
    adapter = TwilioMediaStream()
    events = feed(
        adapter,
        connected(),
        start(1),
        media(2, "inbound", 1, 0, CUSTOMER_VOICE[0]),
        media(3, "outbound", 1, 0, AGENT_VOICE[0]),
        media(4, "inbound", 2, 20, CUSTOMER_VOICE[1]),
        media(5, "outbound", 2, 20, AGENT_VOICE[1]),
        mark(6),
        dtmf(7),
        media(8, "outbound", 3, 40, AGENT_VOICE[2]),
        stop(9),
    )
    assert events == [
        STARTED,
        AudioChunk(CUSTOMER_VOICE[0], is_agent=False, media_time=0.0),
        AudioChunk(AGENT_VOICE[0], is_agent=True, media_time=0.0),
        AudioChunk(CUSTOMER_VOICE[1], is_agent=False, media_time=0.02),
        AudioChunk(AGENT_VOICE[1], is_agent=True, media_time=0.02),
        AudioChunk(AGENT_VOICE[2], is_agent=True, media_time=0.04),
        CallEnded("stop"),
    ]
    assert len(AGENT_VOICE[0]) == 160
    assert adapter.close_requested == CloseRequest(1000, "stream stopped")
    assert adapter.data_to_send() == []  # Twilio's stream is one-way


def test_the_agent_track_is_configurable() -> None:
    adapter = TwilioMediaStream(agent_track="inbound")
    events = feed(
        adapter,
        connected(),
        start(1),
        media(2, "inbound", 1, 0, AGENT_VOICE[0]),
        media(3, "outbound", 1, 0, CUSTOMER_VOICE[0]),
    )
    assert [event.is_agent for event in events if isinstance(event, AudioChunk)] == [True, False]


def test_an_unknown_agent_track_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="agent_track must be 'inbound' or 'outbound'"):
        TwilioMediaStream(agent_track="both")  # type: ignore[arg-type]


def test_events_come_out_once() -> None:
    adapter = TwilioMediaStream()
    assert feed(adapter, connected(), start(1)) == [STARTED]
    assert adapter.events_received() == []


def test_a_start_without_connected_tracks_or_parameters_is_enough() -> None:
    # Some Twilio-compatible carriers skip `connected`; `tracks` and `customParameters` are optional.
    message = start(1)
    del message["start"]["tracks"], message["start"]["customParameters"], message["start"]["accountSid"]
    adapter = TwilioMediaStream()
    assert feed(adapter, message) == [
        CallStarted(
            call_id=CALL_SID,
            encoding="mulaw",
            sample_rate=8000,
            channels=1,
            metadata={"streamSid": STREAM_SID},
        )
    ]


def test_sequence_numbers_may_be_json_integers_and_start_anywhere() -> None:
    adapter = TwilioMediaStream()
    first, second = start(7), media(8, "outbound", 1, 0, AGENT_VOICE[0])
    first["sequenceNumber"], second["sequenceNumber"] = 7, 8
    assert feed(adapter, first, second)[1] == AudioChunk(AGENT_VOICE[0], is_agent=True, media_time=0.0)


def test_media_without_timestamp_or_with_an_empty_payload() -> None:
    adapter = TwilioMediaStream()
    untimed = media(2, "outbound", 1, 0, AGENT_VOICE[0])
    del untimed["media"]["timestamp"]
    events = feed(adapter, start(1), untimed, media(3, "outbound", 2, 20, b""))
    assert events[1:] == [AudioChunk(AGENT_VOICE[0], is_agent=True, media_time=None)]
    assert adapter.close_requested is None


def test_messages_after_stop_are_ignored() -> None:
    adapter = TwilioMediaStream()
    feed(adapter, start(1), stop(2))
    assert feed(adapter, media(3, "outbound", 1, 0, AGENT_VOICE[0]), "not json", b"\x00") == []
    assert adapter.close_requested == CloseRequest(1000, "stream stopped")
    adapter.connection_lost()  # the call already ended: no second CallEnded
    assert adapter.events_received() == []


def test_connection_lost_ends_a_live_call_once() -> None:
    adapter = TwilioMediaStream()
    feed(adapter, connected(), start(1), media(2, "outbound", 1, 0, AGENT_VOICE[0]))
    adapter.connection_lost()
    adapter.connection_lost()
    assert adapter.events_received() == [CallEnded("connection lost")]
    assert feed(adapter, media(3, "outbound", 2, 20, AGENT_VOICE[1])) == []
    assert adapter.close_requested is None  # nothing to close: the socket is gone


def test_connection_lost_before_start_ends_nothing() -> None:
    adapter = TwilioMediaStream()
    feed(adapter, connected())
    adapter.connection_lost()
    assert adapter.events_received() == []


def test_fail_closes_with_the_servers_code_and_ends_the_call() -> None:
    adapter = TwilioMediaStream()
    feed(adapter, start(1))
    adapter.fail(4004, "agent agent-042 is not enrolled for tenant acme")
    adapter.fail(1011, "second failure")  # the first close wins
    assert adapter.close_requested == CloseRequest(4004, "agent agent-042 is not enrolled for tenant acme")
    assert adapter.events_received() == [CallEnded("agent agent-042 is not enrolled for tenant acme")]
    assert adapter.data_to_send() == []
    assert feed(adapter, media(2, "outbound", 1, 0, AGENT_VOICE[0])) == []


def test_fail_before_start_only_closes() -> None:
    adapter = TwilioMediaStream()
    adapter.fail(1013, "overloaded: try again later")
    assert adapter.close_requested == CloseRequest(1013, "overloaded: try again later")
    assert adapter.events_received() == []


def test_a_long_close_reason_is_cut_to_fit_a_close_frame() -> None:
    adapter = TwilioMediaStream()
    adapter.fail(1011, "é" * 200)
    assert adapter.close_requested is not None
    reason = adapter.close_requested.reason
    assert len(reason.encode()) <= 123 and reason.endswith("…") and reason.startswith("é")


def test_verdicts_and_alerts_have_no_channel_on_twilio() -> None:
    adapter = TwilioMediaStream()
    feed(adapter, start(1))
    adapter.send_verdict({"state": "MATCH", "score": 0.71})
    adapter.send_alert({"state": "MISMATCH"})
    assert adapter.data_to_send() == []
    assert adapter.events_received() == []


# ------------------------------------------------------------------------------------------ bad input


def with_start(message: dict[str, Any] | str | bytes) -> list[dict[str, Any] | str | bytes]:
    return [connected(), start(1), message]


def media_with(**changes: Any) -> dict[str, Any]:
    message = media(2, "outbound", 1, 0, AGENT_VOICE[0])
    message["media"].update(changes)
    return message


def start_with(**changes: Any) -> dict[str, Any]:
    return start(1, **changes)


def without(message: dict[str, Any], *path: str) -> dict[str, Any]:
    *parents, last = path
    inner = message
    for key in parents:
        inner = inner[key]
    del inner[last]
    return message


def media_for_stream(sid: str) -> dict[str, Any]:
    message = media(2, "outbound", 1, 0, AGENT_VOICE[0])
    message["streamSid"] = sid
    return message


def with_seq(message: dict[str, Any], seq: object) -> dict[str, Any]:
    message["sequenceNumber"] = seq
    return message


BAD_INPUT: list[tuple[str, list[dict[str, Any] | str | bytes], int, str]] = [
    # (name, frames, close code, words the reason must contain)
    ("binary frame", [connected(), b"\xff" * 160], 1003, "binary frame of 160 bytes"),
    ("not json", ['{"event": "media"'], 1003, "not JSON: Expecting"),
    ("json array", ['["connected"]'], 1003, "must be a JSON object, got array"),
    ("json string", ['"connected"'], 1003, "got string"),
    ("nested too deep", ["[" * 60_000], 1003, "too deep"),
    ("huge number", ['{"event": "media", "x": ' + "1" * 5000 + "}"], 1003, "too long a number"),
    ("no event", [{"protocol": "Call"}], 1003, 'no "event" string (got none)'),
    ("event not a string", [{"event": 3}], 1003, "(got number)"),
    (
        "unknown event",
        [connected(), {"event": "clear", "streamSid": STREAM_SID}],
        1003,
        'unknown event "clear"',
    ),
    # JSON can carry a lone surrogate; quoted in a close reason it must become valid UTF-8.
    ("lone surrogate", ['{"event": "clear\\ud800"}'], 1003, 'unknown event "clear\\ud800"'),
    (
        "deeply nested value",
        [start_with(tracks=json.loads("[" * 500 + "]" * 500))],
        1003,
        "start.tracks [[[[[[",
    ),
    (
        "frame too big",
        [json.dumps({"event": "connected", "pad": "x" * 70_000})],
        1009,
        "exceeds the 65536-byte",
    ),
    (
        "media before start",
        [connected(), media(1, "outbound", 1, 0, b"\xff")],
        1002,
        "media message before start",
    ),
    ("mark before start", [mark(1)], 1002, "mark message before start"),
    ("stop before start", [connected(), stop(1)], 1002, "stop message before start"),
    ("second start", with_start(start(2)), 1002, "second start"),
    ("connected after start", with_start(connected()), 1002, "connected message after start"),
    ("second connected", [connected(), connected()], 1002, "second connected"),
    (
        "wrong media format",
        [start_with(mediaFormat={"encoding": "audio/G722", "sampleRate": 16000, "channels": 1})],
        1003,
        'mediaFormat "audio/G722", 16000 Hz, 1 ch is not supported',
    ),
    (
        "stereo",
        [start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2})],
        1003,
        '"audio/x-mulaw", 8000 Hz, 2 ch is not supported',
    ),
    (
        "rate as a string",
        [start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": "8000", "channels": 1})],
        1003,
        '"8000" Hz',
    ),
    (
        "channels as true",
        [start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": True})],
        1003,
        "true ch",
    ),
    ("no media format", [without(start(1), "start", "mediaFormat")], 1003, "start.mediaFormat is missing"),
    ("no call sid", [without(start(1), "start", "callSid")], 1003, "start.callSid is missing"),
    (
        "empty stream sid",
        [start_with(streamSid="")],
        1003,
        'start.streamSid "" is invalid: use 1-128 of',
    ),
    ("no start object", [without(start(1), "start")], 1003, "start is missing"),
    ("start not an object", [{**start(1), "start": []}], 1003, "start must be an object, got array"),
    ("agent track missing", [start_with(tracks=["inbound"])], 1003, "lacks the agent's outbound track"),
    ("tracks not a list", [start_with(tracks="both")], 1003, 'start.tracks "both" is not a list'),
    ("bad parameters", [start_with(customParameters=["agent"])], 1003, "customParameters must be an object"),
    (
        "bad agent id",
        [start_with(customParameters={"agent_id": "bob smith"})],
        1003,
        'customParameters.agent_id "bob smith" is invalid',
    ),
    (
        "bad tenant",
        [start_with(customParameters={"tenant": "acme/eu"})],
        1003,
        'customParameters.tenant "acme/eu" is invalid',
    ),
    ("start for another stream", [{**start(1), "streamSid": "MZother"}], 1002, 'start for stream "MZother"'),
    (
        "start without sequence number",
        [without(start(1), "sequenceNumber")],
        1003,
        "start message has no sequenceNumber",
    ),
    (
        "sequence number not a number",
        [with_seq(start(1), "one")],
        1003,
        'sequenceNumber "one", not a whole number',
    ),
    ("negative sequence number", [with_seq(start(1), -1)], 1003, "sequenceNumber -1, not a whole number"),
    ("non-ascii digits", [with_seq(start(1), "١")], 1003, "not a whole number"),
    (
        "repeated sequence number",
        with_start(media(1, "outbound", 1, 0, b"\xff")),
        1002,
        "1 after 1: repeated",
    ),
    ("backward sequence number", [start(5), media(3, "outbound", 1, 0, b"\xff")], 1002, "3 after 5"),
    (
        "gap in sequence numbers",
        with_start(media(4, "outbound", 1, 0, b"\xff")),
        1002,
        "from 1 to 4: 2 message(s) lost",
    ),
    (
        "invalid base64",
        with_start(media_with(payload="no+Jh!oaJ")),
        1003,
        'media.payload "no+Jh!oaJ" is not valid base64',
    ),
    ("truncated base64", with_start(media_with(payload="no+Jh")), 1003, "not valid base64"),
    ("non-ascii base64", with_start(media_with(payload="nö+J")), 1003, "not valid base64"),
    (
        "payload not a string",
        with_start(media_with(payload=[1, 2])),
        1003,
        "must be a base64 string, got a array",
    ),
    (
        "no payload",
        with_start(without(media(2, "outbound", 1, 0, b""), "media", "payload")),
        1003,
        "got missing",
    ),
    (
        "payload too big",
        with_start(media_with(payload=base64.b64encode(bytes(9000)).decode())),
        1009,
        "media.payload of about 9000 bytes exceeds the 8000-byte limit",
    ),
    (
        "unknown track",
        with_start(media_with(track="both")),
        1003,
        'media.track "both" is not inbound or outbound',
    ),
    (
        "no media object",
        with_start(without(media(2, "outbound", 1, 0, b""), "media")),
        1003,
        "media is missing",
    ),
    (
        "bad timestamp",
        with_start(media_with(timestamp="5.5")),
        1003,
        'media.timestamp "5.5" is not a whole number',
    ),
    (
        "media for another stream",
        with_start(media_for_stream("MZ00000000000000000000000000000000")),
        1002,
        f'media for stream "MZ00000000000000000000000000000000", not this stream {STREAM_SID}',
    ),
    (
        "media without stream sid",
        with_start(without(media(2, "outbound", 1, 0, b""), "streamSid")),
        1003,
        "no streamSid",
    ),
]


@pytest.mark.parametrize(
    ("frames", "code", "words"), [case[1:] for case in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_is_a_violation_with_a_precise_reason(
    frames: list[dict[str, Any] | str | bytes], code: int, words: str
) -> None:
    adapter = TwilioMediaStream()
    events = feed(adapter, *frames)
    violations = [event for event in events if isinstance(event, ProtocolViolation)]
    assert len(violations) == 1, events
    violation = violations[0]
    assert (violation.code, words in violation.reason) == (code, True), violation.reason
    assert len(violation.reason.encode()) <= 123
    assert adapter.close_requested == CloseRequest(code, violation.reason)
    assert adapter.data_to_send() == []
    # A started call also ends, so the session sees one CallEnded per CallStarted.
    started = any(isinstance(event, CallStarted) for event in events)
    assert events[-1] == (CallEnded("protocol violation") if started else violation)
    # Nothing is read after a violation.
    assert feed(adapter, media(99, "outbound", 1, 0, b"\xff"), b"\x00") == []


def test_a_smaller_message_limit_is_honoured() -> None:
    adapter = TwilioMediaStream(max_message_bytes=200)
    events = feed(adapter, json.dumps({"event": "connected", "pad": "é" * 100}, ensure_ascii=False))
    assert events == [ProtocolViolation(1009, "text frame of 233 bytes exceeds the 200-byte limit")]


def test_a_smaller_payload_limit_is_honoured() -> None:
    adapter = TwilioMediaStream(max_payload_bytes=160)
    events = feed(
        adapter, start(1), media(2, "outbound", 1, 0, tone(300)), media(3, "outbound", 2, 20, tone(300, 40))
    )
    assert isinstance(events[1], AudioChunk)
    assert events[2] == ProtocolViolation(
        1009, "media.payload of about 321 bytes exceeds the 160-byte limit (Twilio sends 160)"
    )


# ------------------------------------------------------------------------------------------ signatures

# From twilio-python's request validator tests (tests/unit/test_request_validator.py).
TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}


def test_signature_matches_twilios_own_vector() -> None:
    assert twilio_signature(TOKEN, URL, PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert validate_twilio_signature(TOKEN, URL, "RSOYDt4T1cUTdK1PDd93/VVr8B8=", PARAMS)


def test_signature_of_a_websocket_upgrade_is_the_url_alone() -> None:
    url = "wss://vpmon.example.com/twilio/stream"
    expected = base64.b64encode(hmac.new(b"s3cret", url.encode(), hashlib.sha1).digest()).decode()
    assert twilio_signature("s3cret", url) == expected
    assert validate_twilio_signature("s3cret", url, expected)


def test_signature_tolerates_a_port_added_or_removed_by_a_proxy() -> None:
    # The same vectors as Twilio's SDK: the URL with :443 added, and with another port dropped.
    assert validate_twilio_signature(TOKEN, URL, "kvajT1Ptam85bY51eRf/AJRuM3w=", PARAMS)
    assert validate_twilio_signature(
        TOKEN, URL.replace(".com", ".com:1234"), "RSOYDt4T1cUTdK1PDd93/VVr8B8=", PARAMS
    )
    http = URL.replace("https", "http")
    assert validate_twilio_signature(TOKEN, http, "0ZXoZLH/DfblKGATFgpif+LLRf4=", PARAMS)


@pytest.mark.parametrize(
    ("token", "url", "signature", "params"),
    [
        ("54321", URL, "RSOYDt4T1cUTdK1PDd93/VVr8B8=", PARAMS),  # another account's token
        (TOKEN, URL + "&baz=3", "RSOYDt4T1cUTdK1PDd93/VVr8B8=", PARAMS),  # another URL
        (TOKEN, URL, "RSOYDt4T1cUTdK1PDd93/VVr8B8=", {**PARAMS, "Digits": "9"}),  # tampered form
        (TOKEN, URL, "", PARAMS),
        (TOKEN, URL, "RSOYDt4T1cUTdK1PDd93/VVr8B8é", PARAMS),  # not even ASCII: False, not TypeError
        (TOKEN, "https://host:99999/x", "RSOYDt4T1cUTdK1PDd93/VVr8B8=", PARAMS),  # invalid port
    ],
)
def test_a_wrong_signature_is_refused(token: str, url: str, signature: str, params: dict[str, str]) -> None:
    assert not validate_twilio_signature(token, url, signature, params)


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
    # Messages shaped like Twilio's, with any values in their fields: reaches the deep checks.
    twilio_like = st.fixed_dictionaries(
        {"event": st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "clear"]) | texts},
        optional={
            "sequenceNumber": st.sampled_from(["1", "2", "3", 2, "x"]) | json_values,
            "streamSid": st.sampled_from([STREAM_SID, "MZother"]) | json_values,
            "start": st.just(start(1)["start"]) | json_values,
            "media": st.fixed_dictionaries(
                {},
                optional={
                    "track": st.sampled_from(["inbound", "outbound", "both"]),
                    "payload": st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
                    | json_values,
                    "timestamp": st.sampled_from(["0", "20", "-1"]) | json_values,
                },
            )
            | json_values,
        },
    )
    frames = st.lists(
        st.text(max_size=200)
        | st.binary(max_size=64)
        | json_values.map(json.dumps)
        | twilio_like.map(json.dumps),
        max_size=12,
    )

    @given(frames=frames, preamble=st.booleans())
    def test_any_input_gives_events_or_a_violation_never_an_exception(
        frames: list[str | bytes], preamble: bool
    ) -> None:
        adapter = TwilioMediaStream()
        events = feed(adapter, *([connected(), start(1)] if preamble else []), *frames)
        check_event_stream(adapter, events)

    def check_event_stream(adapter: TwilioMediaStream, events: list[Event]) -> None:
        starts = [i for i, event in enumerate(events) if isinstance(event, CallStarted)]
        ends = [i for i, event in enumerate(events) if isinstance(event, CallEnded)]
        violations = [event for event in events if isinstance(event, ProtocolViolation)]
        assert len(starts) <= 1 and len(ends) <= 1 and len(violations) <= 1
        assert not ends or (starts and starts[0] < ends[0])
        for violation in violations:
            assert violation.code in (1002, 1003, 1009)
            assert len(violation.reason.encode()) <= 123
            assert adapter.close_requested == CloseRequest(violation.code, violation.reason)
        assert adapter.data_to_send() == []

else:

    def test_property_tests_need_hypothesis() -> None:
        pytest.skip("hypothesis is not installed (pip install hypothesis)")
