"""Genesys AudioHook v2 adapter: transcripts of client frames in, exact server JSON and call events out.

The client side is written out by hand here (``Client``), the way the reference client
(purecloudlabs/audiohook-reference-implementation, ``clientsessionimpl.ts``) builds its messages: seq from 1,
serverseq = the last server seq received, position = the media position.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.protocols.audiohook import (
    CLOSE_TIMEOUT_SECONDS,
    NULL_UUID,
    AudioHookSession,
    State,
    format_duration,
    parse_duration,
    required_headers_missing,
    verify_message_signature,
)
from streamer.protocols.events import (
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_AGENT,
    CLOSE_UNSUPPORTED_DATA,
    AudioChunk,
    AudioDiscarded,
    CallEnded,
    CallPaused,
    CallProtocol,
    CallResumed,
    CallStarted,
    CloseRequest,
    ProtocolViolation,
)

SID = "30b0e395-84d3-4570-ac13-9a62d8f514c0"
ORG = "d7934305-0972-4844-938e-9060eef73d05"
CONV = "6f1a1a5e-2b0c-4d57-9c3e-1b2a3c4d5e6f"
PARTICIPANT = {
    "id": "9aba9a07-8dd5-4654-974a-44075c3d2ba5",
    "ani": "+1-555-555-1234",
    "aniName": "John Doe",
    "dnis": "+1-800-555-6789",
}
STEREO = {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000}
EXTERNAL = {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}
INTERNAL = {"type": "audio", "format": "PCMU", "channels": ["internal"], "rate": 8000}
OFFERS = [STEREO, EXTERNAL, INTERNAL]  # what Genesys (and the reference client) offer for a stereo call


def server(sid: str = SID, seq: int = 1, clientseq: int = 1, **kwargs: Any) -> dict[str, Any]:
    """A server message as the adapter must write it."""
    message_type, parameters = next(iter(kwargs.items()))
    return {
        "version": "2",
        "id": sid,
        "type": message_type,
        "seq": seq,
        "clientseq": clientseq,
        "parameters": parameters,
    }


class Client:
    """The client half of a session: numbers its messages and tracks the server's, as Genesys does."""

    def __init__(self, session: AudioHookSession, sid: str = SID) -> None:
        self.session = session
        self.sid = sid
        self.seq = 0
        self.serverseq = 0

    def send(
        self, message_type: str, parameters: dict[str, Any] | None = None, position: str = "PT0S"
    ) -> list:
        self.seq += 1
        message = {
            "version": "2",
            "id": self.sid,
            "type": message_type,
            "seq": self.seq,
            "serverseq": self.serverseq,
            "position": position,
            "parameters": {} if parameters is None else parameters,
        }
        return self.raw(json.dumps(message))

    def raw(self, text: str) -> list[dict[str, Any]]:
        self.session.receive_text(text)
        return self.replies()

    def audio(self, data: bytes) -> list[dict[str, Any]]:
        self.session.receive_bytes(data)
        return self.replies()

    def replies(self) -> list[dict[str, Any]]:
        out = [json.loads(frame) for frame in self.session.data_to_send()]
        if out:
            self.serverseq = out[-1]["seq"]
        return out

    def open(
        self,
        media: list[dict[str, Any]] | None = None,
        conversation_id: str = CONV,
        position: str = "PT0S",
        **extra: Any,
    ) -> list[dict[str, Any]]:
        parameters = {
            "organizationId": ORG,
            "conversationId": conversation_id,
            "participant": PARTICIPANT,
            "media": OFFERS if media is None else media,
            **extra,
        }
        return self.send("open", parameters, position)


def opened_session(**kwargs: Any) -> tuple[AudioHookSession, Client]:
    session = AudioHookSession(SID, None, **kwargs)
    client = Client(session)
    client.open()
    session.events_received()
    return session, client


# ---------------------------------------------------------------------------------------------- transcripts


def test_full_session_transcript() -> None:
    session = AudioHookSession(SID, None, organization_id=ORG)
    assert CallProtocol in type(session).__mro__
    client = Client(session)

    assert client.open(language="en-US", customConfig={"queue": "sales"}) == [
        server(seq=1, clientseq=1, opened={"media": [STEREO], "startPaused": False})
    ]
    assert session.events_received() == [
        CallStarted(
            call_id=CONV,
            encoding="mulaw",
            sample_rate=8000,
            channels=2,
            tenant=None,
            agent_id=None,
            agent_channel=1,
            metadata={
                "protocol": "audiohook",
                "sessionId": SID,
                "organizationId": ORG,
                "conversationId": CONV,
                "participantId": PARTICIPANT["id"],
                "ani": "+1-555-555-1234",
                "aniName": "John Doe",
                "dnis": "+1-800-555-6789",
                "mediaFormat": "PCMU",
                "mediaChannels": "external,internal",
                "agentChannel": "internal",
                "startPosition": "PT0S",
                "language": "en-US",
                "customConfig": '{"queue":"sales"}',
            },
        )
    ]

    # ping → pong, whose clientseq is the ping's seq (the reference client checks exactly that)
    session.receive_text(
        json.dumps(
            {
                "version": "2",
                "id": SID,
                "type": "ping",
                "seq": 2,
                "serverseq": 1,
                "position": "PT0S",
                "parameters": {},
            }
        )
    )
    assert session.data_to_send() == [
        f'{{"version":"2","id":"{SID}","type":"pong","seq":2,"clientseq":2,"parameters":{{}}}}'
    ]
    client.seq, client.serverseq = 2, 2

    # 100 ms of interleaved stereo PCMU per frame: external, internal, external, internal...
    frame = bytes([0x11, 0x22]) * 800
    assert client.audio(frame) == []
    assert client.audio(frame) == []
    assert session.events_received() == [AudioChunk(frame, True, 0.0), AudioChunk(frame, True, 0.1)]
    assert session.position == pytest.approx(0.2)

    # the client pauses (a hold): it reports paused and stops audio; the server does not answer
    assert client.send("paused", position="PT0.2S") == []
    assert session.events_received() == [CallPaused()]
    assert session.state is State.PAUSED
    # ... 10 s later it resumes: the gap starts where the pause did and lasts 10 s
    assert client.send("resumed", {"start": "PT0.2S", "discarded": "PT10S"}, position="PT10.2S") == []
    assert session.events_received() == [CallResumed()]
    assert client.audio(frame) == []
    assert session.events_received() == [AudioChunk(frame, True, 10.2)]

    # the client dropped half a second of audio (a full buffer): the position moves past the gap
    assert client.send("discarded", {"start": "PT10.3S", "discarded": "PT0.5S"}, position="PT10.8S") == []
    assert session.events_received() == [AudioDiscarded(media_time=10.3, seconds=0.5)]
    assert client.audio(frame) == []
    assert session.events_received() == [AudioChunk(frame, True, 10.8)]

    assert client.send("update", {"language": "fr-FR"}, position="PT10.9S") == [
        server(seq=3, clientseq=6, updated={})
    ]
    assert session.language == "fr-FR"

    assert client.send("close", {"reason": "end"}, position="PT10.9S") == [
        server(seq=4, clientseq=7, closed={})
    ]
    assert session.events_received() == [CallEnded("end")]
    assert session.close_requested == CloseRequest(CLOSE_NORMAL, "session closed")
    assert session.state is State.CLOSED

    # the client's websocket close follows; nothing more happens
    session.connection_lost()
    client.audio(frame)
    assert session.events_received() == []
    assert session.data_to_send() == []


def test_server_messages_have_the_reference_clients_shape() -> None:
    _session, client = opened_session()
    out = [*client.send("ping"), *client.send("update", {"language": "en-US"}), *client.send("close")]
    assert [message["seq"] for message in out] == [2, 3, 4]  # opened was 1
    for message in out:
        assert set(message) == {"version", "id", "type", "seq", "clientseq", "parameters"}
        assert message["version"] == "2" and message["id"] == SID and message["parameters"] == {}
    assert [message["clientseq"] for message in out] == [2, 3, 4]


def test_replayed_audio_continues_from_the_open_position() -> None:
    session = AudioHookSession(SID, None)
    client = Client(session)
    client.open(position="PT5S")
    frame = bytes(1600)
    for _ in range(3):
        client.audio(frame)
    events = session.events_received()
    assert isinstance(events[0], CallStarted) and events[0].metadata["startPosition"] == "PT5S"
    assert [event.media_time for event in events[1:]] == pytest.approx([5.0, 5.1, 5.2])


def test_media_time_counts_audio_and_gaps_not_message_positions() -> None:
    session, client = opened_session()
    frame = bytes(1600)
    client.audio(frame)
    client.send("ping", position="PT30S")  # e.g. the capture position while buffered audio is replayed
    client.audio(frame)
    client.send("discarded", {"start": "PT0S", "discarded": "PT0.1S"}, position="PT30S")  # a stale gap
    client.audio(frame)
    assert session.events_received() == [
        AudioChunk(frame, True, 0.0),
        AudioChunk(frame, True, 0.1),
        AudioDiscarded(0.0, 0.1),
        AudioChunk(frame, True, 0.2),  # never backwards
    ]


def test_empty_audio_frame_yields_nothing() -> None:
    session, client = opened_session()
    assert client.audio(b"") == []
    assert session.events_received() == []


# ---------------------------------------------------------------------------------------------- media


@pytest.mark.parametrize(
    ("offers", "kwargs", "selected", "agent_channel", "encoding"),
    [
        (OFFERS, {}, STEREO, 1, "mulaw"),
        ([EXTERNAL, INTERNAL, STEREO], {}, STEREO, 1, "mulaw"),
        (
            [{**STEREO, "channels": ["internal", "external"]}],
            {},
            {**STEREO, "channels": ["internal", "external"]},
            0,
            "mulaw",
        ),
        ([EXTERNAL, INTERNAL], {}, INTERNAL, 0, "mulaw"),
        ([EXTERNAL], {}, EXTERNAL, None, "mulaw"),
        ([EXTERNAL], {"accept_external_only": False}, None, None, None),
        ([{**STEREO, "format": "L16"}], {}, None, None, None),
        (
            [{**STEREO, "format": "L16"}],
            {"formats": ("PCMU", "L16")},
            {**STEREO, "format": "L16"},
            1,
            "pcm16",
        ),
        (
            [{**STEREO, "format": "L16"}, INTERNAL],
            {"formats": ("PCMU", "L16")},
            {**STEREO, "format": "L16"},
            1,
            "pcm16",
        ),
        (
            [{**STEREO, "rate": 16000}, {**STEREO, "format": "opus"}, {**STEREO, "type": "video"}],
            {},
            None,
            None,
            None,
        ),
        (
            [{**STEREO, "channels": ["internal", "internal"]}, {**INTERNAL, "channels": ["agent"]}],
            {},
            None,
            None,
            None,
        ),
        ([], {}, None, None, None),
    ],
)
def test_media_choice(
    offers: list[dict[str, Any]],
    kwargs: dict[str, Any],
    selected: dict[str, Any] | None,
    agent_channel: int | None,
    encoding: str | None,
) -> None:
    session = AudioHookSession(SID, None, **kwargs)
    client = Client(session)
    media = [selected] if selected is not None else []
    assert client.open(offers) == [server(opened={"media": media, "startPaused": False})]
    events = session.events_received()
    if selected is None:
        assert events == [] and session.selected_media is None
        return
    (started,) = events
    assert isinstance(started, CallStarted)
    assert (started.channels, started.agent_channel, started.encoding) == (
        len(selected["channels"]),
        agent_channel,
        encoding,
    )


def test_offer_is_echoed_without_extra_fields() -> None:
    session = AudioHookSession(SID, None)
    client = Client(session)
    out = client.raw(
        json.dumps(
            {
                "version": "2",
                "id": SID,
                "type": "open",
                "seq": 1,
                "serverseq": 0,
                "position": "PT0S",
                "parameters": {
                    "organizationId": ORG,
                    "conversationId": CONV,
                    "participant": PARTICIPANT,
                    "media": [{**STEREO, "x": float("nan")}],
                },
            }
        )
    )
    assert out == [server(opened={"media": [STEREO], "startPaused": False})]


def test_external_only_audio_is_not_the_agents() -> None:
    session = AudioHookSession(SID, None)
    client = Client(session)
    client.open([EXTERNAL])
    (started,) = session.events_received()
    assert started.agent_channel is None and started.metadata["agentChannel"] == "none"
    client.audio(bytes(800))
    assert session.events_received() == [AudioChunk(bytes(800), False, 0.0)]


def test_l16_frames_are_two_bytes_a_sample() -> None:
    session = AudioHookSession(SID, None, formats=("L16",))
    client = Client(session)
    client.open([{**STEREO, "format": "L16"}])
    session.events_received()
    client.audio(bytes(3200))  # 100 ms of 16-bit stereo
    assert session.events_received() == [AudioChunk(bytes(3200), True, 0.0)]
    assert session.position == pytest.approx(0.1)
    out = client.audio(bytes(3202))
    assert out[0]["parameters"]["reason"] == "error"


def test_no_media_selected_then_audio_is_an_error() -> None:
    session = AudioHookSession(SID, None)
    client = Client(session)
    client.open([{**STEREO, "rate": 16000}])
    out = client.audio(bytes(320))
    assert out[0]["type"] == "disconnect" and "no media" in out[0]["parameters"]["info"]


def test_supported_languages_are_answered_when_asked() -> None:
    session = AudioHookSession(SID, None)
    client = Client(session)
    assert client.open(supportedLanguages=True) == [
        server(opened={"media": [STEREO], "startPaused": False, "supportedLanguages": []})
    ]


# ---------------------------------------------------------------------------------------------- probe, auth


def test_probe_is_answered_and_never_reaches_the_pipeline() -> None:
    session = AudioHookSession(SID, None)
    client = Client(session)
    probe_participant = {"id": NULL_UUID, "ani": "", "aniName": "", "dnis": ""}
    assert client.send(
        "open",
        {
            "organizationId": ORG,
            "conversationId": NULL_UUID,
            "participant": probe_participant,
            "media": OFFERS,
        },
    ) == [server(opened={"media": [STEREO], "startPaused": False})]
    assert session.is_probe
    client.audio(bytes(1600))
    assert client.send("close", {"reason": "end"}) == [server(seq=2, clientseq=2, closed={})]
    assert session.close_requested == CloseRequest(CLOSE_NORMAL, "session closed")
    session.connection_lost()
    assert session.events_received() == []


@pytest.mark.parametrize("conversation_id", [CONV, NULL_UUID])
def test_unauthorized_session_is_disconnected_on_open(conversation_id: str) -> None:
    session = AudioHookSession(SID, "unknown API key")
    client = Client(session)
    assert client.open(conversation_id=conversation_id) == [
        server(disconnect={"reason": "unauthorized", "info": "unknown API key"})
    ]
    assert session.awaiting_close and session.close_requested is None
    assert session.is_probe is (conversation_id == NULL_UUID)
    assert client.audio(bytes(1600)) == []  # in flight before the client read our disconnect
    assert client.send("ping") == [server(seq=2, clientseq=2, pong={})]
    assert client.send("close", {"reason": "disconnect"}) == [server(seq=3, clientseq=3, closed={})]
    assert session.close_requested == CloseRequest(CLOSE_UNAUTHORIZED, "unknown API key")
    assert session.events_received() == []


def test_organization_must_match_the_header() -> None:
    session = AudioHookSession(SID, None, organization_id="11111111-2222-4333-8444-555555555555")
    client = Client(session)
    (out,) = client.open()
    assert out["type"] == "disconnect" and out["parameters"]["reason"] == "unauthorized"
    assert "organizationId" in out["parameters"]["info"]
    assert session.events_received() == []


def test_organization_id_compares_without_case() -> None:
    session = AudioHookSession(SID, None, organization_id=ORG.upper())
    assert Client(session).open()[0]["type"] == "opened"


# ---------------------------------------------------------------------------------------------- violations


def _message(**overrides: Any) -> str:
    message: dict[str, Any] = {
        "version": "2",
        "id": SID,
        "type": "ping",
        "seq": 2,
        "serverseq": 1,
        "position": "PT0S",
        "parameters": {},
    }
    message.update(overrides)
    return json.dumps({key: value for key, value in message.items() if value is not ...})


PAUSED = _message(type="paused")
OPEN_AGAIN = _message(
    type="open",
    parameters={"organizationId": ORG, "conversationId": CONV, "participant": PARTICIPANT, "media": OFFERS},
)


@pytest.mark.parametrize(
    ("frames", "code", "info", "clientseq"),
    [
        (["{not json"], CLOSE_UNSUPPORTED_DATA, "not JSON", 1),
        (["[1, 2]"], CLOSE_UNSUPPORTED_DATA, "must be a JSON object", 1),
        ([_message(version="1")], CLOSE_UNSUPPORTED_DATA, "version", 1),
        ([_message(version=2)], CLOSE_UNSUPPORTED_DATA, "version", 1),
        ([_message(version=...)], CLOSE_UNSUPPORTED_DATA, "version", 1),
        ([_message(id="11111111-2222-4333-8444-555555555555")], CLOSE_PROTOCOL_ERROR, "session's id", 2),
        ([_message(id="session-1")], CLOSE_UNSUPPORTED_DATA, "id must be a UUID", 1),
        ([_message(seq=1)], CLOSE_PROTOCOL_ERROR, "seq 1 after 1", 1),
        ([_message(seq=3)], CLOSE_PROTOCOL_ERROR, "seq 3 after 1", 1),
        ([_message(seq="2")], CLOSE_UNSUPPORTED_DATA, "seq must be", 1),
        ([_message(seq=2.0)], CLOSE_UNSUPPORTED_DATA, "seq must be", 1),
        ([_message(serverseq=5)], CLOSE_PROTOCOL_ERROR, "serverseq 5", 2),
        ([_message(serverseq=...)], CLOSE_UNSUPPORTED_DATA, "serverseq", 1),
        ([_message(position="6.3")], CLOSE_UNSUPPORTED_DATA, "position", 1),
        ([_message(position="PT1M2S")], CLOSE_UNSUPPORTED_DATA, "position", 1),
        ([_message(parameters=...)], CLOSE_UNSUPPORTED_DATA, "parameters", 1),
        ([_message(parameters=[])], CLOSE_UNSUPPORTED_DATA, "parameters", 1),
        ([_message(type="bogus")], CLOSE_UNSUPPORTED_DATA, "unknown message type", 2),
        ([_message(type=7)], CLOSE_UNSUPPORTED_DATA, "type must be a string", 1),
        ([OPEN_AGAIN], CLOSE_PROTOCOL_ERROR, "second open", 2),
        ([_message(type="discarded", parameters={"start": "PT1S"})], CLOSE_UNSUPPORTED_DATA, "discarded", 2),
        ([_message(type="resumed", parameters={})], CLOSE_UNSUPPORTED_DATA, "start", 2),
        ([_message(parameters={"rtt": "fast"})], CLOSE_UNSUPPORTED_DATA, "rtt", 2),
        (
            [_message(type="error", parameters={"code": "x", "message": "m"})],
            CLOSE_UNSUPPORTED_DATA,
            "code",
            2,
        ),
        (["x" * 70_000], CLOSE_TOO_BIG, "70000 characters", 1),
        ([bytes(1601)], CLOSE_UNSUPPORTED_DATA, "whole number of 2-byte", 1),
        ([bytes(600_000)], CLOSE_TOO_BIG, "600000 bytes", 1),
        ([PAUSED, bytes(1600)], CLOSE_PROTOCOL_ERROR, "audio while paused", 2),
    ],
)
def test_violations_after_open_disconnect_with_error(
    frames: list, code: int, info: str, clientseq: int
) -> None:
    session, client = opened_session()
    out: list[dict[str, Any]] = []
    for frame in frames:
        out += client.audio(frame) if isinstance(frame, bytes) else client.raw(frame)
    (disconnect,) = out
    assert disconnect == server(seq=2, clientseq=clientseq, disconnect=disconnect["parameters"])
    assert disconnect["parameters"]["reason"] == "error"
    assert info in disconnect["parameters"]["info"]
    events = session.events_received()
    assert events[-2:] == [ProtocolViolation(code, events[-2].reason), CallEnded("protocol violation")]
    assert info in events[-2].reason
    assert session.awaiting_close and session.close_requested is None

    # the client answers the disconnect with a close transaction; a message we rejected may have used a seq
    client.seq = 9
    assert client.send("close", {"reason": "disconnect"}) == [server(seq=3, clientseq=10, closed={})]
    assert session.close_requested is not None and session.close_requested.code == code
    assert session.events_received() == []


@pytest.mark.parametrize(
    ("frame", "code", "info"),
    [
        (bytes(160), CLOSE_PROTOCOL_ERROR, "audio before opened"),
        (_message(type="paused", seq=1, serverseq=0), CLOSE_PROTOCOL_ERROR, "paused message before open"),
        (_message(type="update", seq=1, serverseq=0), CLOSE_PROTOCOL_ERROR, "update message before open"),
        (
            _message(type="open", seq=1, serverseq=0, parameters={"organizationId": ORG}),
            CLOSE_UNSUPPORTED_DATA,
            "conversationId",
        ),
        (
            _message(
                type="open",
                seq=1,
                serverseq=0,
                parameters={"organizationId": ORG, "conversationId": CONV, "participant": {}, "media": [{}]},
            ),
            CLOSE_UNSUPPORTED_DATA,
            "media[0]",
        ),
    ],
)
def test_violations_before_open(frame: str | bytes, code: int, info: str) -> None:
    session = AudioHookSession(SID, None)
    client = Client(session)
    out = client.audio(frame) if isinstance(frame, bytes) else client.raw(frame)
    assert out[0]["type"] == "disconnect" and out[0]["parameters"]["reason"] == "error"
    assert info in out[0]["parameters"]["info"]
    assert session.events_received() == [ProtocolViolation(code, out[0]["parameters"]["info"])]


def test_ping_error_and_close_are_fine_before_open() -> None:
    session = AudioHookSession(SID, None)
    client = Client(session)
    assert client.send("ping") == [server(pong={})]
    assert client.send("error", {"code": 500, "message": "Internal client error"}) == []
    assert session.client_error == (500, "Internal client error")
    assert client.send("close", {"reason": "error"}) == [server(seq=2, clientseq=3, closed={})]
    assert session.events_received() == []


def test_input_after_a_disconnect_is_ignored_until_close() -> None:
    session, client = opened_session()
    client.raw("{oops")  # seq 2 was never read
    session.events_received()
    client.seq = 2
    assert client.raw("{again") == []
    assert client.send("bogus") == []
    assert client.send("update", {"language": "en-US"}) == []
    assert client.audio(bytes(3)) == []
    assert session.events_received() == []
    assert session.awaiting_close


def test_close_timeout_closes_anyway() -> None:
    session, client = opened_session()
    client.audio(bytes(3))
    session.events_received()
    assert CLOSE_TIMEOUT_SECONDS == 10.0 and session.close_requested is None
    session.close_timeout_expired()
    assert session.close_requested is not None and session.close_requested.code == CLOSE_UNSUPPORTED_DATA
    assert session.data_to_send() == []
    session.close_timeout_expired()
    assert client.send("close") == []


def test_dtmf_and_playback_messages_are_ignored() -> None:
    session, client = opened_session()
    assert client.send("dtmf", {"digit": "1"}) == []
    assert client.send("playback_completed") == []
    assert client.send("ping") == [server(seq=2, clientseq=4, pong={})]
    assert session.events_received() == []


def test_paused_twice_and_resumed_when_not_paused_change_nothing() -> None:
    session, client = opened_session()
    assert client.send("resumed", {"start": "PT0S", "discarded": "PT0S"}) == []
    assert client.send("paused") == []
    assert client.send("paused") == []
    assert session.events_received() == [CallPaused()]


def test_ping_rtt_is_kept() -> None:
    session, client = opened_session()
    client.send("ping", {"rtt": "PT0.125S"})
    assert session.last_rtt == 0.125


# ---------------------------------------------------------------------------------------------- ending


@pytest.mark.parametrize(
    ("code", "wire_reason"),
    [(CLOSE_UNKNOWN_AGENT, "error"), (CLOSE_NORMAL, "completed"), (CLOSE_UNAUTHORIZED, "unauthorized")],
)
def test_fail_disconnects_then_awaits_the_close(code: int, wire_reason: str) -> None:
    session, client = opened_session()
    session.fail(code, "agent bob is not enrolled")
    assert client.replies() == [
        server(seq=2, disconnect={"reason": wire_reason, "info": "agent bob is not enrolled"})
    ]
    assert session.events_received() == [CallEnded("agent bob is not enrolled")]
    assert session.awaiting_close and session.close_requested is None
    assert client.send("close", {"reason": "disconnect"}) == [server(seq=3, clientseq=2, closed={})]
    assert session.close_requested == CloseRequest(code, "agent bob is not enrolled")
    assert session.events_received() == []


def test_fail_again_while_awaiting_the_close_closes_at_once() -> None:
    session, client = opened_session()
    session.fail(CLOSE_UNKNOWN_AGENT, "agent bob is not enrolled")
    client.replies()
    session.fail(CLOSE_NORMAL, "no message for 60 s")  # e.g. the I/O layer's idle timeout
    assert session.close_requested == CloseRequest(CLOSE_UNKNOWN_AGENT, "agent bob is not enrolled")
    assert session.data_to_send() == [] and session.events_received() == [
        CallEnded("agent bob is not enrolled")
    ]
    assert client.send("close") == []


def test_connection_lost_ends_the_call_once() -> None:
    session, _client = opened_session()
    session.connection_lost()
    session.connection_lost()
    assert session.events_received() == [CallEnded("connection lost")]
    session.fail(CLOSE_NORMAL, "late")
    session.receive_bytes(bytes(1600))
    assert session.events_received() == [] and session.data_to_send() == []


def test_connection_lost_before_open_says_nothing() -> None:
    session = AudioHookSession(SID, None)
    session.connection_lost()
    assert session.events_received() == []


def test_verdicts_and_alerts_go_nowhere() -> None:
    session, _client = opened_session()
    session.send_verdict({"verdict": "MATCH"})
    session.send_alert({"verdict": "MISMATCH"})
    assert session.data_to_send() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"session_id": "not-a-uuid"},
        {"formats": ()},
        {"formats": ("PCMU", "PCMU")},
        {"formats": ("opus",)},
        {"max_frame_bytes": 1},
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"session_id": SID, "auth_error": None, **kwargs}
    with pytest.raises(ValueError):
        AudioHookSession(**arguments)


# ---------------------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("PT0S", 0.0), ("PT6.3S", 6.3), ("PT.5S", 0.5), ("PT12.125S", 12.125), ("PT0.000000001S", 1e-9)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "PT", "PTS", "PT-1S", "PT1.S", "PT1e3S", "P1D", "PT1M", "PT1M2S", "pt1s", " PT1S", "PT1,5S"]
)
def test_parse_duration_refuses_other_forms(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "PT0S"),
        (6.3, "PT6.3S"),
        (1.0, "PT1S"),
        (0.1 + 0.2, "PT0.3S"),
        (1.5e-3, "PT0.0015S"),
        (1e-7, "PT0.0000001S"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf"), 1e9])
def test_format_duration_refuses(seconds: float) -> None:
    with pytest.raises(ValueError):
        format_duration(seconds)


@given(st.integers(min_value=0, max_value=9 * 10**12))  # below 2^53 ns
def test_durations_round_trip(microseconds: int) -> None:
    seconds = microseconds / 1e6
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


# ---------------------------------------------------------------------------------------------- upgrade

# The signed request of the AudioHook session walkthrough ("Establishing connection"), with its client
# secret, as the reference implementation's signature-verifier.test.ts and the Genesys forum quote it.
DOC_SECRET = "TXlTdXBlclNlY3JldEtleVRlbGxOby0xITJAMyM0JDU="
DOC_API_KEY = "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh"
DOC_CREATED = 1641013200
DOC_HEADERS = {
    "Host": "audiohook.example.com",
    "Audiohook-Organization-Id": "d7934305-0972-4844-938e-9060eef73d05",
    "Audiohook-Correlation-Id": "e160e428-53e2-487c-977d-96989bf5c99d",
    "Audiohook-Session-Id": "30b0e395-84d3-4570-ac13-9a62d8f514c0",
    "X-API-KEY": DOC_API_KEY,
    "Signature": "sig1=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:",
    "Signature-Input": 'sig1=("@request-target" "@authority" "audiohook-organization-id" '
    '"audiohook-session-id" "audiohook-correlation-id" "x-api-key");'
    'keyid="SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh";nonce="VGhpc0lzQVVuaXF1ZU5vbmNl";'
    'alg="hmac-sha256";created=1641013200;expires=3282026430',
}
DOC_PATH = "/api/v1/voicebiometrics/ws"
OTHER_SECRET = base64.b64encode(b"another client secret").decode()


def test_required_headers() -> None:
    assert required_headers_missing(DOC_HEADERS) == []
    assert required_headers_missing({key.lower(): value for key, value in DOC_HEADERS.items()}) == []
    assert required_headers_missing(list(DOC_HEADERS.items())) == []
    headers = {**DOC_HEADERS, "X-API-KEY": " ", "Audiohook-Session-Id": "abc"}
    del headers["Audiohook-Correlation-Id"]
    assert required_headers_missing(headers) == [
        "Audiohook-Session-Id",
        "Audiohook-Correlation-Id",
        "X-API-KEY",
    ]


def test_documentation_example_verifies() -> None:
    assert verify_message_signature("GET", None, DOC_PATH, DOC_HEADERS, DOC_SECRET, DOC_CREATED + 1) is None
    pairs = list(reversed(DOC_HEADERS.items()))  # header order does not matter
    assert (
        verify_message_signature("GET", "audiohook.example.com", DOC_PATH, pairs, DOC_SECRET, DOC_CREATED)
        is None
    )


def sign(
    headers: dict[str, str],
    secret: bytes,
    *,
    path: str = "/audiohook?tenant=acme",
    authority: str = "vpmon.example.net:8443",
    params: str = "",
    label: str = "vp",
    components: tuple[str, ...] = (
        "@request-target",
        "@authority",
        "audiohook-organization-id",
        "audiohook-session-id",
        "audiohook-correlation-id",
        "x-api-key",
    ),
) -> dict[str, str]:
    """Sign a request the way RFC 9421 (draft 11) describes, independently of the adapter's code."""
    lower = {key.lower(): value for key, value in headers.items()}
    values = {"@request-target": path, "@authority": authority, "@method": "GET", **lower}
    inner = "(" + " ".join(f'"{name}"' for name in components) + ")" + params
    base = "".join(f'"{name}": {values[name]}\n' for name in components) + f'"@signature-params": {inner}'
    mac = base64.b64encode(hmac.new(secret, base.encode(), hashlib.sha256).digest()).decode()
    return {
        **headers,
        "Host": authority,
        "Signature-Input": f"{label}={inner}",
        "Signature": f"{label}=:{mac}:",
    }


NOW = 1_700_000_000
SECRET = b"0123456789abcdef0123456789abcdef"
SECRET_B64 = base64.b64encode(SECRET).decode()
NONCE = "c2l4dGVlbiByYW5kb20gYnl0ZXM="
GOOD_PARAMS = f';created={NOW};expires={NOW + 60};keyid="key-1";nonce="{NONCE}";alg="hmac-sha256"'
BASE_HEADERS = {
    "Audiohook-Organization-Id": ORG,
    "Audiohook-Session-Id": SID,
    "Audiohook-Correlation-Id": CONV,
    "X-API-KEY": "key-1",
}


def verify(
    headers: dict[str, str], secret: str | None = SECRET_B64, now: float = NOW, **kw: Any
) -> str | None:
    path = kw.pop("path", "/audiohook?tenant=acme")
    return verify_message_signature("GET", kw.pop("authority", None), path, headers, secret, now)


def test_independently_signed_request_verifies() -> None:
    assert verify(sign(BASE_HEADERS, SECRET, params=GOOD_PARAMS)) is None
    assert verify(sign(BASE_HEADERS, SECRET, params=GOOD_PARAMS), now=NOW + 12) is None  # 10 s + skew
    covering_more = ("@method", "@authority", "@request-target", *sorted(k.lower() for k in BASE_HEADERS))
    assert verify(sign(BASE_HEADERS, SECRET, params=GOOD_PARAMS, components=covering_more)) is None
    no_expiry = f';created={NOW};keyid="key-1";nonce="{NONCE}"'  # alg defaults to hmac-sha256
    assert verify(sign(BASE_HEADERS, SECRET, params=no_expiry)) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h: {**h, "Audiohook-Session-Id": "0" + SID[1:]}, "does not match"),
        (lambda h: {**h, "Host": "evil.example.net"}, "does not match"),
        (lambda h: {**h, "Signature": h["Signature"].replace("vp=", "other=")}, "no byte-sequence Signature"),
        (lambda h: {k: v for k, v in h.items() if k != "Signature"}, "must come together"),
        (lambda h: {**h, "Signature": "vp=:not base64!:"}, "malformed"),
        (lambda h: {**h, "Signature-Input": h["Signature-Input"] + ","}, "malformed"),
        (lambda h: {k: v for k, v in h.items() if k != "X-API-KEY"}, "missing X-API-KEY"),
    ],
)
def test_tampered_requests_fail(change: Any, reason: str) -> None:
    result = verify(change(sign(BASE_HEADERS, SECRET, params=GOOD_PARAMS)))
    assert result is not None and reason in result


@pytest.mark.parametrize(
    ("params", "now", "reason"),
    [
        (GOOD_PARAMS, NOW + 14, "older than 10 s"),
        (GOOD_PARAMS, NOW - 4, "in the future"),
        (f';created={NOW};expires={NOW - 5};keyid="key-1";nonce="{NONCE}"', NOW, "expired"),
        (f';expires={NOW + 5};keyid="key-1";nonce="{NONCE}"', NOW, "no created"),
        (f';created={NOW};keyid="key-1"', NOW, "nonce"),
        (f';created={NOW};keyid="key-1";nonce="short"', NOW, "nonce"),
        (f';created={NOW};keyid="key-2";nonce="{NONCE}"', NOW, "keyid"),
        (f';created={NOW};keyid="key-1";nonce="{NONCE}";alg="rsa-pss-sha512"', NOW, "not supported"),
        (f';created={NOW};keyid="key-1";nonce="{NONCE}";tag="x"', NOW, "unknown signature parameter"),
        (f';created="{NOW}";keyid="key-1";nonce="{NONCE}"', NOW, "wrong type"),
        (f";created={NOW};keyid=key-1;nonce={NONCE[:-1]}", NOW, "wrong type"),  # tokens, not strings
    ],
)
def test_signature_parameters_are_checked(params: str, now: float, reason: str) -> None:
    result = verify(sign(BASE_HEADERS, SECRET, params=params), now=now)
    assert result is not None and reason in result


def test_every_audiohook_component_must_be_covered() -> None:
    partial = ("@request-target", "@authority", "audiohook-session-id", "x-api-key")
    result = verify(sign(BASE_HEADERS, SECRET, params=GOOD_PARAMS, components=partial))
    assert result == "signature does not cover audiohook-organization-id, audiohook-correlation-id"


def test_wrong_secret_fails() -> None:
    headers = sign(BASE_HEADERS, SECRET, params=GOOD_PARAMS)
    assert verify(headers, secret=OTHER_SECRET) == "signature does not match"
    assert verify(headers, secret="***") is not None
    assert verify_message_signature("GET", None, DOC_PATH, DOC_HEADERS, OTHER_SECRET, DOC_CREATED) is not None


def test_unsigned_requests_need_a_key_without_secret() -> None:
    assert verify(BASE_HEADERS, secret=None) is None
    assert verify(BASE_HEADERS, secret="") is None
    assert verify(BASE_HEADERS) == "request is not signed, but its API key has a client secret"


def test_authority_argument_wins_over_host() -> None:
    headers = {**sign(BASE_HEADERS, SECRET, params=GOOD_PARAMS), "Host": "internal-lb:8080"}
    assert verify(headers) == "signature does not match"
    assert verify(headers, authority="vpmon.example.net:8443") is None


# ---------------------------------------------------------------------------------------------- fuzzing


def _messages() -> st.SearchStrategy[str | bytes]:
    durations = st.sampled_from(["PT0S", "PT1.5S", "PT.5S", "bad", "PT-1S"])
    parameters = st.one_of(
        st.just({}),
        st.fixed_dictionaries({"start": durations, "discarded": durations}),
        st.fixed_dictionaries({"reason": st.sampled_from(["end", "error", 3])}),
        st.fixed_dictionaries(
            {
                "organizationId": st.sampled_from([ORG, NULL_UUID, "x"]),
                "conversationId": st.sampled_from([CONV, NULL_UUID]),
                "participant": st.sampled_from([PARTICIPANT, {}, []]),
                "media": st.lists(
                    st.fixed_dictionaries(
                        {
                            "type": st.sampled_from(["audio", "video"]),
                            "format": st.sampled_from(["PCMU", "L16", "x"]),
                            "channels": st.lists(
                                st.sampled_from(["external", "internal", "x", 1]), max_size=3
                            ),
                            "rate": st.sampled_from([8000, 16000, "8000", 8000.0]),
                        }
                    ),
                    max_size=3,
                ),
                "customConfig": st.dictionaries(st.text(max_size=3), st.integers() | st.text(max_size=3)),
            }
        ),
        st.dictionaries(st.text(max_size=5), st.none() | st.integers() | st.text(max_size=5), max_size=3),
    )
    envelope = st.fixed_dictionaries(
        {
            "version": st.sampled_from(["2", "2", "2", "1", 2]),
            "id": st.sampled_from([SID, SID, SID.upper(), CONV, "x"]),
            "type": st.sampled_from(
                ["open", "ping", "paused", "resumed", "discarded", "update", "error", "close", "dtmf", "nope"]
            ),
            "seq": st.integers(min_value=-1, max_value=12),
            "serverseq": st.integers(min_value=-1, max_value=12),
            "position": durations,
            "parameters": parameters,
        }
    ).map(json.dumps)
    garbage = st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1"))
    audio = st.integers(min_value=0, max_value=4000).map(bytes) | st.binary(max_size=64)
    return st.one_of(envelope, envelope, garbage, audio)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages(), max_size=12), st.booleans())
def test_random_input_never_raises_and_keeps_the_invariants(
    frames: list[str | bytes], authorized: bool
) -> None:
    session = AudioHookSession(SID, None if authorized else "nope")
    events: list[Any] = []
    outgoing: list[dict[str, Any]] = []
    for frame in frames:
        if isinstance(frame, bytes):
            session.receive_bytes(frame)
        else:
            session.receive_text(frame)
        events += session.events_received()
        outgoing += [json.loads(text) for text in session.data_to_send()]
    session.connection_lost()
    events += session.events_received()

    assert [message["seq"] for message in outgoing] == list(range(1, len(outgoing) + 1))
    clientseqs = [message["clientseq"] for message in outgoing]
    assert clientseqs == sorted(clientseqs)
    for message in outgoing:
        assert message["version"] == "2" and message["id"] == SID and isinstance(message["parameters"], dict)
        if message["type"] == "opened":
            assert len(message["parameters"]["media"]) <= 1
    kinds = [type(event) for event in events]
    assert kinds.count(CallStarted) <= 1 and kinds.count(CallEnded) == kinds.count(CallStarted)
    if CallStarted in kinds:
        assert kinds[0] is CallStarted and kinds[-1] is CallEnded
        assert all(event.media_time >= 0 for event in events if isinstance(event, AudioChunk))
    if not authorized:
        assert CallStarted not in kinds
    if session.close_requested is not None:
        assert outgoing[-1]["type"] == "closed" or session.state is State.CLOSED


@given(st.text(max_size=200))
def test_random_text_after_open_never_raises(text: str) -> None:
    session, _client = opened_session()
    session.receive_text(text)
    session.events_received()
    for frame in session.data_to_send():
        json.loads(frame)


_ACTIONS = st.one_of(
    st.tuples(st.just("audio"), st.integers(min_value=0, max_value=3300)),
    st.tuples(
        st.just("send"),
        st.sampled_from(
            ["ping", "paused", "resumed", "discarded", "update", "error", "close", "dtmf", "open", "x"]
        ),
        st.sampled_from(
            [
                {},
                {"start": "PT1S", "discarded": "PT0.5S"},
                {"rtt": "PT0.1S"},
                {"language": "en-US"},
                {"code": 408, "message": "timeout"},
                {"reason": "end"},
                {"start": 1},
            ]
        ),
        st.sampled_from(["PT0S", "PT3.2S", "PT100S"]),
    ),
    st.tuples(st.just("garbage"), st.text(max_size=20)),
    st.tuples(st.just("fail"), st.sampled_from([CLOSE_NORMAL, CLOSE_UNKNOWN_AGENT])),
    st.tuples(st.just("timeout")),
)


@settings(max_examples=300)
@given(
    st.sampled_from([OFFERS, [EXTERNAL], [{**STEREO, "format": "L16"}], []]),
    st.sampled_from([CONV, NULL_UUID]),
    st.lists(_ACTIONS, max_size=15),
)
def test_random_sessions_from_a_numbering_client(
    offers: list, conversation: str, actions: list[tuple]
) -> None:
    session = AudioHookSession(SID, None)
    client = Client(session)
    outgoing = client.open(offers, conversation_id=conversation)
    events = session.events_received()
    for action in actions:
        if action[0] == "audio":
            outgoing += client.audio(bytes(action[1]))
        elif action[0] == "send":
            outgoing += client.send(action[1], action[2], action[3])
        elif action[0] == "garbage":
            outgoing += client.raw(action[1])
        elif action[0] == "fail":
            session.fail(action[1], "server says no")
            outgoing += client.replies()
        else:
            session.close_timeout_expired()
        events += session.events_received()
    session.connection_lost()
    events += session.events_received()

    assert [message["seq"] for message in outgoing] == list(range(1, len(outgoing) + 1))
    types = [message["type"] for message in outgoing]
    assert types[0] == "opened" and types.count("opened") == 1
    assert types.count("disconnect") <= 1 and types.count("closed") <= 1
    if "closed" in types:
        assert types[-1] == "closed" and session.close_requested is not None
    kinds = [type(event) for event in events]
    if conversation == NULL_UUID or not offers or offers[0]["format"] == "L16":
        assert events == [] or kinds == [ProtocolViolation]  # probes and declined media reach no pipeline
    else:
        assert kinds[0] is CallStarted and kinds.count(CallEnded) == 1 and kinds[-1] is CallEnded
        latest = max([0.0, *(float(a[3][2:-1]) for a in actions if a[0] == "send")])
        audio_seconds = sum(a[1] for a in actions if a[0] == "audio") / 8000
        assert all(0 <= e.media_time <= latest + audio_seconds for e in events if isinstance(e, AudioChunk))
