"""The narrowband stage on real telephone speech (the dev voices): what it adds, where, and only when."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from verifier.audio import decode_mulaw, encode_mulaw, read_audio, resample, to_pcm16
from verifier.decision import LIVE_VAD
from verifier.embedder import Embedder
from verifier.enrolment import EnrolmentPolicy, Recording, enrol
from verifier.features import kaldi_fbank
from verifier.models.registry import CAMPPLUS
from verifier.narrowband import EMPTY_BAND_HZ, FILL_LEVEL_DBFS, band_noise, fill_windows, is_narrowband
from verifier.pipeline import VadConfig, load_speech, load_windows, prepare_speech, speech_windows
from verifier.stream import AgentAudio, Encoding
from verifier.vad import SpeechWindow

RATE = 16000


def band_power(samples: np.ndarray, low_hz: float, high_hz: float) -> float:
    """Mean power of ``samples`` between ``low_hz`` and ``high_hz`` (Parseval over the rfft bins)."""
    spectrum = np.fft.rfft(samples.astype(np.float64))
    freqs = np.fft.rfftfreq(len(samples), 1 / RATE)
    in_band = (freqs >= low_hz) & (freqs < high_hz)
    weights = np.where((freqs == 0) | (freqs == RATE / 2), 1.0, 2.0)
    return float(np.sum(weights[in_band] * np.abs(spectrum[in_band]) ** 2) / len(samples) ** 2)


@pytest.fixture(scope="module")
def phone_windows(telephone_devset: Path) -> list[SpeechWindow]:
    """VAD windows of two telephone recordings (8 kHz μ-law, resampled and level-normalised)."""
    paths = sorted((telephone_devset / "wav" / "tuxpaint_fr").glob("*.wav"))[:2]
    windows = [w for path in paths for w in speech_windows(load_speech(path))]
    assert len(windows) >= 2
    return windows


def test_the_fill_lies_above_the_line_band_at_its_level(phone_windows: list[SpeechWindow]) -> None:
    for window, filled in zip(phone_windows, fill_windows(phone_windows, 8000), strict=True):
        added = filled.samples - window.samples
        assert band_power(added, 0, EMPTY_BAND_HZ - 100) < 1e-6 * band_power(added, EMPTY_BAND_HZ, RATE / 2)
        level_dbfs = 10 * np.log10(np.mean(added.astype(np.float64) ** 2))
        assert level_dbfs == pytest.approx(FILL_LEVEL_DBFS, abs=0.1)
        # The line's own speech band is left as it was.
        assert band_power(filled.samples, 300, 3400) == pytest.approx(band_power(window.samples, 300, 3400))
        assert (filled.start, filled.end, filled.speech_seconds) == (
            window.start,
            window.end,
            window.speech_seconds,
        )


def test_the_empty_band_was_near_silent_and_gets_a_steady_floor(phone_windows: list[SpeechWindow]) -> None:
    """Why the stage exists: above 4 kHz the resampled phone audio is far quieter than the fill, and its
    log-mel bins swing more from frame to frame than with the fill."""
    centres = 700 * np.expm1(
        np.linspace(1127 * np.log1p(20 / 700), 1127 * np.log1p(8000 / 700), 82)[1:-1] / 1127
    )
    high_bins = centres > EMPTY_BAND_HZ + 200
    for window, filled in zip(phone_windows, fill_windows(phone_windows, 8000), strict=True):
        empty_band = band_power(window.samples, EMPTY_BAND_HZ + 200, RATE / 2)
        assert 10 * np.log10(empty_band) < FILL_LEVEL_DBFS - 10
        before = kaldi_fbank(window.samples, CAMPPLUS.frontend)[:, high_bins]
        after = kaldi_fbank(filled.samples, CAMPPLUS.frontend)[:, high_bins]
        assert after.std(axis=0).mean() < before.std(axis=0).mean()


def test_wideband_audio_is_left_alone(phone_windows: list[SpeechWindow]) -> None:
    for rate in (16000, 44100, 48000):
        assert fill_windows(phone_windows, rate) is phone_windows
    assert is_narrowband(8000) and is_narrowband(6000) and not is_narrowband(11025)


def test_a_window_always_gives_the_same_embedding(
    campplus: Embedder, phone_windows: list[SpeechWindow]
) -> None:
    first = campplus.embed_batch([w.samples for w in fill_windows(phone_windows, 8000)])
    again = campplus.embed_batch([w.samples for w in fill_windows(phone_windows, 8000)])
    plain = campplus.embed_batch([w.samples for w in phone_windows])
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, plain)  # the model does see the fill


def test_too_short_for_the_band_gives_no_noise() -> None:
    assert not band_noise(1, FILL_LEVEL_DBFS).any()
    assert len(band_noise(0, FILL_LEVEL_DBFS)) == 0


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        is_narrowband(0)


# --- wired in: every path that makes windows to embed -----------------------------------------------
def same_windows(got: list[SpeechWindow], expected: list[SpeechWindow]) -> bool:
    return [(w.start, w.end) for w in got] == [(w.start, w.end) for w in expected] and all(
        np.array_equal(a.samples, b.samples) for a, b in zip(got, expected, strict=True)
    )


@pytest.fixture(scope="module")
def phone_recording(telephone_devset: Path) -> Path:
    return sorted((telephone_devset / "wav" / "tuxpaint_fr").glob("*.wav"))[0]


def test_files_are_filled_after_the_vad_at_their_own_rate(phone_recording: Path) -> None:
    vad_only = speech_windows(load_speech(phone_recording))
    assert same_windows(load_windows(phone_recording), fill_windows(vad_only, 8000))
    assert same_windows(load_windows(phone_recording, VadConfig(narrowband_fill_dbfs=None)), vad_only)
    # The same recording arriving at 16 kHz is wideband by its rate: left as the VAD cut it.
    audio = read_audio(phone_recording)
    wide = prepare_speech(resample(audio.samples, 8000, RATE), RATE)
    assert same_windows(speech_windows(wide, VadConfig(), RATE), speech_windows(wide))


def test_live_calls_fill_a_narrowband_line_only(phone_recording: Path) -> None:
    samples = read_audio(phone_recording).samples

    def stream(encoding: Encoding, rate: int, payload: bytes, fill: float | None) -> list[SpeechWindow]:
        agent = AgentAudio(encoding, rate, vad=replace(LIVE_VAD, narrowband_fill_dbfs=fill))
        return [w for i in range(0, len(payload), 320) for w in agent.feed(payload[i : i + 320])] + (
            agent.flush()
        )

    mulaw = encode_mulaw(samples)
    plain = stream("mulaw", 8000, mulaw, None)
    assert plain
    assert same_windows(stream("mulaw", 8000, mulaw, FILL_LEVEL_DBFS), fill_windows(plain, 8000))
    pcm16k = to_pcm16(resample(decode_mulaw(mulaw), 8000, RATE)).tobytes()
    assert same_windows(stream("pcm16", RATE, pcm16k, FILL_LEVEL_DBFS), stream("pcm16", RATE, pcm16k, None))


def test_a_voiceprint_records_the_front_end_it_was_made_with(
    campplus: Embedder, telephone_devset: Path
) -> None:
    audio = read_audio(telephone_devset / "wav" / "tuxpaint_fr" / "04.wav")
    policy = EnrolmentPolicy(min_net_speech=2.0)
    narrow = enrol(campplus, [Recording("phone.wav", audio.samples, 8000)], policy).quality()
    assert narrow["min_sample_rate_hz"] == 8000 and narrow["narrowband_fill_dbfs"] == FILL_LEVEL_DBFS
    off = VadConfig(narrowband_fill_dbfs=None)
    unfilled = enrol(campplus, [Recording("phone.wav", audio.samples, 8000)], policy, vad=off).quality()
    assert "narrowband_fill_dbfs" not in unfilled
    wide = Recording("wide.wav", resample(audio.samples, 8000, RATE), RATE)
    assert "narrowband_fill_dbfs" not in enrol(campplus, [wide], policy).quality()
