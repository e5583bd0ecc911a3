"""What the fuzzers run: for every sans-I/O adapter, audio decoder, the VAD and each file loader, a
hypothesis strategy of inputs and a check that runs one input against the real code and asserts its
contract.

The contract is the same everywhere: an input gives results, or the target's documented error (an
adapter records a ``ProtocolViolation`` and requests a close with a valid code; the audio decoders
raise ``AudioError``; the model loaders ``ModelError``; trials ``CalibrationError``; WHIP offers
``WhipRefusal``) — never another exception, never a hang. On top of that each check asserts what the
results must satisfy (no audio after a failure, byte counts conserved, clocks that never go back…).

Inputs are structured, not only random text: a valid session or file is built first and then mutated in
one way the generator knows the outcome of (out-of-order sequence numbers, truncated or oversized base64,
a frame of the wrong size, a crafted pickle…), so a check can also assert *which* close code that
mutation earns. Checks raise ``AssertionError`` when a property fails and let any other exception
escape: ``tests/test_fuzz.py`` runs them under ``@given`` with a CI-sized budget, and
``benchmarks/fuzz.py`` runs them with a large one, counting what escapes and watching for hangs.
"""

from __future__ import annotations

import atexit
import base64
import io
import json
import math
import pickle
import resource
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from hypothesis import strategies as st

from streamer.protocols import audiohook, native, twilio, whip
from streamer.protocols._common import Phase
from streamer.protocols.events import (
    AudioChunk,
    AudioDiscarded,
    CallEnded,
    CallStarted,
    CloseRequest,
    Event,
    ProtocolViolation,
)
from streamer.store import SPEAKER_RE, TENANT_RE
from verifier import trials
from verifier.audio import decode_alaw, decode_mulaw, decode_pcm16, read_audio_bytes
from verifier.errors import AudioError, CalibrationError, ModelError
from verifier.models import torch_weights
from verifier.models.spec import ModelSpec, load_spec_file
from verifier.pipeline import VadConfig
from verifier.stream import AgentAudio
from verifier.vad import VadSegmenter, segment

# ------------------------------------------------------------------------------------------------ shared

_scratch_dir: Path | None = None


def scratch() -> Path:
    """A private directory for the files the loader targets read (one per process, removed at exit)."""
    global _scratch_dir
    if _scratch_dir is None:
        _scratch_dir = Path(tempfile.mkdtemp(prefix="vpmon-fuzz-"))
        atexit.register(shutil.rmtree, _scratch_dir, ignore_errors=True)
    return _scratch_dir


def use_scratch(directory: Path) -> None:
    """Use ``directory`` instead (a process that may be killed, whose owner removes it)."""
    global _scratch_dir
    _scratch_dir = directory


# Any text, lone surrogates included: JSON escapes can carry them, and reasons quote what peers send.
TEXTS = st.text(st.characters(exclude_categories=()), max_size=12)
NASTY_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    8000,
    8000.0,
    2**31,
    2**53 + 1,
    2**64,
    -(2**63),
    10**100,
    1e308,
    -0.0,
    0.5,
    math.inf,
    -math.inf,
    math.nan,
    "",
    " ",
    "\x00",
    "\ud800",
    "a\udfff",
    "\u202e",
    "😀",
    "é",
    "x" * 300,
    "null",
    "1",
    "-1",
    "1e400",
    "NaN",
    "PT1S",
    "../../etc/passwd",
    [],
    {},
    [1, "2"],
    {"a": {"b": None}},
]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXTS | st.sampled_from(NASTY_VALUES)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXTS, children, max_size=3),
    max_leaves=8,
)
# Frames no protocol defines: broken JSON, JSON that is not an object, nesting deeper than the stack,
# numbers longer than Python parses, NaN literals, a byte-order mark.
ODD_FRAMES = [
    "",
    "{",
    "}",
    "[]",
    "null",
    "NaN",
    "{}",
    '{"event": NaN}',
    '{"type": Infinity}',
    "\ufeff{}",
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    "1" * 5000,
    '{"event": ' + "9" * 5000 + "}",
    '{"event": "\\ud800"}',
]
GARBAGE_FRAMES = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=64),
    JSON_VALUES.map(json.dumps),
    st.sampled_from(ODD_FRAMES),
)
SPEAKER_IDS = st.text("ABCxyz0189_.@:+-", min_size=1, max_size=24)
TENANTS = st.text("ABCxyz0189_.-", min_size=1, max_size=16)
HEX32 = st.text("0123456789abcdef", min_size=32, max_size=32)
UUIDS = st.uuids().map(str)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _utf8_size(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise AssertionError(f"close reason {text!r} is not valid UTF-8") from None


def _parse(frame: str | bytes) -> dict[str, Any] | None:
    """A frame as the oracle reads it: a JSON object, or None."""
    if not isinstance(frame, str):
        return None
    try:
        value = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def check_call_events(
    events: list[Event],
    close: CloseRequest | None,
    codes: frozenset[int],
    *,
    ended: bool,
    closed_by_client: bool = False,
) -> None:
    """What every adapter's event stream satisfies: at most one start, first; one end per start (after
    ``connection_lost``: ``ended``); after a violation only the end; nothing after the end; a violation's
    code is the close's, valid, with a reason that fits a close frame. ``codes``: the violation codes the
    adapter uses; a close may also be 1000 or a code the test passed to ``fail``. ``closed_by_client``:
    after a violation the close waits for the client (AudioHook), so there may be none yet."""
    kinds = [type(event) for event in events]
    assert kinds.count(CallStarted) <= 1, kinds
    if CallStarted in kinds:
        assert kinds[0] is CallStarted, kinds
    assert kinds.count(CallEnded) <= kinds.count(CallStarted), kinds
    if ended:
        assert kinds.count(CallEnded) == kinds.count(CallStarted), kinds
    if CallEnded in kinds:
        assert kinds.index(CallEnded) == len(kinds) - 1, kinds
    violations = [event for event in events if isinstance(event, ProtocolViolation)]
    assert len(violations) <= 1, violations
    for violation in violations:
        assert set(kinds[kinds.index(ProtocolViolation) + 1 :]) <= {CallEnded}, kinds
        assert violation.code in codes, violation
        assert 0 < _utf8_size(violation.reason) <= 123, violation
        if close is not None or not closed_by_client:
            assert close is not None and close.code == violation.code, (close, violation)
    if close is not None:
        assert close.code in codes | FAIL_CODES | {1000}, close
        assert _utf8_size(close.reason) <= 123, close
    for event in events:
        if isinstance(event, AudioChunk):
            assert isinstance(event.payload, bytes) and event.payload, event
            assert event.media_time is None or (math.isfinite(event.media_time) and event.media_time >= 0)


ADAPTER_CODES = frozenset({1002, 1003, 1009})
FAIL_CODES = frozenset({1000, 1011, 4001, 4004})  # what the checks pass to fail(), as the gateway does


# ------------------------------------------------------------------------------------------------ Twilio


@dataclass(frozen=True)
class Session:
    """Frames of one websocket, in order, and what the generator knows about them: the mutation it
    applied and, when that mutation decides the outcome, ``expect`` = (frame index, close code) of the
    first protocol violation. A frame may also be an action of the server (``("verdict", {...})``)."""

    frames: tuple[Any, ...]
    mutation: str
    expect: tuple[int, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _with_sequence(messages: list[dict[str, Any]], first: int, as_int: bool) -> list[dict[str, Any]]:
    number = first
    out = []
    for message in messages:
        if message["event"] != "connected":
            message = {**message, "sequenceNumber": number if as_int else str(number)}
            number += 1
        out.append(message)
    return out


def _mutate_field(draw: st.DrawFn, message: dict[str, Any]) -> dict[str, Any]:
    """The message with one value somewhere inside it replaced (or its key removed)."""
    message = json.loads(json.dumps(message))
    node: Any = message
    while True:
        keys = list(node)
        key = draw(st.sampled_from(keys))
        if isinstance(node[key], dict) and node[key] and draw(st.booleans()):
            node = node[key]
            continue
        if draw(st.integers(0, 4)) == 0:
            del node[key]
        else:
            node[key] = draw(JSON_VALUES)
        return message


@st.composite
def twilio_sessions(draw: st.DrawFn) -> Session:
    agent_track = draw(st.sampled_from(twilio.TRACKS))
    stream_sid, call_sid = "MZ" + draw(HEX32), "CA" + draw(HEX32)
    tracks = draw(st.sampled_from([None, ["inbound", "outbound"], [agent_track]]))
    parameters = draw(
        st.fixed_dictionaries({}, optional={"agent_id": SPEAKER_IDS, "tenant": TENANTS, "other": TEXTS})
    )
    start_body: dict[str, Any] = {
        "streamSid": stream_sid,
        "accountSid": "AC" + draw(HEX32),
        "callSid": call_sid,
        "customParameters": parameters,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    if tracks is not None:
        start_body["tracks"] = tracks
    head: list[dict[str, Any]] = []
    if draw(st.booleans()):
        head.append({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    head.append({"event": "start", "start": start_body, "streamSid": stream_sid})
    body: list[dict[str, Any]] = []
    for index in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["media", "media", "media", "mark", "dtmf"]))
        if kind == "media":
            media = {"track": draw(st.sampled_from(twilio.TRACKS)), "chunk": str(index + 1)}
            media["payload"] = b64(draw(st.binary(max_size=320)))
            if draw(st.booleans()):
                media["timestamp"] = str(20 * index)
            body.append({"event": "media", "media": media, "streamSid": stream_sid})
        elif kind == "mark":
            body.append({"event": "mark", "mark": {"name": "m"}, "streamSid": stream_sid})
        else:
            body.append(
                {"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "5"}, "streamSid": stream_sid}
            )
    tail = []
    if draw(st.booleans()):
        tail.append({"event": "stop", "stop": {"callSid": call_sid}, "streamSid": stream_sid})
    first = draw(st.sampled_from([1, 1, 0, 7, 2**40]))
    as_int = draw(st.booleans())
    messages = _with_sequence(head + body + tail, first, as_int)
    frames: list[Any] = [json.dumps(m) for m in messages]
    offset = len(head)
    media_at = [offset + i for i, m in enumerate(body) if m["event"] == "media"]
    mutation = draw(
        st.sampled_from(
            [
                "none",
                "reorder",
                "repeat",
                "drop",
                "oversize",
                "truncate_b64",
                "bad_b64",
                "binary",
                "second_start",
                "before_start",
                "other_stream",
                "field",
                "garbage",
            ]
        )
    )
    expect: tuple[int, int] | None = None
    nonempty = [i for i in media_at if json.loads(frames[i])["media"]["payload"]]
    if mutation == "reorder" and len(body) >= 2:
        i = draw(st.integers(offset, offset + len(body) - 2))
        frames[i], frames[i + 1] = frames[i + 1], frames[i]
        expect = (i, 1002)
    elif mutation == "repeat" and body:
        i = draw(st.integers(offset, offset + len(body) - 1))
        frames.insert(i + 1, frames[i])
        expect = (i + 1, 1002)
    elif mutation == "drop" and len(body) + len(tail) >= 2:
        i = draw(st.integers(offset, offset + len(body) + len(tail) - 2))
        del frames[i]
        expect = (i, 1002)
    elif mutation in ("oversize", "truncate_b64", "bad_b64") and (
        nonempty if mutation != "oversize" else media_at
    ):
        i = draw(st.sampled_from(nonempty if mutation != "oversize" else media_at))
        message = json.loads(frames[i])
        payload = message["media"]["payload"]
        if mutation == "oversize":
            size = twilio.DEFAULT_MAX_PAYLOAD_BYTES + draw(st.integers(1, 700))
            message["media"]["payload"] = b64(bytes(size))
            expect = (i, 1009)
        elif mutation == "truncate_b64":
            cut = draw(st.integers(1, 3))
            message["media"]["payload"] = payload[:-cut]
            expect = (i, 1003)
        else:
            at = draw(st.integers(0, len(payload)))
            bad = draw(st.sampled_from(["!", "-", "_", " ", "\n", "é", "\x00"]))  # "=" may pass as padding
            message["media"]["payload"] = payload[:at] + bad + payload[at:]
            expect = (i, 1003)
        frames[i] = json.dumps(message)
    elif mutation == "binary":
        i = draw(st.integers(0, len(frames) - len(tail)))  # after the stop it would be ignored
        frames.insert(i, draw(st.binary(max_size=200)))
        expect = (i, 1003)
    elif mutation == "second_start":
        i = draw(st.integers(offset, len(frames)))
        after_stop = bool(tail) and i == len(frames)  # a frame after the stop is ignored
        frames.insert(i, frames[offset - 1])
        expect = None if after_stop else (i, 1002)
    elif mutation == "before_start" and media_at:
        i = draw(st.sampled_from(media_at))
        frame = frames.pop(i)
        frames.insert(offset - 1, frame)
        expect = (offset - 1, 1002)
    elif mutation == "other_stream" and media_at:
        i = draw(st.sampled_from(media_at))
        message = json.loads(frames[i])
        message["streamSid"] = "MZ" + "0" * 32 if stream_sid != "MZ" + "0" * 32 else "MZ" + "1" * 32
        frames[i] = json.dumps(message)
        expect = (i, 1002)
    elif mutation == "field":
        i = draw(st.integers(0, len(frames) - 1))
        frames[i] = json.dumps(_mutate_field(draw, json.loads(frames[i])))
    elif mutation == "garbage":
        frames.insert(draw(st.integers(0, len(frames))), draw(GARBAGE_FRAMES))
    else:
        mutation = "none"
    return Session(tuple(frames), mutation, expect, {"agent_track": agent_track})


def _twilio_audio(frame: Any) -> tuple[bytes, str, float | None] | None:
    """The audio a media frame carries, as the oracle reads it: (payload, track, media time)."""
    message = _parse(frame)
    if message is None or message.get("event") != "media" or not isinstance(message.get("media"), dict):
        return None
    media = message["media"]
    try:
        payload = base64.b64decode(media.get("payload"), validate=True)
    except (TypeError, ValueError):
        return None
    timestamp = media.get("timestamp")
    return payload, media.get("track"), None if timestamp is None else int(timestamp) / 1000


def check_twilio(session: Session) -> None:
    adapter = twilio.TwilioMediaStream(agent_track=session.options["agent_track"])
    events: list[Event] = []
    first_violation = None
    for index, frame in enumerate(session.frames):
        closed_before = adapter.close_requested is not None
        if isinstance(frame, bytes):
            adapter.receive_bytes(frame)
        else:
            adapter.receive_text(frame)
        new = adapter.events_received()
        assert adapter.data_to_send() == [], "Twilio streams are one-way"
        if closed_before:
            assert new == [], f"frame {index} after the close gave {new}"
        chunks = [event for event in new if isinstance(event, AudioChunk)]
        violation = next((event for event in new if isinstance(event, ProtocolViolation)), None)
        if violation is not None and first_violation is None:
            first_violation = (index, violation.code)
        audio = None if closed_before or violation is not None else _twilio_audio(frame)
        if audio is None or not audio[0]:
            assert chunks == [], f"frame {index} gave {chunks}"
        else:
            payload, track, media_time = audio
            assert len(payload) <= adapter.max_payload_bytes, f"{len(payload)}-byte payload accepted"
            is_agent = track == adapter.agent_track
            assert chunks == [AudioChunk(payload, is_agent=is_agent, media_time=media_time)], chunks
        events += new
    adapter.connection_lost()
    events += adapter.events_received()
    check_call_events(events, adapter.close_requested, ADAPTER_CODES, ended=True)
    if session.expect is not None:
        assert first_violation == session.expect, (first_violation, session.expect)


# ------------------------------------------------------------------------------------------------ native


@st.composite
def native_sessions(draw: st.DrawFn) -> Session:
    encoding = draw(st.sampled_from(native.ENCODINGS))
    channels = draw(st.sampled_from([1, 2]))
    frame_bytes = (2 if encoding == "pcm16" else 1) * channels
    max_frame = draw(st.integers(1, 64)) * frame_bytes * 4
    start: dict[str, Any] = {
        "type": "start",
        "call_id": draw(SPEAKER_IDS),
        "encoding": encoding,
        "sample_rate": draw(st.sampled_from(native.STANDARD_RATES)),
        "channels": channels,
    }
    if channels == 2 or draw(st.booleans()):
        start["agent_channel"] = draw(st.integers(0, channels - 1))
    for key, values in (("tenant", TENANTS), ("agent_id", SPEAKER_IDS), ("extra", JSON_VALUES)):
        if draw(st.booleans()):
            start[key] = draw(values)
    frames: list[Any] = [json.dumps(start)]
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["audio", "audio", "audio", "agent", "verdict", "alert"]))
        if kind == "audio":
            frames.append(draw(st.binary(max_size=max_frame // frame_bytes)) * frame_bytes)
        elif kind == "agent":
            agent: dict[str, Any] = {"type": "agent", "agent_id": draw(SPEAKER_IDS)}
            if draw(st.booleans()):
                agent["agent_channel"] = draw(st.integers(0, channels - 1))
            frames.append(json.dumps(agent))
        else:
            frames.append(
                (kind, draw(st.dictionaries(st.text(max_size=6), st.integers() | TEXTS, max_size=3)))
            )
    if draw(st.booleans()):
        frames.append(json.dumps({"type": "stop"}))
    frames.append(("verdict", {"state": "UNKNOWN"}))
    mutation = draw(
        st.sampled_from(
            [
                "none",
                "bad_size",
                "oversize",
                "audio_before_start",
                "second_start",
                "agent_before_start",
                "unknown_type",
                "field",
                "garbage",
            ]
        )
    )
    expect: tuple[int, int] | None = None
    last = len(frames) - 1 if frames[-2] != json.dumps({"type": "stop"}) else len(frames) - 2
    if mutation == "bad_size" and frame_bytes > 1:
        i = draw(st.integers(1, last))
        whole = draw(st.integers(0, max_frame // frame_bytes - 1))  # under the limit: only the size is wrong
        frames.insert(i, bytes(whole * frame_bytes + draw(st.integers(1, frame_bytes - 1))))
        expect = (i, 1003)
    elif mutation == "oversize":
        i = draw(st.integers(1, last))
        frames.insert(i, bytes(max_frame + frame_bytes * draw(st.integers(1, 50))))
        expect = (i, 1009)
    elif mutation == "audio_before_start":
        frames.insert(0, draw(st.binary(max_size=50)))
        expect = (0, 1002)
    elif mutation == "second_start":
        i = draw(st.integers(1, last))
        frames.insert(i, frames[0])
        expect = (i, 1002)
    elif mutation == "agent_before_start":
        frames.insert(0, json.dumps({"type": "agent", "agent_id": "a"}))
        expect = (0, 1002)
    elif mutation == "unknown_type":
        i = draw(st.integers(0, last))
        frames.insert(i, json.dumps({"type": draw(st.sampled_from(["pause", "Start", "", "stop "]))}))
        expect = (i, 1003)
    elif mutation == "field":
        frames[0] = json.dumps(_mutate_field(draw, start))
    elif mutation == "garbage":
        frames.insert(draw(st.integers(0, last + 1)), draw(GARBAGE_FRAMES))
    else:
        mutation = "none"
    return Session(tuple(frames), mutation, expect, {"max_frame_bytes": max_frame})


def check_native(session: Session) -> None:
    adapter = native.NativeStream(max_frame_bytes=session.options["max_frame_bytes"])
    events: list[Event] = []
    outgoing: list[dict[str, Any]] = []
    first_violation = None
    for index, frame in enumerate(session.frames):
        close_before = adapter.close_requested
        if isinstance(frame, tuple):  # the server pushes a verdict or an alert
            (adapter.send_verdict if frame[0] == "verdict" else adapter.send_alert)(frame[1])
            sent = [json.loads(text) for text in adapter.data_to_send()]
            if close_before is None or close_before.code == 1000:
                assert sent == [{**frame[1], "type": frame[0]}], sent
            else:
                assert sent == [], f"pushed {sent} after a failure"
            outgoing += sent
            continue
        live_before = any(isinstance(event, CallStarted) for event in events) and close_before is None
        if isinstance(frame, bytes):
            adapter.receive_bytes(frame)
        else:
            adapter.receive_text(frame)
        new = adapter.events_received()
        sent = [json.loads(text) for text in adapter.data_to_send()]
        outgoing += sent
        if close_before is not None:
            assert new == [] and sent == [], f"frame {index} after the close gave {new} {sent}"
        violation = next((event for event in new if isinstance(event, ProtocolViolation)), None)
        if violation is not None:
            if first_violation is None:
                first_violation = (index, violation.code)
            assert sent[-1:] == [{"type": "error", "code": violation.code, "reason": violation.reason}], sent
        chunks = [event for event in new if isinstance(event, AudioChunk)]
        if isinstance(frame, bytes) and frame and live_before and violation is None:
            assert chunks == [AudioChunk(frame)], chunks  # every byte, as it came
        else:
            assert chunks == [], chunks
        started = [event for event in new if isinstance(event, CallStarted)]
        if started:
            assert sent[:1] == [{"type": "started", "call_id": started[0].call_id}], sent
        events += new
    adapter.connection_lost()
    events += adapter.events_received()
    check_call_events(events, adapter.close_requested, ADAPTER_CODES, ended=True)
    assert [m["type"] for m in outgoing].count("started") == [type(e) for e in events].count(CallStarted)
    if session.expect is not None:
        assert first_violation == session.expect, (first_violation, session.expect)


# ------------------------------------------------------------------------------------------------ AudioHook

AH_SESSION = "30b0e395-84d3-4570-ac13-9a62d8f514c0"
AH_ORG = "d7934305-0972-4844-938e-9060eef73d05"
_CHANNELS = st.sampled_from(
    [["external", "internal"], ["internal", "external"], ["internal"], ["external"], ["x"], []]
)
AH_OFFERS = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["audio", "audio", "video"]),
            "format": st.sampled_from(["PCMU", "PCMU", "L16", "opus"]),
            "channels": _CHANNELS,
            "rate": st.sampled_from([8000, 8000, 16000]),
        }
    ),
    max_size=3,
)
GOOD_DURATIONS = st.sampled_from(["PT0S", "PT0.02S", "PT1S", "PT3.2S", "PT.5S", "PT100S", "PT9007199S"])
BAD_DURATIONS = st.sampled_from(["PT-1S", "P1S", "PT1.5.5S", "PT1e3S", "pt1s", "PT1M", "PT", "", 6.3, None])
# (message type, parameters); what a client may send once the session is open
AH_MESSAGES = st.one_of(
    st.tuples(st.just("ping"), st.fixed_dictionaries({}, optional={"rtt": GOOD_DURATIONS})),
    st.tuples(
        st.just("update"), st.fixed_dictionaries({}, optional={"language": st.sampled_from(["en-US", "fr"])})
    ),
    st.tuples(st.just("paused"), st.just({})),
    st.tuples(
        st.just("resumed"), st.fixed_dictionaries({"start": GOOD_DURATIONS, "discarded": GOOD_DURATIONS})
    ),
    st.tuples(
        st.just("discarded"), st.fixed_dictionaries({"start": GOOD_DURATIONS, "discarded": GOOD_DURATIONS})
    ),
    st.tuples(st.just("error"), st.fixed_dictionaries({"code": st.integers(0, 600), "message": TEXTS})),
    st.tuples(
        st.just("close"), st.fixed_dictionaries({}, optional={"reason": st.sampled_from(["end", "", 3])})
    ),
    st.tuples(st.sampled_from(["dtmf", "playback_started"]), st.just({})),
)
# A change to one envelope, and the code it earns when the session is still reading.
AH_MUTATIONS = st.one_of(
    st.tuples(st.just("seq"), st.sampled_from([-1, 0, 2, 10**6])).map(lambda m: (*m, 1002)),
    st.tuples(st.just("serverseq"), st.integers(1, 50)).map(lambda m: (*m, 1002)),
    st.tuples(st.just("id"), UUIDS.filter(lambda u: u != AH_SESSION)).map(lambda m: (*m, 1002)),
    st.tuples(st.just("version"), st.sampled_from(["1", 2, "", None, "2 "])).map(lambda m: (*m, 1003)),
    st.tuples(st.just("position"), BAD_DURATIONS).map(lambda m: (*m, 1003)),
    st.tuples(st.just("parameters"), st.sampled_from([[], "x", None, 1])).map(lambda m: (*m, 1003)),
    st.tuples(st.just("type"), st.sampled_from(["nope", "opened", "", "Open"])).map(lambda m: (*m, 1003)),
    st.tuples(st.just("param"), st.tuples(TEXTS, JSON_VALUES)).map(lambda m: (*m, None)),
)
AH_ACTIONS = st.one_of(
    st.tuples(st.just("send"), AH_MESSAGES, st.none() | AH_MUTATIONS, GOOD_DURATIONS),
    st.tuples(st.just("audio"), st.integers(0, 1700), st.booleans()),
    st.tuples(st.just("garbage"), GARBAGE_FRAMES),
    st.tuples(st.just("fail"), st.sampled_from([1000, 1011, 4001, 4004])),
    st.tuples(st.just("timeout")),
)


@dataclass(frozen=True)
class AudioHookInput:
    open_params: dict[str, Any]
    open_position: str
    open_first: bool  # False: the open comes after the first action (audio or a message before open)
    authorized: bool
    actions: tuple[Any, ...]
    max_frame_bytes: int


@st.composite
def audiohook_sessions(draw: st.DrawFn) -> AudioHookInput:
    params: dict[str, Any] = {
        "organizationId": AH_ORG,
        "conversationId": draw(st.sampled_from([str(draw(UUIDS)), audiohook.NULL_UUID])),
        "participant": {"id": draw(UUIDS), "ani": "+1-555-0100", "dnis": "+1-800-555-0199"},
        "media": draw(AH_OFFERS),
    }
    for key, values in (
        ("language", st.sampled_from(["en-US", "de-DE"])),
        ("supportedLanguages", st.booleans()),
        ("customConfig", st.dictionaries(TEXTS, JSON_VALUES, max_size=3)),
    ):
        if draw(st.booleans()):
            params[key] = draw(values)
    if draw(st.integers(0, 5)) == 0:
        params = _mutate_field(draw, params)
    return AudioHookInput(
        open_params=params,
        open_position=draw(GOOD_DURATIONS),
        open_first=draw(st.integers(0, 4)) > 0,
        authorized=draw(st.integers(0, 6)) > 0,
        actions=tuple(draw(st.lists(AH_ACTIONS, max_size=12))),
        max_frame_bytes=draw(st.sampled_from([2, 160, 1600, audiohook.DEFAULT_MAX_FRAME_BYTES])),
    )


class _AudioHookClient:
    """Numbers its messages and tracks the server's, as Genesys' client does; checks every reply."""

    def __init__(self, session: audiohook.AudioHookSession) -> None:
        self.session = session
        self.seq = 0
        self.serverseq = 0
        self.outgoing: list[dict[str, Any]] = []

    def message(self, kind: str, params: Any, position: str) -> dict[str, Any]:
        self.seq += 1
        return {
            "version": "2",
            "id": AH_SESSION,
            "type": kind,
            "seq": self.seq,
            "serverseq": self.serverseq,
            "position": position,
            "parameters": params,
        }

    def replies(self) -> list[dict[str, Any]]:
        def no_constants(name: str) -> None:
            raise AssertionError(f"server sent {name}, which is not JSON")

        out = [json.loads(text, parse_constant=no_constants) for text in self.session.data_to_send()]
        for message in out:
            assert message["version"] == "2" and message["id"] == AH_SESSION, message
            assert message["seq"] == len(self.outgoing) + 1, (message, len(self.outgoing))
            assert isinstance(message["parameters"], dict), message
            if self.outgoing:
                assert message["clientseq"] >= self.outgoing[-1]["clientseq"], message
            self.outgoing.append(message)
        if out:
            self.serverseq = out[-1]["seq"]
        return out


def check_audiohook(case: AudioHookInput) -> None:
    session = audiohook.AudioHookSession(
        AH_SESSION,
        None if case.authorized else "key revoked",
        organization_id=AH_ORG,
        formats=("PCMU", "L16"),
        max_frame_bytes=case.max_frame_bytes,
    )
    client = _AudioHookClient(session)
    events: list[Event] = []
    end_ns = 0  # where the last chunk ended (at first: the open's position), on the media clock, in ns
    gap_end_ns = 0  # where the audio after the last accepted discarded/resumed must start at the earliest
    actions = list(case.actions)
    opening = ("open", case.open_params, case.open_position)
    actions.insert(0 if case.open_first else min(1, len(actions)), ("send", opening[:2], None, opening[2]))
    for action in actions:
        state = session.state
        reading = state in (audiohook.State.AWAITING_OPEN, audiohook.State.OPEN, audiohook.State.PAUSED)
        expect_code: int | None = None
        expect_chunk: bytes | None = None
        if action[0] == "send":
            (kind, params), mutation, position = action[1], action[2], action[3]
            message = client.message(kind, params, position)
            if mutation is not None:
                what, value, expect_code = mutation
                if what == "seq":
                    message["seq"] += value - 1
                    client.seq = message["seq"]
                    expect_code = 1002 if message["seq"] >= 0 else 1003
                elif what == "serverseq":
                    message["serverseq"] = client.serverseq + value
                elif what == "param":
                    message["parameters"] = (
                        {**params, value[0]: value[1]} if isinstance(params, dict) else params
                    )
                else:
                    message[what] = value
            elif state is audiohook.State.AWAITING_OPEN and kind not in ("open", "ping", "error", "close"):
                expect_code = 1002 if kind not in ("dtmf", "playback_started") else None
            if not reading:
                expect_code = None
            session.receive_text(json.dumps(message))
        elif action[0] == "audio" or (action[0] == "garbage" and isinstance(action[1], bytes)):
            selected = session.selected_media
            frame_bytes = (
                1
                if selected is None
                else len(selected["channels"]) * (2 if selected["format"] == "L16" else 1)
            )
            if action[0] == "garbage":
                data = action[1]
            elif action[2]:  # whole sample frames
                data = bytes(action[1] - action[1] % frame_bytes)
            else:
                data = bytes(range(256)) * (action[1] // 256) + bytes(action[1] % 256)
            if state is audiohook.State.AWAITING_OPEN or state is audiohook.State.PAUSED:
                expect_code = 1002
            elif state is audiohook.State.OPEN:
                if selected is None:
                    expect_code = 1002
                elif len(data) > case.max_frame_bytes:
                    expect_code = 1009
                elif len(data) % frame_bytes:
                    expect_code = 1003
                elif data and any(isinstance(event, CallStarted) for event in events):
                    expect_chunk = data
            session.receive_bytes(data)
        elif action[0] == "garbage":
            session.receive_text(action[1])
        elif action[0] == "fail":
            session.fail(action[1], "server ends the call")
        else:
            session.close_timeout_expired()
        client.replies()
        new = session.events_received()
        if not reading and state is not audiohook.State.DISCONNECTING:
            assert new == [], f"{action[0]} after the end gave {new}"
        violation = next((event for event in new if isinstance(event, ProtocolViolation)), None)
        if expect_code is not None:
            assert violation is not None and violation.code == expect_code, (action, expect_code, new)
        chunks = [event for event in new if isinstance(event, AudioChunk)]
        if expect_chunk is None:
            assert chunks == [], (action, chunks)
        else:
            assert len(chunks) == 1 and chunks[0].payload == expect_chunk, chunks
            start_ns = round(chunks[0].media_time * 1e9)
            assert chunks[0].is_agent == ("internal" in session.selected_media["channels"])
            # contiguous from the open's position, or after a gap the client announced
            assert abs(start_ns - max(end_ns, gap_end_ns)) <= 16, (start_ns, end_ns, gap_end_ns)
            end_ns = start_ns + len(expect_chunk) // frame_bytes * 1_000_000_000 // 8000
        for event in new:
            if isinstance(event, AudioDiscarded):
                assert event.seconds >= 0 and event.media_time >= 0, event
        if action[0] == "send" and violation is None and session.state is not audiohook.State.DISCONNECTING:
            (kind, params) = action[1]
            if kind == "discarded" or (kind == "resumed" and state is audiohook.State.PAUSED):
                skip = audiohook._duration_ns(params["start"]) + audiohook._duration_ns(params["discarded"])
                gap_end_ns = max(gap_end_ns, skip)
        if any(isinstance(event, CallStarted) for event in new):
            end_ns = audiohook._duration_ns(case.open_position)
        events += new
        if session.close_requested is not None:
            assert session.state is audiohook.State.CLOSED, session.state
    session.connection_lost()
    events += session.events_received()
    types = [message["type"] for message in client.outgoing]
    assert types.count("opened") <= 1 and types.count("disconnect") <= 1 and types.count("closed") <= 1, types
    if "closed" in types:
        assert types[-1] == "closed", types
    for message in client.outgoing:
        if message["type"] == "opened":
            assert len(message["parameters"]["media"]) <= 1, message
    if not case.authorized:
        assert CallStarted not in [type(event) for event in events], events
    check_call_events(
        events, session.close_requested, ADAPTER_CODES | {4001}, ended=True, closed_by_client=True
    )
    if any(isinstance(event, ProtocolViolation) for event in events):
        assert "disconnect" in types, "a violation must be answered with disconnect"


# ------------------------------------------------------------------------------------------------ upgrades

# The AudioHook walkthrough's signed request (tests/test_protocol_audiohook.py uses it too).
AH_DOC_SECRET = "TXlTdXBlclNlY3JldEtleVRlbGxOby0xITJAMyM0JDU="
AH_DOC_CREATED = 1641013200
AH_DOC_PATH = "/api/v1/voicebiometrics/ws"
AH_DOC_HEADERS = {
    "Host": "audiohook.example.com",
    "Audiohook-Organization-Id": "d7934305-0972-4844-938e-9060eef73d05",
    "Audiohook-Correlation-Id": "e160e428-53e2-487c-977d-96989bf5c99d",
    "Audiohook-Session-Id": "30b0e395-84d3-4570-ac13-9a62d8f514c0",
    "X-API-KEY": "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh",
    "Signature": "sig1=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:",
    "Signature-Input": 'sig1=("@request-target" "@authority" "audiohook-organization-id" '
    '"audiohook-session-id" "audiohook-correlation-id" "x-api-key");'
    'keyid="SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh";nonce="VGhpc0lzQVVuaXF1ZU5vbmNl";'
    'alg="hmac-sha256";created=1641013200;expires=3282026430',
}
# Header values as an ASGI server hands them over: latin-1 text.
LATIN1 = st.text(st.characters(max_codepoint=255), max_size=40)
# Pieces of RFC 8941 structured fields, to splice into the signature headers.
SF_PIECES = st.sampled_from(
    [
        "",
        ",",
        ";",
        "=",
        "(",
        ")",
        '"',
        "\\",
        ":",
        "::",
        ":AAAA:",
        ":!:",
        "?1",
        "?2",
        "-",
        "1" * 16,
        "-0.5",
        "1.2.3",
        "*",
        "a;b=c",
        '("@method")',
        '("x" "x")',
        "sig1=",
        "sig2=:AA==:",
        ";created=1",
        ";created=-1",
        ";expires=?1",
        ';nonce="x"',
        ';alg="rsa"',
        '"\x7f"',
        " ",
        "\t",
        "\r\n ",
    ]
)


@dataclass(frozen=True)
class Upgrade:
    headers: tuple[tuple[str, str], ...]
    secret: str | None
    now: float
    authority: str | None
    path: str
    pristine: bool  # the walkthrough's request unchanged: it must verify


@st.composite
def audiohook_upgrades(draw: st.DrawFn) -> Upgrade:
    headers = dict(AH_DOC_HEADERS)
    pristine = True
    for _ in range(draw(st.integers(0, 3))):
        pristine = False
        name = draw(st.sampled_from([*AH_DOC_HEADERS, "signature", "X-Other"]))
        how = draw(st.sampled_from(["splice", "replace", "delete", "cut"]))
        value = headers.get(name, "")
        if how == "splice":
            at = draw(st.integers(0, len(value)))
            headers[name] = value[:at] + draw(SF_PIECES | LATIN1) + value[at:]
        elif how == "replace":
            headers[name] = draw(SF_PIECES | LATIN1)
        elif how == "cut":
            headers[name] = value[: draw(st.integers(0, len(value)))]
        else:
            headers.pop(name, None)
    pairs = list(headers.items())
    if draw(st.booleans()) and pairs:  # a field sent twice
        pristine = False
        pairs.append(draw(st.sampled_from(pairs)))
    return Upgrade(
        headers=tuple(pairs),
        secret=AH_DOC_SECRET
        if pristine
        else draw(st.sampled_from([AH_DOC_SECRET, None, "", "!!", b64(b"x")])),
        now=AH_DOC_CREATED + (1 if pristine else draw(st.sampled_from([1, -100, 10**10, 0.5]))),
        authority=None if pristine else draw(st.none() | LATIN1),
        path=AH_DOC_PATH if pristine else draw(st.sampled_from([AH_DOC_PATH, "", "/?", "/a?b=c"]) | LATIN1),
        pristine=pristine,
    )


def check_audiohook_upgrade(case: Upgrade) -> None:
    missing = audiohook.required_headers_missing(case.headers)
    assert isinstance(missing, list) and set(missing) <= set(audiohook.REQUIRED_HEADERS), missing
    result = audiohook.verify_message_signature(
        "GET", case.authority, case.path, case.headers, case.secret, case.now
    )
    assert result is None or (isinstance(result, str) and result), result
    if case.pristine:
        assert result is None and missing == [], result


@dataclass(frozen=True)
class TwilioUpgrade:
    token: str
    url: str
    params: dict[str, str]
    signature: str
    signed: bool  # ``signature`` is twilio_signature of this very url: it must validate


HOSTS = st.sampled_from(
    [
        "vpmon.example.com",
        "vpmon.example.com:443",
        "vpmon.example.com:8443",
        "[::1]",
        "[::1]:8443",
        "[",
        "[::1",
        "]",
        "[::1]:99999",
        "host:port",
        "host:-1",
        "user:pw@host:80",
        "@",
        "%zz",
        "xn--bcher-kva.example",
        "bücher.example",
        "",
    ]
)


@st.composite
def twilio_upgrades(draw: st.DrawFn) -> TwilioUpgrade:
    scheme = draw(st.sampled_from(["wss", "ws", "https", "http", "WSS", "ftp", ""]))
    host = draw(HOSTS | st.text(max_size=12))
    path = draw(st.sampled_from(["/twilio", "/twilio/", "", "/a b", "/é"]) | st.text(max_size=10))
    query = draw(st.sampled_from(["", "?tenant=acme", "?a=1&b=2", "?", "#frag"]) | st.text(max_size=8))
    url = f"{scheme}://{host}{path}{query}" if draw(st.integers(0, 9)) else draw(st.text(max_size=30))
    token = draw(st.sampled_from(["token", ""]) | st.text(max_size=10))
    params = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    signed = draw(st.booleans())
    signature = twilio.twilio_signature(token, url, params) if signed else draw(st.text(max_size=30))
    return TwilioUpgrade(token, url, params, signature, signed)


def check_twilio_upgrade(case: TwilioUpgrade) -> None:
    valid = twilio.validate_twilio_signature(case.token, case.url, case.signature, case.params)
    assert isinstance(valid, bool)
    if case.signed:
        assert valid, "a request signed for its own URL must validate"


# ------------------------------------------------------------------------------------------------ WHIP

FINGERPRINT = ":".join(["AB"] * 32)
OPUS_OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=msid-semantic: WMS stream",
        "m=audio 50000 UDP/TLS/RTP/SAVPF 111 0 8 126",
        "c=IN IP4 127.0.0.1",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=candidate:3411914425 1 udp 2113937151 127.0.0.1 50000 typ host generation 0",
        "a=end-of-candidates",
        "a=ice-ufrag:Xq9z",
        "a=ice-pwd:0123456789abcdefABCDEFgh",
        f"a=fingerprint:sha-256 {FINGERPRINT}",
        "a=setup:actpass",
        "a=mid:0",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "a=sendonly",
        "a=msid:stream track",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "a=rtcp-fb:111 transport-cc",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:126 telephone-event/8000",
        "a=ssrc:2873419230 cname:Yb4mW0rVq1kLzN9c",
        "m=application 50000 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 127.0.0.1",
        "a=ice-ufrag:Xq9z",
        "a=ice-pwd:0123456789abcdefABCDEFgh",
        f"a=fingerprint:sha-256 {FINGERPRINT}",
        "a=setup:actpass",
        "a=mid:1",
        "a=sctp-port:5000",
        "a=max-message-size:262144",
        "",
    ]
)
SDP_LINES = st.sampled_from(
    [
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "m=audio 9 UDP/TLS/RTP/SAVPF 0",
        "m=audio",
        "m=",
        "a=recvonly",
        "a=inactive",
        "a=sendrecv",
        "a=rtpmap:96 opus/48000/2",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:111",
        "a=rtpmap:x y/z",
        "a=fmtp:111",
        "a=ssrc-group:FID 1",
        "a=ssrc:x",
        "a=candidate:1 1 udp 1 ::1 9 typ host",
        "a=candidate:",
        "a=fingerprint:sha-256",
        "a=fingerprint:",
        "a=setup:",
        "a=ice-ufrag:",
        "a=ice-pwd:",
        "a=mid:",
        "a=sctp-port:x",
        "a=max-message-size:-1",
        "c=IN IP6 ::1",
        "c=IN IP4 999.1.1.1",
        "c=",
        "o=",
        "t=",
        "b=AS:x",
        "a=rtcp:x",
        "a=extmap:x",
        "x",
        "",
        "=",
        "a=",
    ]
)
SDP_TOKENS = st.sampled_from(["", "-1", "0", "65536", "9" * 30, "x", "\x00", "é", "::", "/", "a=b", " "])


@dataclass(frozen=True)
class WhipRequest:
    sdp: str
    content_type: str | None
    headers: dict[str, str]
    query: dict[str, str]


@st.composite
def whip_requests(draw: st.DrawFn) -> WhipRequest:
    lines = draw(st.sampled_from([OPUS_OFFER, OPUS_OFFER.replace("111 0 8", "0 8").replace("opus", "G722")]))
    lines = lines.split("\r\n")
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["delete", "duplicate", "insert", "token", "swap"]))
        if how == "delete":
            del lines[i]
        elif how == "duplicate":
            lines.insert(i, lines[i])
        elif how == "insert":
            lines.insert(i, draw(SDP_LINES | st.text(max_size=20)))
        elif how == "token":
            tokens = lines[i].split(" ")
            tokens[draw(st.integers(0, len(tokens) - 1))] = draw(SDP_TOKENS | st.text(max_size=8))
            lines[i] = " ".join(tokens)
        elif i + 1 < len(lines):
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
        if not lines:
            break
    sdp = draw(st.sampled_from(["\r\n", "\n"])).join(lines)
    if draw(st.integers(0, 9)) == 0:
        sdp = sdp[: draw(st.integers(0, len(sdp)))]
    ids = st.dictionaries(
        st.sampled_from(["call_id", "agent_id", "tenant", "other"]),
        st.sampled_from(["call-1", "agent-1", "acme", "", "a b", "x" * 200]) | LATIN1,
        max_size=3,
    )
    headers = {
        {"call_id": "vpmon-call-id", "agent_id": "vpmon-agent-id", "tenant": "vpmon-tenant"}.get(k, k): v
        for k, v in draw(ids).items()
    }
    return WhipRequest(
        sdp=sdp,
        content_type=draw(
            st.sampled_from([None, "application/sdp", "Application/SDP; charset=x", "text/plain", ""])
            | LATIN1
        ),
        headers=headers,
        query=draw(ids),
    )


def check_whip_request(request: WhipRequest) -> None:
    assert isinstance(whip.is_sdp(request.content_type), bool)
    try:
        identity = whip.call_identity(request.headers, request.query)
    except whip.WhipRefusal as refusal:
        assert refusal.status == 400 and refusal.detail, refusal
    else:
        for name in ("call_id", "agent_id"):
            value = getattr(identity, name)
            assert value is None or SPEAKER_RE.fullmatch(value), identity
        assert identity.tenant is None or TENANT_RE.fullmatch(identity.tenant), identity
    try:
        offered = whip.check_offer(request.sdp)
    except whip.WhipRefusal as refusal:
        assert refusal.status == 400 and refusal.detail, refusal
    else:
        assert offered.codec in ("opus", "PCMU") and isinstance(offered.data_channel, bool), offered


@dataclass(frozen=True)
class WhipFrames:
    codec: str
    first_pts: int
    actions: tuple[Any, ...]


WHIP_ACTIONS = st.one_of(
    st.tuples(
        st.just("audio"),
        st.integers(1, 1000),  # samples per channel
        st.sampled_from(["next", "next", "next", "gap", "jump", "repeat", "back", "none", "far"]),
        st.integers(1, 2**31),
        st.sampled_from(["ok"] * 12 + ["rate", "format", "channels", "odd"]),
    ),
    st.tuples(st.sampled_from(["stop", "lost"])),
    st.tuples(st.just("fail"), st.sampled_from([1000, 1011, 4004])),
    st.tuples(st.just("text"), GARBAGE_FRAMES),
    st.tuples(st.just("verdict"), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)),
)


@st.composite
def whip_calls(draw: st.DrawFn) -> WhipFrames:
    return WhipFrames(
        codec=draw(st.sampled_from(["opus", "PCMU"])),
        first_pts=draw(st.sampled_from([0, 2**32 - 500, 2**31]) | st.integers(0, 2**32 - 1)),
        actions=tuple(draw(st.lists(WHIP_ACTIONS, max_size=15))),
    )


def check_whip_call(case: WhipFrames) -> None:
    call = whip.WhipCall("call-1", case.codec, agent_id="agent-1")  # type: ignore[arg-type]
    rate, channels = whip.DECODED_FORMATS[case.codec]  # type: ignore[index]
    time_base = Fraction(1, rate)
    call.start()
    events: list[Event] = call.events_received()
    pts: int | None = case.first_pts
    last_pts = case.first_pts
    accepted = 0
    lost = False
    for action in case.actions:
        close_before = call.close_requested
        live = close_before is None and call.phase is Phase.LIVE
        if action[0] == "audio":
            _, samples, step, amount, fmt = action
            pcm = bytes(range(256)) * (samples * channels * 2 // 256) + bytes(samples * channels * 2 % 256)
            if step == "next":
                pts = last_pts
            elif step == "gap":
                pts = last_pts + amount % (rate * 40)
            elif step == "jump":
                pts = (last_pts + amount) % 2**32
            elif step == "repeat":
                pts = last_pts - samples
            elif step == "back":
                pts = (last_pts - amount) % 2**32
            elif step == "far":
                pts = last_pts + 2**40 + amount
            else:
                pts = None
            kwargs = {"sample_format": "s16", "sample_rate": rate, "channels": channels}
            if fmt == "rate":
                kwargs["sample_rate"] = 16000
            elif fmt == "format":
                kwargs["sample_format"] = "fltp"
            elif fmt == "channels":
                kwargs["channels"] = 3 - channels
            elif fmt == "odd":
                pcm += b"\x00"
            call.receive_audio(pcm, pts=pts, time_base=None if pts is None else time_base, **kwargs)
            new = call.events_received()
            violation = [event for event in new if isinstance(event, ProtocolViolation)]
            if not live:
                assert new == [], new
            elif fmt != "ok":
                assert violation and violation[0].code == 1003, new
            else:
                accepted += 1
                chunks = [event for event in new if isinstance(event, AudioChunk)]
                assert len(chunks) <= 1 and (not chunks or chunks[0].payload == pcm), new
            events += new
            if pts is not None:
                last_pts = pts + samples
        elif action[0] == "stop":
            call.stop()
        elif action[0] == "lost":
            call.connection_lost()
            lost = True
        elif action[0] == "fail":
            call.fail(action[1], "server ends the call")
        elif action[0] == "text":
            frame = action[1]
            (call.receive_bytes if isinstance(frame, bytes) else call.receive_text)(frame)
        else:
            call.send_verdict(action[1])
            sent = call.data_to_send()
            stopped = close_before is not None and close_before.code == 1000 and not lost
            assert len(sent) == (1 if live or stopped else 0), (sent, close_before)
        events += call.events_received()
        call.data_to_send()
    call.connection_lost()
    events += call.events_received()
    check_call_events(events, call.close_requested, ADAPTER_CODES, ended=True)
    assert call.frames + call.frames_late == accepted, (call.frames, call.frames_late, accepted)
    clock = 0.0  # where the next chunk may start, in seconds
    discarded = 0.0
    for event in events:
        if isinstance(event, AudioDiscarded):
            assert 0 < event.seconds <= whip.MAX_GAP_SECONDS + 0.01, event
            assert abs(event.media_time - clock) < 1e-6, (event, clock)
            clock += event.seconds
            discarded += event.seconds
        elif isinstance(event, AudioChunk):
            assert abs(event.media_time - clock) < 1e-6, (event.media_time, clock)
            clock = event.media_time + len(event.payload) / (2 * channels * rate)
    assert abs(call.discarded_seconds - discarded) < 1e-6


# ------------------------------------------------------------------------------------------------ audio


@dataclass(frozen=True)
class Codec:
    data: bytes
    channels: int


CODEC_INPUTS = st.builds(Codec, st.binary(max_size=2048), st.integers(1, 4))


def check_codecs(case: Codec) -> None:
    for decode in (decode_mulaw, decode_alaw):
        samples = decode(case.data)
        assert samples.dtype == np.float32 and samples.shape == (len(case.data),), samples.shape
        assert np.all(np.abs(samples) <= 1.0)
    frame = 2 * case.channels
    try:
        samples = decode_pcm16(case.data, case.channels)
    except AudioError:
        assert len(case.data) % frame, "a whole number of frames was refused"
    else:
        assert len(case.data) % frame == 0
        shape = (len(case.data) // 2,) if case.channels == 1 else (len(case.data) // frame, case.channels)
        assert samples.dtype == np.float32 and samples.shape == shape
        assert np.all((samples >= -1.0) & (samples < 1.0))


@dataclass(frozen=True)
class AudioFile:
    data: bytes
    channel: int | None
    how: str


_FORMATS = [
    ("WAV", "PCM_16"),
    ("WAV", "PCM_U8"),
    ("WAV", "FLOAT"),
    ("WAV", "ULAW"),
    ("WAV", "ALAW"),
    ("WAV", "PCM_24"),
    ("FLAC", "PCM_16"),
    ("OGG", "VORBIS"),
    ("AIFF", "PCM_16"),
    ("AU", "PCM_16"),
    ("CAF", "PCM_16"),
    ("W64", "PCM_16"),
    ("RF64", "PCM_16"),
]
_MAGIC = [
    b"RIFF",
    b"RIFX",
    b"RF64",
    b"fLaC",
    b"OggS",
    b"FORM",
    b".snd",
    b"caff",
    b"riff",
    b"\x00\x00\x00\x00",
]


@st.composite
def audio_files(draw: st.DrawFn) -> AudioFile:
    kind = draw(st.sampled_from(["file", "file", "file", "random", "magic"]))
    if kind == "random":
        data = draw(st.binary(max_size=600))
    elif kind == "magic":
        data = draw(st.sampled_from(_MAGIC)) + draw(st.binary(max_size=200))
    else:
        fmt, subtype = draw(st.sampled_from(_FORMATS))
        channels = draw(st.integers(1, 3))
        rate = draw(st.sampled_from([8000, 16000, 44100, 1, 7, 96000, 192000]))
        frames = draw(st.integers(0 if fmt != "OGG" else 1, 400))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        samples = (rng.standard_normal((frames, channels)) * draw(st.sampled_from([0.01, 0.3, 4.0]))).astype(
            np.float32
        )
        buffer = io.BytesIO()
        try:
            sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
        except (sf.LibsndfileError, ValueError, TypeError):  # a combination libsndfile will not write
            buffer = io.BytesIO(b"RIFF")
        data = bytearray(buffer.getvalue())
        for _ in range(draw(st.integers(0, 3))):
            if not data:
                break
            how = draw(st.sampled_from(["flip", "field", "cut", "insert"]))
            at = draw(st.integers(0, min(len(data) - 1, 80) if draw(st.booleans()) else len(data) - 1))
            if how == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif how == "field":
                value = draw(st.sampled_from([0, 1, 2**15, 2**16 - 1, 2**31 - 1, 2**32 - 1]))
                data[at : at + 4] = struct.pack("<I", value)[: len(data) - at]
            elif how == "cut":
                del data[at:]
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
        data = bytes(data)
    return AudioFile(data, draw(st.none() | st.integers(0, 3)), kind)


def check_audio_file(case: AudioFile) -> None:
    try:
        audio = read_audio_bytes(case.data, "upload", case.channel)
    except AudioError as error:
        assert str(error), "an AudioError must say what to do"
        return
    samples = audio.samples
    assert samples.dtype == np.float32 and samples.ndim == 1 and len(samples) > 0, samples.shape
    assert np.all(np.isfinite(samples)) and np.all(np.abs(samples) <= 1.0)
    assert isinstance(audio.sample_rate, int) and audio.sample_rate > 0, audio.sample_rate
    assert math.isfinite(audio.duration)


# ------------------------------------------------------------------------------------------------ live audio

SILENCES = st.sampled_from(
    [0.0, 0.001, 0.02, 0.3, 1.0, 4.9, 30.0, 33.3, 600.0, 3600.0, 86400.0, 9007199.254740991]
)


@dataclass(frozen=True)
class AgentStream:
    encoding: str
    sample_rate: int
    channels: int
    agent_channel: int | None
    ops: tuple[Any, ...]


@st.composite
def agent_streams(draw: st.DrawFn) -> AgentStream:
    channels = draw(st.sampled_from([1, 1, 2]))
    agent_channel = draw(st.integers(0, channels - 1)) if channels == 2 or draw(st.booleans()) else None
    if draw(st.integers(0, 9)) == 0:
        agent_channel = draw(st.sampled_from([None, -1, 2, 5]))
    encoding = draw(
        st.sampled_from(["mulaw", "alaw", "pcm16"]) if draw(st.integers(0, 19)) else st.just("opus")
    )
    frame_bytes = (2 if encoding == "pcm16" else 1) * channels
    payload = st.one_of(
        st.integers(0, 300).map(lambda n: bytes(n * frame_bytes)),  # digital silence
        st.binary(max_size=800).map(lambda b: b * 3),  # noise the VAD may call speech
        st.binary(max_size=40),  # any length: may not be whole frames
    )
    ops = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("feed"), payload),
                st.tuples(st.just("silence"), SILENCES | st.floats(0, 60)),
            ),
            max_size=10,
        )
    )
    if draw(st.booleans()):
        ops.append(("flush",))  # the end of the call
    rate = draw(st.sampled_from([*native.STANDARD_RATES, 8000, 8000, 48000]))
    return AgentStream(encoding, rate, channels, agent_channel, tuple(ops))


def check_agent_stream(case: AgentStream, vad: VadConfig = VadConfig()) -> None:
    try:
        stream = AgentAudio(case.encoding, case.sample_rate, case.channels, case.agent_channel, vad)  # type: ignore[arg-type]
    except AudioError:
        valid_channel = case.agent_channel is None or 0 <= case.agent_channel < case.channels
        assert (
            case.encoding not in ("mulaw", "alaw", "pcm16")
            or not valid_channel
            or (case.channels > 1 and case.agent_channel is None)
        ), "a valid format was refused"
        return
    frame_bytes = (2 if case.encoding == "pcm16" else 1) * case.channels
    received = 0.0
    previous_end = 0.0
    for op in case.ops:
        if op[0] == "feed":
            try:
                windows = stream.feed(op[1])
            except AudioError:
                assert len(op[1]) % frame_bytes, "whole frames were refused"
                continue
            assert len(op[1]) % frame_bytes == 0, "a partial frame was accepted"
            received += len(op[1]) // frame_bytes / case.sample_rate
        elif op[0] == "silence":
            windows = stream.feed_silence(op[1])
            received += op[1]
        else:
            windows = stream.flush()
        assert math.isclose(stream.seconds_received, received, rel_tol=1e-9, abs_tol=1e-6)
        for window in windows:
            assert previous_end - 1e-9 <= window.start < window.end <= received + 0.1, (window, received)
            assert vad.min_window - 0.03 <= window.duration <= vad.max_window + 1e-9, window.duration
            assert 0 < window.speech_seconds <= window.duration + 1e-9
            assert window.samples.dtype == np.float32 and len(window.samples) == round(
                window.duration * 16000
            )
            assert np.all(np.isfinite(window.samples)) and np.all(np.abs(window.samples) <= 1.0)
            previous_end = window.end


@dataclass(frozen=True)
class VadInput:
    options: dict[str, Any]
    seed: int
    segments: tuple[tuple[str, int, float], ...]  # (kind, samples, level)
    chunks: tuple[int, ...]
    form: str  # "float32", "float64", "int16", "2d"


@st.composite
def vad_inputs(draw: st.DrawFn) -> VadInput:
    options: dict[str, Any] = {}
    choices = {
        "frame_ms": st.sampled_from([10, 20, 30, 30, 15]),
        "aggressiveness": st.sampled_from([0, 1, 2, 3, 4]),
        "min_window": st.sampled_from([0.01, 0.3, 0.5, 1.0, 0.0]),
        "max_window": st.sampled_from([0.02, 0.5, 1.0, 3.0, 0.005]),
        "hangover_ms": st.sampled_from([0, 90, 300, 1000, -1]),
        "min_speech_ratio": st.sampled_from([0.0, 0.6, 1.0, 1.5]),
        "min_frame_dbfs": st.sampled_from([None, -60.0, -20.0]),
    }
    for key, values in choices.items():
        if draw(st.booleans()):
            options[key] = draw(values)
    segments = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["silence", "noise", "tone", "burst"]),
                st.integers(0, 16000),
                st.sampled_from([1e-4, 0.01, 0.1, 0.5, 1.0, 3.0]),
            ),
            max_size=5,
        )
    )
    return VadInput(
        options=options,
        seed=draw(st.integers(0, 2**32 - 1)),
        segments=tuple(segments),
        chunks=tuple(draw(st.lists(st.integers(0, 9000), max_size=6))),
        form=draw(st.sampled_from(["float32"] * 6 + ["float64", "int16", "2d"])),
    )


def _vad_signal(case: VadInput) -> np.ndarray:
    rng = np.random.default_rng(case.seed)
    parts = []
    for kind, n, level in case.segments:
        t = np.arange(n) / 16000
        if kind == "silence":
            part = np.zeros(n)
        elif kind == "noise":
            part = rng.standard_normal(n) * level
        elif kind == "tone":
            part = np.sin(2 * np.pi * rng.uniform(80, 4000) * t) * level
        else:  # syllable-like bursts: a tone switched on and off every 100-300 ms
            gate = (np.floor(t / rng.uniform(0.1, 0.3)) % 2).astype(float)
            part = np.sin(2 * np.pi * 220 * t) * gate * level + rng.standard_normal(n) * 0.01
        parts.append(part)
    return np.concatenate(parts) if parts else np.zeros(0)


def check_vad(case: VadInput) -> None:
    try:
        segmenter = VadSegmenter(**case.options)
    except ValueError:
        return  # documented: the options are checked
    signal = _vad_signal(case)
    if case.form in ("int16", "2d"):
        bad = (
            (signal * 1000).astype(np.int16)
            if case.form == "int16"
            else signal.reshape(1, -1).astype(np.float32)
        )
        try:
            segmenter.feed(bad)
        except ValueError:
            return
        raise AssertionError(f"{case.form} input was accepted")
    signal = signal.astype(case.form)
    windows = []
    position = 0
    for size in case.chunks:
        windows += segmenter.feed(signal[position : position + size])
        position += size
    windows += segmenter.feed(signal[position:])
    windows += segmenter.flush()
    whole = segment(signal, **case.options)
    assert [(w.start, w.end, w.speech_seconds) for w in windows] == [
        (w.start, w.end, w.speech_seconds) for w in whole
    ], "chunking changed the windows"
    frame = segmenter.frame_ms / 1000
    previous_end = 0.0
    as_fed = signal.astype(np.float32)
    for window, reference in zip(windows, whole, strict=True):
        assert previous_end <= window.start < window.end <= len(signal) / 16000 + 1e-9, window
        assert segmenter._min_frames * frame - 1e-9 <= window.duration <= segmenter._max_frames * frame + 1e-9
        assert window.speech_seconds >= segmenter.min_speech_ratio * window.duration - 1e-9
        first, last = round(window.start * 16000), round(window.end * 16000)
        assert np.array_equal(window.samples, as_fed[first:last]), "a window's samples are not its span"
        assert np.array_equal(window.samples, reference.samples)
        previous_end = window.end


# ------------------------------------------------------------------------------------------------ weights

_MARKER = "fuzz-pwned"
_FORBIDDEN = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("subprocess", "call"),
    ("torch", "load"),
]


def _p_str(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(data)) + data


def _p_int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = pickle.encode_long(value)
    return (
        b"\x8a" + bytes([len(data)]) + data
        if len(data) < 256
        else b"\x8b" + struct.pack("<i", len(data)) + data
    )


def _p_global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _p_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _p_call(function: bytes, *args: bytes) -> bytes:
    return function + _p_tuple(*args) + b"R"


@dataclass(frozen=True)
class Tensor:
    name: str
    storage: str  # "FloatStorage"…
    key: str
    numel: int
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _p_tensor(t: Tensor, parameter: bool) -> bytes:
    pid = _p_tuple(
        _p_str("storage"), _p_global("torch", t.storage), _p_str(t.key), _p_str("cpu"), _p_int(t.numel)
    )
    tensor = _p_call(
        _p_global("torch._utils", "_rebuild_tensor_v2"),
        pid + b"Q",
        _p_int(t.offset),
        _p_tuple(*map(_p_int, t.shape)),
        _p_tuple(*map(_p_int, t.strides)),
        b"\x89",
        _p_call(_p_global("collections", "OrderedDict")),
    )
    return _p_call(_p_global("torch._utils", "_rebuild_parameter"), tensor, b"\x89") if parameter else tensor


@dataclass(frozen=True)
class Checkpoint:
    layout: str  # "zip" | "legacy"
    data: bytes
    key: str | None  # what the loader is asked to select
    attack: str  # what the generator did to a valid checkpoint
    forbidden: str | None = None  # "module.name" of a forbidden global the pickle calls: must be named
    tensors: tuple[tuple[str, tuple[int, ...], str], ...] | None = (
        None  # (name, shape, dtype) if it must load
    )


_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@st.composite
def _tensors(draw: st.DrawFn) -> list[Tensor]:
    """Valid tensors: plain ones, views at an offset into a larger storage, transposed strides, 0-d."""
    tensors = []
    storages: dict[str, tuple[str, int]] = {}
    for index in range(draw(st.integers(0, 4))):
        key = str(draw(st.integers(0, 3)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        offset = draw(st.integers(0, 5)) if draw(st.integers(0, 3)) == 0 else 0
        if len(set(shape)) == 1 and draw(st.booleans()):
            strides = strides[::-1]  # a transpose of a square block
        needed = (
            offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
            if 0 not in shape
            else 0
        )
        dtype, numel = storages.get(key, (draw(st.sampled_from(list(_DTYPES))), 0))
        storages[key] = (dtype, max(numel, needed + draw(st.integers(0, 2))))
        tensors.append(Tensor(f"layer{index}.w", dtype, key, 0, offset, shape, strides))
    # every tensor of a storage names the storage alike (type and size), as torch writes them
    return [
        Tensor(t.name, storages[t.key][0], t.key, storages[t.key][1], t.offset, t.shape, t.strides)
        for t in tensors
    ]


def _bomb(depth: int, container: bytes) -> bytes:
    """A structure whose every level holds the one below twice, fetched from the memo: 2**depth nodes
    in a few hundred bytes (hashing it or printing it never ends)."""
    body = container + b"q\x00" + b"0"
    for level in range(depth):
        body += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86q" + bytes([level + 1]) + b"0"
    return body + b"h" + bytes([depth])


def _pid(t: Tensor) -> bytes:
    return (
        _p_tuple(
            _p_str("storage"), _p_global("torch", t.storage), _p_str(t.key), _p_str("cpu"), _p_int(t.numel)
        )
        + b"Q"
    )


ATTACKS = [
    "none",
    "none",
    "forbidden",  # a call to os.system & co. anywhere among valid tensors
    "build_global",  # BUILD on an allow-listed global: must not change it for the files read later
    "build_tensor",  # BUILD on a tensor or a storage: must not change what was checked
    "build_storage",
    "bomb",  # shared containers (memo), DUP: exponential hashing or printing
    "dup",
    "deep",  # nesting far deeper than any checkpoint
    "memo_index",  # an object stored under a memo index of up to 2**32
    "huge_shape",  # more elements than memory
    "wrong_types",  # a tensor's arguments of the wrong types
    "opcode",  # random opcodes spliced in
    "flip",  # bit flips anywhere in the file
    "cut",  # truncated
    "zip",  # compressed members, damaged archive, unknown compression methods, missing storages
    "byteorder",
    "legacy",  # a legacy stream with a wrong magic, version, byte order, key list or element count
    "random",
]


@st.composite
def checkpoints(draw: st.DrawFn) -> Checkpoint:
    tensors = draw(_tensors())
    storages = {t.key: (t.storage, t.numel) for t in tensors}
    entries = [_p_str(t.name) + _p_tensor(t, draw(st.booleans())) for t in tensors]
    if draw(st.booleans()):
        entries.insert(
            draw(st.integers(0, len(entries))), _p_str("steps") + _p_int(draw(st.integers(-(2**70), 2**70)))
        )
    attack = draw(st.sampled_from(ATTACKS))
    forbidden = None
    if attack == "forbidden":
        module, name = draw(st.sampled_from(_FORBIDDEN))
        payload = _p_call(_p_global(module, name), _p_str(f"touch {scratch() / _MARKER}"))
        entries.insert(draw(st.integers(0, len(entries))), _p_str("evil") + payload)
        forbidden = f"{module}.{name}"
    elif attack == "build_global":
        target = draw(
            st.sampled_from(
                [
                    _p_global("torch", "FloatStorage"),
                    _p_global("torch._utils", "_rebuild_tensor_v2"),
                    _p_global("torch._utils", "_rebuild_parameter"),
                    _p_global("collections", "OrderedDict"),
                ]
            )
        )
        state = draw(
            st.sampled_from(
                [
                    b"}" + _p_str("dtype") + _p_str("O") + b"s",  # the instance dict
                    b"N}" + _p_str("__defaults__") + b")s\x86",  # (None, slot state): setattr
                    b"N}" + _p_str("dtype") + _p_str("O") + b"s\x86",
                ]
            )
        )
        entries.insert(0, _p_str("x") + target + state + b"b")
    elif attack in ("build_tensor", "build_storage") and tensors:
        t = tensors[0]
        field_name = draw(
            st.sampled_from(["shape", "strides", "offset", "numel", "dtype", "root_offset", "key"])
        )
        value = draw(
            st.sampled_from(
                [_p_str("ab"), _p_str("a"), _p_str("O"), b"N", _p_int(-1), _p_tuple(_p_int(2**70))]
            )
        )
        state = b"}" + _p_str(field_name) + value + b"s"
        if attack == "build_tensor":
            entries[0] = _p_str(t.name) + _p_tensor(t, False) + state + b"b"
        else:
            entries[0] = _p_str(t.name) + _p_call(
                _p_global("torch._utils", "_rebuild_tensor_v2"),
                _pid(t) + state + b"b",
                _p_int(t.offset),
                _p_tuple(*map(_p_int, t.shape)),
                _p_tuple(*map(_p_int, t.strides)),
            )
    elif attack == "bomb":
        depth = draw(st.integers(20, 60))
        where = draw(st.sampled_from(["key", "value", "offset", "pid"] if tensors else ["key", "value"]))
        if where == "key":
            entries.append(_bomb(depth, b")") + _p_int(1))
        elif where == "value":
            entries.append(_p_str("bomb") + _bomb(depth, draw(st.sampled_from([b")", b"]", b"}"]))))
        elif where == "offset":  # printed by the error message of a bad argument
            t = tensors[0]
            bomb = _bomb(depth, draw(st.sampled_from([b")", b"]"])))
            rebuild = _p_global("torch._utils", "_rebuild_tensor_v2")
            entries.append(_p_str("b") + _p_call(rebuild, _pid(t), bomb, _p_tuple(), _p_tuple()))
        else:  # printed by the error message of a bad persistent id
            entries.append(_p_str("b") + _p_tuple(_p_str("storage"), _bomb(depth, b")")) + b"Q")
    elif attack == "dup":
        entries.append(b")" + b"2\x86" * draw(st.integers(20, 60)) + _p_int(1))  # x → (x, x), as a key
    elif attack == "deep":  # as a value, or as a key (hashed: a million levels overflow the C stack)
        depth = draw(st.sampled_from([100, 1000, 50_000, 1_000_000]))
        nested = b"(" * depth + b")" + b"t" * depth
        entries.append(_p_str("deep") + nested if draw(st.booleans()) else nested + _p_int(1))
    elif attack == "memo_index":  # LONG_BINPUT
        index = draw(st.sampled_from([2**20, 171_079_263, 2**32 - 1]) | st.integers(0, 2**32 - 1))
        entries.append(_p_str("m") + _p_int(1) + b"r" + struct.pack("<I", index))
    elif attack == "huge_shape" and tensors:
        t = tensors[0]
        shape = draw(st.sampled_from([(10**12,), (2**70,), (2**31, 2**31), (2**62, 4), (10**9,)]))
        entries[0] = _p_str(t.name) + _p_tensor(
            Tensor(t.name, t.storage, t.key, t.numel, 0, shape, (0,) * len(shape)), False
        )
    elif attack == "wrong_types" and tensors:
        t = tensors[0]
        junk = draw(
            st.sampled_from(
                [
                    _p_str("x"),
                    b"N",
                    _p_int(-5),
                    b"]",
                    b"}",
                    _p_tuple(_p_str("a")),
                    b"\x88",
                    b"G" + struct.pack(">d", math.nan),
                ]
            )
        )
        args = [_pid(t), _p_int(t.offset), _p_tuple(*map(_p_int, t.shape)), _p_tuple(*map(_p_int, t.strides))]
        args[draw(st.integers(0, 3))] = junk
        entries[0] = _p_str(t.name) + _p_call(_p_global("torch._utils", "_rebuild_tensor_v2"), *args)
    elif attack in ("build_tensor", "build_storage", "huge_shape", "wrong_types"):
        attack = "none"
    state_dict = b"}(" + b"".join(entries) + b"u"
    nest = draw(st.sampled_from([None, None, None, "model_state"]))
    key = nest
    if draw(st.integers(0, 7)) == 0:
        key = draw(st.sampled_from([None, "missing", "model_state"]))
    body = (
        state_dict if nest is None else b"}(" + _p_str(nest) + state_dict + _p_str("step") + _p_int(3) + b"u"
    )
    data_pkl = b"\x80\x02" + body + b"."
    if attack == "opcode":
        at = draw(st.integers(0, len(data_pkl)))
        data_pkl = data_pkl[:at] + draw(st.binary(min_size=1, max_size=6)) + data_pkl[at:]
    arrays = {
        k: bytes(range(256)) * (n * np.dtype(_DTYPES[d]).itemsize // 256)
        + bytes(n * np.dtype(_DTYPES[d]).itemsize % 256)
        for k, (d, n) in storages.items()
    }
    damaged_storage = draw(st.integers(0, 9)) == 0 and bool(arrays)
    if damaged_storage:
        k = draw(st.sampled_from(sorted(arrays)))
        arrays[k] = arrays[k][: draw(st.integers(0, len(arrays[k])))] + draw(
            st.binary(min_size=1, max_size=3)
        )
    layout = draw(st.sampled_from(["zip", "zip", "legacy"]))
    prefix = "archive/"
    if layout == "zip":
        prefix = draw(st.sampled_from(["archive/", "archive/", "m/", "a/b/", ""]))
        data = _zip(draw, attack, prefix, data_pkl, arrays)
    else:
        data = _legacy(draw, attack, data_pkl, arrays, storages)
    if attack == "flip" and data:
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            flipped[draw(st.integers(0, len(flipped) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(flipped)
    elif attack == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif attack == "random":
        data = draw(st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06" + bytes(18), b"\x80\x02"])) + draw(
            st.binary(max_size=300)
        )
    pickle_read = prefix.count("/") == 1  # else the archive is refused before its pickle is read
    loads = attack == "none" and key == nest and not damaged_storage and pickle_read and bool(tensors)
    expected = tuple((t.name, t.shape, _DTYPES[t.storage]) for t in tensors) if loads else None
    return Checkpoint(layout, data, key, attack, forbidden if pickle_read else None, expected)


def _zip(draw: st.DrawFn, attack: str, prefix: str, data_pkl: bytes, arrays: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    compression = zipfile.ZIP_STORED
    if attack == "zip":
        compression = draw(
            st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
        )
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        archive.writestr(prefix + "data.pkl", data_pkl)
        if attack == "byteorder":
            archive.writestr(
                prefix + "byteorder", draw(st.sampled_from([b"big", b"little\n", b"", b"\xff" * 3]))
            )
        elif draw(st.booleans()):
            archive.writestr(prefix + "byteorder", b"little")
        for k, raw in arrays.items():
            if not (attack == "zip" and draw(st.integers(0, 3)) == 0):  # sometimes a storage is missing
                archive.writestr(f"{prefix}data/{k}", raw)
        if attack == "zip" and draw(st.integers(0, 3)) == 0:  # a second pickle, or the same name twice
            with warnings.catch_warnings(action="ignore", category=UserWarning):  # "Duplicate name"
                archive.writestr(draw(st.sampled_from(["x/data.pkl", prefix + "data.pkl"])), b"\x80\x02}.")
    data = bytearray(buffer.getvalue())
    if attack == "zip":  # damage the archive itself: its headers and compressed streams
        for _ in range(draw(st.integers(0, 4))):
            if draw(st.booleans()):
                data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
                continue
            headers = [j for j in range(len(data) - 4) if data[j : j + 4] in (b"PK\x03\x04", b"PK\x01\x02")]
            j = draw(st.sampled_from(headers))
            k = j + (8 if data[j + 2] == 3 else 10)  # the compression method of a local or central header
            data[k : k + 2] = struct.pack("<H", draw(st.sampled_from([1, 6, 9, 12, 14, 97, 98, 99])))
    return bytes(data)


def _legacy(
    draw: st.DrawFn,
    attack: str,
    data_pkl: bytes,
    arrays: dict[str, bytes],
    storages: dict[str, tuple[str, int]],
) -> bytes:
    magic, version = torch_weights._LEGACY_MAGIC, torch_weights._LEGACY_PROTOCOL
    sys_info: Any = {"protocol_version": version, "little_endian": True, "type_sizes": {}}
    keys: Any = list(arrays)
    which = (
        draw(st.sampled_from(["magic", "version", "endian", "keys", "count"])) if attack == "legacy" else None
    )
    if which == "magic":
        magic += 1
    elif which == "version":
        version = draw(st.sampled_from([1000, "1001", None]))
    elif which == "endian":
        sys_info = draw(st.sampled_from([{"little_endian": False}, [], {"little_endian": 1}]))
    elif which == "keys":
        keys = draw(st.sampled_from([[*arrays, "unused"], [1], "x", keys[::-1], keys + keys]))
    parts = [pickle.dumps(v, protocol=2) for v in (magic, version, sys_info)] + [
        data_pkl,
        pickle.dumps(keys, protocol=2),
    ]
    for k, raw in arrays.items():
        count = storages[k][1] + (draw(st.sampled_from([-1, 1, 2**40, -(2**63)])) if which == "count" else 0)
        parts += [struct.pack("<q", count), raw]
    return b"".join(parts)


def _allow_list_state() -> list[Any]:
    """Everything a pickle could reach on the allow-listed objects, to prove no file changed it."""
    state = []
    for value in torch_weights._ALLOWED_GLOBALS.values():
        state.append((type(value).__name__, dict(getattr(value, "__dict__", {}) or {})))
        state.append(getattr(value, "__defaults__", None))
        state.append(getattr(value, "__kwdefaults__", None))
    return state


_PRISTINE_ALLOW_LIST = _allow_list_state()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_checkpoint(case: Checkpoint) -> None:
    path = scratch() / "fuzz.pt"
    path.write_bytes(case.data)
    marker = scratch() / _MARKER
    peak = _peak_rss_mb()
    try:
        state = torch_weights.load_state_dict(path, key=case.key)
    except ModelError as error:
        assert str(error)
        if case.forbidden is not None:
            assert f"global '{case.forbidden}'" in str(error), str(error)
        assert case.tensors is None, f"a valid checkpoint was refused: {error}"
    else:
        assert case.forbidden is None, f"{case.forbidden} was not refused"
        assert isinstance(state, dict)
        if case.tensors is not None:
            got = tuple((name, array.shape, array.dtype.str.lstrip("<>|=")) for name, array in state.items())
            assert got == tuple((n, s, d if d != "?" else "b1") for n, s, d in case.tensors), got
        for name, array in state.items():
            assert isinstance(name, str) and isinstance(array, np.ndarray), (name, type(array))
            assert array.flags.c_contiguous and array.dtype.isnative and array.dtype.kind in "fiub", (
                array.dtype
            )
    assert not marker.exists(), "the pickle ran a forbidden global"
    # files of a few kB must not make the loader take gigabytes (the peak only shows what exceeds it)
    assert _peak_rss_mb() - peak < 1024, f"the loader's peak memory grew by {_peak_rss_mb() - peak:.0f} MB"
    assert _allow_list_state() == _PRISTINE_ALLOW_LIST, "a file changed the loader's allow-listed objects"


# ------------------------------------------------------------------------------------------------ model spec

_SPEC_VALUES = st.one_of(
    st.sampled_from(NASTY_VALUES[1:19]),  # the scalars but null: TOML has none
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=10),
    st.booleans(),
    st.lists(st.integers(0, 3), max_size=2),
)
SPEC_FIELDS: dict[str, Any] = {
    "id": st.sampled_from(["my-model", "x"]),
    "name": st.just("A model"),
    "description": st.just("d"),
    "licence": st.just("MIT"),
    "onnx": st.sampled_from(["model.onnx", "model.onnx", "missing.onnx", "", ".", "/", "sub", "a\x00b"]),
    "sample_rate": st.sampled_from([16000, 16000, 8000]),
    "embedding_dim": st.sampled_from([192, 256, 1]),
    "input_name": st.just("feats"),
    "output_name": st.just("embs"),
}
FRONTEND_FIELDS: dict[str, Any] = {
    "kind": st.sampled_from(["kaldi_fbank", "ge2e_mel"]),
    "num_bins": st.sampled_from([80, 40]),
    "frame_length_ms": st.sampled_from([25.0, 25]),
    "frame_shift_ms": st.sampled_from([10.0, 10]),
    "mean_normalise": st.booleans(),
}
WINDOW_FIELDS: dict[str, Any] = {
    "min_seconds": st.sampled_from([0.5, 1]),
    "max_seconds": st.sampled_from([10.0, 3]),
    "partial_frames": st.sampled_from([160, 100]),
    "partial_rate": st.just(1.3),
    "min_coverage": st.just(0.75),
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (lone surrogates make it invalid TOML: fine)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _toml_table(draw: st.DrawFn, fields: dict[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    table = {}
    for key, values in fields.items():
        if key in required or draw(st.booleans()):
            table[key] = draw(values)
    for _ in range(draw(st.integers(0, 2))):  # a wrong value, a missing field, an unknown one
        how = draw(st.sampled_from(["value", "drop", "extra"]))
        if how == "value" and table:
            table[draw(st.sampled_from(sorted(table)))] = draw(_SPEC_VALUES)
        elif how == "drop" and table:
            del table[draw(st.sampled_from(sorted(table)))]
        else:
            table[draw(st.sampled_from(["extra", "kind", "id", "1", ""]))] = draw(_SPEC_VALUES)
    return {key: value for key, value in table.items() if value is not None}


@dataclass(frozen=True)
class SpecFile:
    data: bytes


@st.composite
def spec_files(draw: st.DrawFn) -> SpecFile:
    top = _toml_table(draw, SPEC_FIELDS, ("id", "onnx", "embedding_dim"))
    lines = [f"{json.dumps(key)} = {toml_value(value)}" for key, value in top.items()]
    for name, fields, required in (
        ("frontend", FRONTEND_FIELDS, ("kind", "num_bins")),
        ("windows", WINDOW_FIELDS, ()),
    ):
        if name == "frontend" or draw(st.booleans()):
            table = _toml_table(draw, fields, required)
            if draw(st.integers(0, 9)) == 0:
                lines.append(f"{name} = {toml_value(draw(_SPEC_VALUES))}")
            else:
                lines.append(f"[{name}]")
                lines += [f"{json.dumps(key)} = {toml_value(value)}" for key, value in table.items()]
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["none"] * 6 + ["cut", "insert", "bom", "latin1", "random"]))
    if how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "insert":
        at = draw(st.integers(0, len(data)))
        data = (
            data[:at]
            + draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b"\n[", b"=", b'"', b"\xff"]))
            + data[at:]
        )
    elif how == "bom":
        data = b"\xef\xbb\xbf" + data
    elif how == "latin1":
        data = data + b'\nname = "caf\xe9"'
    elif how == "random":
        data = draw(st.binary(max_size=200))
    return SpecFile(data)


def check_spec(case: SpecFile) -> None:
    directory = scratch() / "spec"
    (directory / "sub").mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(b"not really onnx")
    path = directory / "model.toml"
    path.write_bytes(case.data)
    try:
        spec = load_spec_file(path)
    except ModelError as error:
        assert str(error)
        return
    assert isinstance(spec, ModelSpec)
    # What the embedder relies on: the types and ranges the dataclasses declare.
    for name in ("id", "name", "description", "licence", "input_name", "output_name"):
        assert isinstance(getattr(spec, name), str), (name, getattr(spec, name))
    assert spec.sample_rate == 16000 and type(spec.sample_rate) is int
    assert type(spec.embedding_dim) is int and spec.embedding_dim > 0, spec.embedding_dim
    frontend, windows = spec.frontend, spec.windows
    assert (
        frontend.kind in ("kaldi_fbank", "ge2e_mel")
        and type(frontend.num_bins) is int
        and frontend.num_bins > 0
    ), frontend
    for value in (
        frontend.frame_length_ms,
        frontend.frame_shift_ms,
        windows.min_seconds,
        windows.max_seconds,
        windows.partial_rate,
    ):
        assert (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        ), spec
    assert isinstance(frontend.mean_normalise, bool), frontend
    assert windows.min_seconds <= windows.max_seconds, windows
    assert windows.partial_frames is None or (
        type(windows.partial_frames) is int and windows.partial_frames > 0
    ), windows
    assert isinstance(windows.min_coverage, int | float) and 0 < windows.min_coverage <= 1, windows
    assert spec.onnx_path is not None and spec.onnx_path.is_file()


# ------------------------------------------------------------------------------------------------ trials

_TRIAL_TOKENS = st.sampled_from(
    [
        "1",
        "0",
        "target",
        "nontarget",
        "a.wav",
        "dir/b.flac",
        "/abs/c.wav",
        "../up.wav",
        "#",
        "# x",
        "é.wav",
        "\x00",
        "1.0",
        "True",
    ]
)
_SPACES = st.sampled_from([" ", "\t", "  ", "\u00a0", "\u3000", "\x1c", "\x0b"])


@dataclass(frozen=True)
class TrialsFile:
    data: bytes
    durations: str


@st.composite
def trials_files(draw: st.DrawFn) -> TrialsFile:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        form = draw(st.sampled_from(["label", "kaldi", "comment", "blank", "tokens"]))
        if form == "label":
            tokens = [draw(st.sampled_from(["1", "0"])), draw(_TRIAL_TOKENS), draw(_TRIAL_TOKENS)]
        elif form == "kaldi":
            tokens = [
                draw(_TRIAL_TOKENS),
                draw(_TRIAL_TOKENS),
                draw(st.sampled_from(["target", "nontarget"])),
            ]
        elif form == "comment":
            tokens = ["#", *draw(st.lists(_TRIAL_TOKENS, max_size=3))]
        elif form == "blank":
            tokens = []
        else:
            tokens = draw(st.lists(_TRIAL_TOKENS | st.text(max_size=5), max_size=5))
        lines.append(draw(st.sampled_from(["", " ", "\t"])) + draw(_SPACES).join(tokens))
    text = draw(st.sampled_from(["\n", "\r\n", "\r", "\u2028"])).join(lines)
    encoding = draw(st.sampled_from(["utf-8"] * 5 + ["utf-16", "latin-1", "bytes"]))
    data = draw(st.binary(max_size=100)) if encoding == "bytes" else text.encode(encoding, "replace")
    items = draw(
        st.lists(
            st.sampled_from(
                [
                    "full",
                    "FULL",
                    " 3 ",
                    "1",
                    "0.5s",
                    "0",
                    "-1",
                    "",
                    "nan",
                    "inf",
                    "-inf",
                    "1e999",
                    "1e-400",
                    "0x10",
                    "٣",
                    "½",
                    "3 s",
                    "1_0",
                ]
            )
            | st.floats().map(repr)
            | st.text(max_size=4),
            min_size=1,
            max_size=4,
        )
    )
    return TrialsFile(data, draw(st.sampled_from([",", ", ", ";"])).join(items))


def check_trials(case: TrialsFile) -> None:
    path = scratch() / "trials.txt"
    path.write_bytes(case.data)
    try:
        read = trials.read_trials(path)
    except CalibrationError as error:
        assert str(error)
    else:
        assert read and all(isinstance(t.target, bool) for t in read)
        assert len(read) <= len(case.data.decode("utf-8").splitlines()), "more trials than lines"
        for trial in read:
            assert isinstance(trial.enrol, Path) and isinstance(trial.test, Path)
    try:
        durations = trials.parse_durations(case.durations)
    except CalibrationError as error:
        assert str(error)
    else:
        assert durations, case.durations
        for value in durations:
            assert value is None or (isinstance(value, float) and math.isfinite(value) and value > 0), value
            assert isinstance(trials.duration_label(value), str)


# ------------------------------------------------------------------------------------------------ the list


@dataclass(frozen=True)
class Target:
    name: str
    what: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    weight: float = 1.0  # share of a benchmark budget, relative to the others


TARGETS: dict[str, Target] = {
    target.name: target
    for target in [
        Target("twilio", "Twilio Media Streams session", twilio_sessions(), check_twilio),
        Target("twilio.signature", "X-Twilio-Signature on any URL", twilio_upgrades(), check_twilio_upgrade),
        Target("native", "vpmon native protocol session", native_sessions(), check_native),
        Target("audiohook", "Genesys AudioHook session", audiohook_sessions(), check_audiohook),
        Target(
            "audiohook.upgrade",
            "AudioHook headers and signature",
            audiohook_upgrades(),
            check_audiohook_upgrade,
        ),
        Target("whip.offer", "WHIP request ids and SDP offer", whip_requests(), check_whip_request),
        Target("whip.call", "WHIP decoded frames and RTP clock", whip_calls(), check_whip_call),
        Target("audio.g711_pcm16", "μ-law / A-law / PCM16 decoders", CODEC_INPUTS, check_codecs),
        Target("audio.file", "uploaded audio files (libsndfile)", audio_files(), check_audio_file),
        Target(
            "stream.agent_audio",
            "live decode, resample, level, VAD",
            agent_streams(),
            check_agent_stream,
            0.6,
        ),
        Target("vad", "VAD segmenter, any chunking", vad_inputs(), check_vad, 0.6),
        Target("model.torch_weights", "restricted .pt loader (zip, legacy)", checkpoints(), check_checkpoint),
        Target("model.spec", "model spec .toml loader", spec_files(), check_spec),
        Target("trials", "trials file and durations", trials_files(), check_trials),
    ]
}
