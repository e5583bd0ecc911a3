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
from verifier.pipeline import VadConfig
from verifier.stream import AgentAudio, FrameHistory, percentile

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


def test_the_running_levels_percentile_is_numpys_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    for _ in range(2000):
        values = rng.random(rng.integers(1, 600)) ** rng.integers(1, 6)
        if rng.random() < 0.3:
            values = np.round(values, 2)  # ties
        for q in (0, 10, 50, 95, 100):
            assert percentile(values, q) == np.percentile(values, q)


def test_frame_history_keeps_the_newest_in_order() -> None:
    history = FrameHistory(5)
    assert len(history.view()) == 0
    history.extend(np.arange(3.0))
    assert history.view().tolist() == [0, 1, 2]
    history.extend(np.arange(3.0, 7.0))
    assert history.view().tolist() == [2, 3, 4, 5, 6]
    history.extend(np.arange(7.0, 19.0))  # more than it holds at once
    assert history.view().tolist() == [14, 15, 16, 17, 18]


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


@pytest.fixture(scope="module")
def others_mean(campplus: Embedder, telephone_devset: Path) -> np.ndarray:
    """The mean of eight other speakers' voiceprints (neither the agent's nor the impostor's), as the
    server centres an agent's scores on the tenant's other voiceprints."""
    voiceprints = []
    for speaker in ("tuxpaint_fr", "tuxpaint_ru", "tuxpaint_bg", "tuxpaint_es", "tuxpaint_be",
                    "tuxpaint_el", "fillets_cs_big", "warzone_narrator"):  # fmt: skip
        windows = windows_of(
            AgentAudio("mulaw", 8000), encode_mulaw(speaker_audio(telephone_devset, speaker, 4)), 160
        )
        voiceprints.append(unit(campplus.embed_batch([w.samples for w in windows]).mean(axis=0)))
    return np.mean(voiceprints, axis=0)


@pytest.mark.parametrize("centred", [False, True], ids=["raw cosines", "centred on other voiceprints"])
def test_genuine_call_then_takeover_raises_exactly_one_alert(
    real_windows: dict[str, np.ndarray], others_mean: np.ndarray, centred: bool
) -> None:
    agent, agent_s = real_windows["agent"], real_windows["agent_seconds"]
    enrol_count = len(agent) // 2
    voiceprint = unit((agent[:enrol_count] * agent_s[:enrol_count, None]).sum(axis=0))
    mean = others_mean if centred else None
    decision = CallDecision(voiceprint, packaged_calibration(MODEL), MODEL, DecisionPolicy(), mean)

    genuine, alerts, t = run(decision, agent[enrol_count:], agent_s[enrol_count:])
    assert alerts == []
    speech_so_far = np.cumsum(agent_s[enrol_count:])
    assert all(
        (v.state is State.WARMING_UP) == (s < 3.0) for v, s in zip(genuine, speech_so_far, strict=True)
    )
    assert genuine[-1].state is State.VERIFIED
    assert all(v.model_id == MODEL and v.media_end >= v.media_start for v in genuine)
    assert all(v.centred is centred and v.to_dict()["centred"] is centred for v in genuine)

    taken, alerts, _ = run(decision, real_windows["impostor"], real_windows["impostor_seconds"], t)
    assert len(alerts) == 1, [v.state for v in taken]
    assert alerts[0].impostor_since >= t
    assert taken[-1].state is State.MISMATCH
    assert alerts[0].verdict.impostor_evidence >= DecisionPolicy().alert_evidence
    # The alert names where the run of windows against the agent began: the impostor's first windows.
    first_against = next(v for v in taken if v.impostor_evidence > 0)
    assert alerts[0].impostor_since <= first_against.media_end


def synthetic_decision(**policy: float) -> tuple[CallDecision, np.ndarray, np.ndarray]:
    """A decision with a random voiceprint, a window near it (the agent) and one far from it."""
    rng = np.random.default_rng(1)
    voiceprint = unit(rng.standard_normal(192))
    defaults = {
        "evidence_seconds": 2.0,
        "min_net_speech": 2.0,
        "window_llr_limit": 4.0,
        "allowance": 0.0,
        "alert_evidence": 6.0,
    }
    decision = CallDecision(
        voiceprint, packaged_calibration(MODEL), MODEL, DecisionPolicy(**{**defaults, **policy})
    )
    near = unit(voiceprint + 0.3 * unit(rng.standard_normal(192)))
    far = unit(rng.standard_normal(192))
    return decision, near, far


def feed(decision: CallDecision, windows: list[np.ndarray], t0: float = 0.0):
    return [decision.observe(e, 2.0, t0 + 3.0 * i, t0 + 3.0 * i + 2.0) for i, e in enumerate(windows)]


def test_one_bad_window_never_alerts() -> None:
    """A window counts at most window_llr_limit; the alert needs more than one window's worth."""
    decision, near, far = synthetic_decision()
    out = feed(decision, [near, far, near])
    assert [v.state for v, _ in out] == [State.VERIFIED, State.SUSPECT, State.VERIFIED]
    assert out[1][0].window_llr < -4.0 and out[1][0].impostor_evidence == pytest.approx(4.0)
    assert out[2][0].impostor_evidence == 0.0  # the agent's next window paid it back
    second = feed(decision, [far, far, far], t0=9.0)
    assert [v.state for v, _ in second] == [State.SUSPECT, State.MISMATCH, State.MISMATCH]
    assert [a is not None for _, a in second] == [False, True, False]
    assert second[1][1].impostor_since == 9.0  # the first window of the run against the agent


def test_recovery_then_a_new_takeover_alerts_again_after_the_cooldown() -> None:
    decision, near, far = synthetic_decision(cooldown_seconds=10.0)
    out = feed(decision, [near, far, far, far])
    assert sum(a is not None for _, a in out) == 1
    back = feed(decision, [near], t0=12.0)
    assert back[0][0].state is State.VERIFIED and back[0][0].impostor_evidence == 0.0
    # 2 s of speech since the alert: a second takeover within the cooldown is SUSPECT, not paged.
    soon = feed(decision, [far, far], t0=15.0)
    assert [v.state for v, _ in soon] == [State.SUSPECT, State.SUSPECT]
    assert all(a is None for _, a in soon)
    later = feed(decision, [near, near, far, far], t0=21.0)  # 10 s of speech since the alert
    assert [a is not None for _, a in later] == [False, False, False, True]


def test_windows_of_line_noise_are_measured_and_can_be_gated(telephone_devset: Path) -> None:
    """Every live window carries its speech level over the line's noise floor; min_window_snr_db drops
    windows below it (counted), before any embedding is spent on them."""
    rng = np.random.default_rng(3)
    speech = speaker_audio(telephone_devset, "tuxpaint_ca", 4)
    noise = (0.01 * rng.standard_normal(8000 * 8)).astype(np.float32)  # 8 s of hiss, about -40 dBFS
    line = np.concatenate([speech[: len(speech) // 2], noise, speech[len(speech) // 2 :]])
    line = line + (0.01 * rng.standard_normal(len(line))).astype(np.float32)
    payload = encode_mulaw(line)
    measured = windows_of(AgentAudio("mulaw", 8000), payload, 160)
    assert measured and all(w.snr_db is not None for w in measured[1:])
    gate = sorted(w.snr_db for w in measured if w.snr_db is not None)[len(measured) // 2]
    stream = AgentAudio("mulaw", 8000, vad=VadConfig(min_window_snr_db=gate))
    kept = windows_of(stream, payload, 160)
    assert [w.start for w in kept] == [w.start for w in measured if w.snr_db is None or w.snr_db >= gate]
    assert stream.windows_too_noisy == len(measured) - len(kept) > 0


def test_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="one window"):
        DecisionPolicy(window_llr_limit=6.0, allowance=0.0, alert_evidence=6.0)
    with pytest.raises(ValueError, match="allowance"):
        DecisionPolicy(allowance=-1.0)
