"""The live chain's pure stages: AgentAudio (encoded chunks → windows) and the decision state machine,
on real speech and the real model where it matters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from verifier.audio import encode_mulaw, read_audio, resample, to_pcm16
from verifier.calibration import packaged_calibration
from verifier.decision import CallDecision, DecisionPolicy, Evidence, State
from verifier.embedder import Embedder
from verifier.errors import AudioError
from verifier.stream import AgentAudio

MODEL = "campplus-zh-en-16k"


def speaker_audio(devset: Path, speaker: str, count: int) -> np.ndarray:
    """``count`` utterances of one speaker, joined with 1 s of silence (8 kHz float32)."""
    parts = []
    for path in sorted((devset / "wav" / speaker).glob("*.wav"))[:count]:
        audio = read_audio(path)
        parts += [resample(audio.samples, audio.sample_rate, 8000), np.zeros(8000, np.float32)]
    return np.concatenate(parts)


def windows_of(stream: AgentAudio, payload: bytes, chunk: int) -> list:
    windows = []
    for start in range(0, len(payload), chunk):
        windows += stream.feed(payload[start : start + chunk])
    return windows + stream.flush()


def test_chunking_does_not_change_windows(telephone_devset: Path) -> None:
    payload = encode_mulaw(speaker_audio(telephone_devset, "tuxpaint_ca", 3))
    as_twilio = windows_of(AgentAudio("mulaw", 8000), payload, 160)  # 20 ms frames
    in_odd_chunks = windows_of(AgentAudio("mulaw", 8000), payload, 1234)
    assert len(as_twilio) >= 3
    assert [(w.start, w.end) for w in as_twilio] == [(w.start, w.end) for w in in_odd_chunks]
    for a, b in zip(as_twilio, in_odd_chunks, strict=True):
        np.testing.assert_allclose(a.samples, b.samples, atol=1e-6)
    assert all(0.5 <= w.duration <= 3.0 + 1e-6 for w in as_twilio)


def test_stereo_listens_to_the_agent_channel_only(telephone_devset: Path) -> None:
    agent = speaker_audio(telephone_devset, "tuxpaint_ca", 2)
    silence = np.zeros_like(agent)
    for agent_channel, pair in ((1, (silence, agent)), (0, (agent, silence))):
        interleaved = np.stack(pair, axis=1).reshape(-1)
        stream = AgentAudio("pcm16", 8000, channels=2, agent_channel=agent_channel)
        windows = windows_of(stream, to_pcm16(interleaved).tobytes(), 640)
        assert windows, f"no speech heard on channel {agent_channel}"
        assert stream.seconds_received == pytest.approx(len(agent) / 8000)
    # The customer's channel alone (agent channel silent) gives no agent windows.
    stream = AgentAudio("pcm16", 8000, channels=2, agent_channel=0)
    customer_only = np.stack((silence, agent), axis=1).reshape(-1)
    assert windows_of(stream, to_pcm16(customer_only).tobytes(), 640) == []


def test_quiet_lines_are_levelled_for_the_vad(telephone_devset: Path) -> None:
    speech = speaker_audio(telephone_devset, "tuxpaint_ro", 3)
    loud = windows_of(AgentAudio("mulaw", 8000), encode_mulaw(speech), 160)
    quiet = windows_of(AgentAudio("mulaw", 8000), encode_mulaw(speech * 10 ** (-25 / 20)), 160)
    assert sum(w.speech_seconds for w in quiet) >= 0.9 * sum(w.speech_seconds for w in loud)


def test_bad_formats_are_refused() -> None:
    with pytest.raises(AudioError, match="agent channel"):
        AgentAudio("pcm16", 8000, channels=2)
    with pytest.raises(AudioError, match="does not exist"):
        AgentAudio("mulaw", 8000, channels=2, agent_channel=2)
    with pytest.raises(AudioError, match="encoding"):
        AgentAudio("opus", 48000)  # type: ignore[arg-type]
    with pytest.raises(AudioError, match="channels"):
        AgentAudio("mulaw", 8000, channels=2, agent_channel=0).feed(b"\x00\x01\x02")


# --- the decision ------------------------------------------------------------------------------------
def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_evidence_keeps_the_last_seconds_of_speech() -> None:
    evidence = Evidence(span_seconds=6.0)
    for i in range(5):
        evidence.add(unit(np.eye(4)[i % 4]), 2.0, 3.0 * i, 3.0 * i + 2.5)
    assert evidence.net_speech == pytest.approx(6.0)
    assert evidence.span == (6.0, 14.5)


@pytest.fixture(scope="module")
def real_windows(campplus: Embedder, telephone_devset: Path) -> dict[str, np.ndarray]:
    """Window embeddings of real speech: an enrolled agent (voiceprint + unseen windows) and an impostor."""
    result = {}
    for name, speaker in (("agent", "tuxpaint_ca"), ("impostor", "tuxpaint_ro")):
        stream = AgentAudio("mulaw", 8000)
        audio = speaker_audio(telephone_devset, speaker, 10)
        windows = windows_of(stream, encode_mulaw(audio), 160)
        result[name] = campplus.embed_batch([w.samples for w in windows])
        result[name + "_seconds"] = np.array([w.speech_seconds for w in windows])
    return result


def run(decision: CallDecision, embeddings: np.ndarray, seconds: np.ndarray, t0: float = 0.0):
    verdicts, alerts = [], []
    t = t0
    for embedding, speech in zip(embeddings, seconds, strict=True):
        verdict, alert = decision.observe(embedding, float(speech), t, t + speech)
        verdicts.append(verdict)
        if alert:
            alerts.append(alert)
        t += speech + 0.5
    return verdicts, alerts, t


def test_genuine_call_then_takeover_raises_exactly_one_alert(real_windows: dict[str, np.ndarray]) -> None:
    agent, agent_s = real_windows["agent"], real_windows["agent_seconds"]
    enrol_count = len(agent) // 2
    voiceprint = unit((agent[:enrol_count] * agent_s[:enrol_count, None]).sum(axis=0))
    decision = CallDecision(voiceprint, packaged_calibration(MODEL), MODEL, DecisionPolicy())

    genuine, alerts, t = run(decision, agent[enrol_count:], agent_s[enrol_count:])
    assert alerts == []
    speech_so_far = np.cumsum(agent_s[enrol_count:])
    assert all(
        (v.state is State.WARMING_UP) == (s < 3.0) for v, s in zip(genuine, speech_so_far, strict=True)
    )
    assert genuine[-1].state is State.VERIFIED
    assert all(v.model_id == MODEL and v.media_end >= v.media_start for v in genuine)

    taken, alerts, _ = run(decision, real_windows["impostor"], real_windows["impostor_seconds"], t)
    assert len(alerts) == 1, [v.state for v in taken]
    assert alerts[0].impostor_since >= t
    assert taken[-1].state is State.MISMATCH
    assert alerts[0].verdict.llr < DecisionPolicy().alert_llr


def test_one_bad_window_never_alerts() -> None:
    """Confirmations: a single window below the alert line moves to SUSPECT, the next good one back."""
    rng = np.random.default_rng(1)
    voiceprint = unit(rng.standard_normal(192))
    calibration = packaged_calibration(MODEL)
    policy = DecisionPolicy(evidence_seconds=2.0, min_net_speech=2.0, confirmations=2)
    decision = CallDecision(voiceprint, calibration, MODEL, policy)
    near = unit(voiceprint + 0.3 * unit(rng.standard_normal(192)))
    far = unit(rng.standard_normal(192))
    states = [
        decision.observe(e, 2.0, i * 3.0, i * 3.0 + 2.0)[0].state for i, e in enumerate([near, far, near])
    ]
    assert states == [State.VERIFIED, State.SUSPECT, State.VERIFIED]
    second = [decision.observe(far, 2.0, 9.0 + i * 3, 11.0 + i * 3) for i in range(3)]
    assert [v.state for v, _ in second] == [State.SUSPECT, State.MISMATCH, State.MISMATCH]
    assert [a is not None for _, a in second] == [False, True, False]


def test_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="alert_llr"):
        DecisionPolicy(match_llr=-1.0, alert_llr=0.0)
