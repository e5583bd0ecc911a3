"""CallSession without sockets: agent binding, the unbound buffer, transfers and the notices."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from streamer.protocols.events import AudioChunk, CallStarted
from streamer.session import CallSession, CallState
from streamer.store import Voiceprint
from verifier.calibration import packaged_calibration
from verifier.decision import LIVE_VAD
from verifier.vad import SpeechWindow

MODEL = "campplus-zh-en-16k"
RNG = np.random.default_rng(7)


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


AGENT = unit(RNG.standard_normal(192))
OTHER = unit(RNG.standard_normal(192))


def near(v: np.ndarray) -> np.ndarray:
    return unit(v + 0.25 * unit(RNG.standard_normal(192)))


def window(i: int, seconds: float = 3.0) -> SpeechWindow:
    return SpeechWindow(np.zeros(16000, np.float32), 4.0 * i, 4.0 * i + seconds, seconds)


def session(**kwargs) -> CallSession:
    s = CallSession("acme", "call-1", "native", MODEL, packaged_calibration(MODEL), **kwargs)
    s.start(CallStarted("call-1", "pcm16", 8000, 1))
    return s


def voiceprint(vector: np.ndarray, agent: str = "a1", model: str = MODEL) -> Voiceprint:
    return Voiceprint("acme", agent, vector, model, site="lisbon")


def test_unbound_speech_is_buffered_then_judged_for_the_first_agent() -> None:
    s = session()
    outputs = [o for i in range(3) for o in s.observe(window(i), near(AGENT))]
    assert [o.data["state"] for o in outputs] == ["agent_unknown"] * 3
    assert s.state is CallState.AGENT_UNKNOWN
    bound = s.bind("a1", voiceprint(AGENT))
    verdicts = [o for o in bound if o.kind == "verdict"]
    assert len(verdicts) == 3 and verdicts[-1].data["state"] == "verified"
    assert bound[0].kind == "call" and bound[0].data["agent_id"] == "a1" and bound[0].data["site"] == "lisbon"


def test_unbound_buffer_is_bounded() -> None:
    s = session(unbound_speech_seconds=6.0)
    for i in range(10):
        s.observe(window(i), near(AGENT))
    replayed = [o for o in s.bind("a1", voiceprint(AGENT)) if o.kind == "verdict"]
    assert len(replayed) == 2  # only the last 6 s of speech were kept


def test_transfer_starts_new_evidence_for_the_new_agent() -> None:
    s = session()
    s.bind("a1", voiceprint(AGENT))
    for i in range(3):
        s.observe(window(i), near(AGENT))
    assert s.state is CallState.VERIFIED
    s.bind("a2", voiceprint(OTHER, "a2"))
    assert s.state is CallState.WARMING_UP
    outputs = [o for i in range(3, 6) for o in s.observe(window(i), near(OTHER))]
    assert all(o.kind == "verdict" for o in outputs) and outputs[-1].data["state"] == "verified"
    assert outputs[-1].data["agent_id"] == "a2"


def test_takeover_alert_carries_ids_and_evidence() -> None:
    s = session()
    s.bind("a1", voiceprint(AGENT))
    for i in range(3):
        s.observe(window(i), near(AGENT))
    alerts = [o for i in range(3, 9) for o in s.observe(window(i), near(OTHER)) if o.kind == "alert"]
    assert len(alerts) == 1
    alert = alerts[0].data
    assert (alert["tenant"], alert["call_id"], alert["agent_id"], alert["kind"]) == (
        "acme",
        "call-1",
        "a1",
        "takeover",
    )
    assert alert["alert_id"] == "call-1:1" and alert["impostor_since"] >= 12.0
    assert {"score", "threshold", "llr", "net_speech_seconds", "media_start", "media_end", "model_id"} <= set(
        alert
    )
    assert s.describe()["alerts"] == 1 and s.state is CallState.MISMATCH


def test_not_enrolled_and_other_model_are_distinct_notices() -> None:
    s = session()
    (notice,) = s.bind("ghost", None)
    assert (notice.kind, notice.data["kind"]) == ("notice", "agent_not_enrolled")
    assert s.state is CallState.NOT_ENROLLED and s.observe(window(0), near(AGENT)) == []

    s = session()
    (notice,) = s.bind("a1", voiceprint(AGENT, model="ge2e-resemblyzer"))
    assert (notice.kind, notice.data["kind"]) == ("notice", "model_mismatch")
    assert "vpmon reembed" in notice.data["message"] and s.state is CallState.MODEL_MISMATCH


def test_only_agent_chunks_are_heard_and_ended_calls_hear_nothing() -> None:
    s = session()
    loud = (np.sin(np.arange(8000) / 3) * 8000).astype("<i2").tobytes()
    assert s.feed(AudioChunk(loud, is_agent=False)) == []
    assert s.audio is not None and s.audio.seconds_received == 0
    s.feed(AudioChunk(loud))
    assert s.audio.seconds_received == 1.0  # 8000 samples at 8 kHz
    s.end("stop")
    assert s.feed(AudioChunk(loud)) == [] and s.describe()["state"] == "ended"


def test_a_voiceprint_of_another_front_end_is_verified_with_a_notice() -> None:
    filled = {"min_sample_rate_hz": 8000.0, "narrowband_fill_dbfs": LIVE_VAD.narrowband_fill_dbfs}
    wideband = {"min_sample_rate_hz": 16000.0}

    def notices(quality: dict[str, float], **kwargs) -> tuple[list[str], CallSession]:
        s = session(**kwargs)
        vp = replace(voiceprint(AGENT), quality=quality)
        return [o.data["kind"] for o in s.bind("a1", vp) if o.kind == "notice"], s

    # Enrolled before voiceprints recorded their front end: maybe telephone audio without the fill.
    kinds, s = notices({})
    assert kinds == ["voiceprint_front_end"] and s.state is CallState.WARMING_UP
    outputs = [o for i in range(3) for o in s.observe(window(i), near(AGENT))]
    assert outputs[-1].data["state"] == "verified"
    # Made with this front end: telephone recordings filled at its level, or wideband ones (never filled).
    assert notices(filled)[0] == [] and notices(wideband)[0] == []
    # A gateway running without the fill: the filled voiceprint is the odd one, the old one is not.
    without = replace(LIVE_VAD, narrowband_fill_dbfs=None)
    assert notices(filled, vad=without)[0] == ["voiceprint_front_end"]
    assert notices({}, vad=without)[0] == [] and notices(wideband, vad=without)[0] == []
