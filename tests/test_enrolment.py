"""Enrolment from real recorded speech: the voiceprint, every quality gate, and the SNR estimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from verifier.audio import active_level_dbfs, read_audio
from verifier.embedder import Embedder, l2_normalise
from verifier.enrolment import (
    Enrolment,
    EnrolmentError,
    EnrolmentPolicy,
    Recording,
    check_recording,
    enrol,
    estimate_snr,
    estimate_snr_db,
)
from verifier.pipeline import VadConfig, prepare_speech, speech_windows
from verifier.scoring import cosine

pytestmark = pytest.mark.devset

SPEAKER_A = "tuxpaint_ca"  # a man speaking Catalan
SPEAKER_B = "tuxpaint_es"  # a woman speaking Spanish


@pytest.fixture(scope="module")
def clean_devset() -> Path:
    """The 16 kHz clean dev set: the same utterances as the telephone one, without channel or noise."""
    from devset import devset_dir

    return devset_dir("clean")


def recording(devset: Path, name: str) -> Recording:
    """A dev-set utterance as decoded audio, named "speaker/NN.wav" (file names repeat across speakers)."""
    audio = read_audio(devset / "wav" / name)
    return Recording(name, audio.samples, audio.sample_rate)


def altered(original: Recording, samples: np.ndarray) -> Recording:
    return Recording(original.name, samples.astype(np.float32), original.sample_rate)


def refused(excinfo: pytest.ExceptionInfo[EnrolmentError], reason: str, recording: str | None) -> str:
    """Checks the error's reason and recording, and that its message is one line naming the recording."""
    error = excinfo.value
    message = str(error)
    assert error.reason == reason, message
    assert error.recording == recording, message
    assert "\n" not in message
    if recording is not None:
        assert repr(recording) in message
    return message


# --- a good enrolment -----------------------------------------------------------------------------
def test_enrolment_of_one_speaker_is_the_speech_weighted_mean_of_its_windows(
    campplus: Embedder, telephone_devset: Path
) -> None:
    recordings = [recording(telephone_devset, f"{SPEAKER_A}/0{i}.wav") for i in (1, 2, 3, 4)]
    enrolment = enrol(campplus, recordings)

    # Recompute from the pipeline stages by hand: every window of every recording (through the front end
    # for its sample rate: these are 8 kHz, so filled), weighted by speech.
    windows = [
        w
        for r in recordings
        for w in speech_windows(prepare_speech(r.samples, r.sample_rate), source_rate=r.sample_rate)
    ]
    embeddings = campplus.embed_batch([w.samples for w in windows])
    seconds = np.array([w.speech_seconds for w in windows])
    expected = l2_normalise((l2_normalise(embeddings) * seconds[:, None]).sum(axis=0))
    assert enrolment.vector.dtype == np.float32
    assert np.linalg.norm(enrolment.vector) == pytest.approx(1.0, abs=1e-5)
    assert enrolment.vector == pytest.approx(expected, abs=1e-5)
    assert enrolment.windows == len(windows)
    assert enrolment.net_speech_seconds == pytest.approx(seconds.sum())
    assert enrolment.model_id == campplus.model_id

    reports = enrolment.recordings
    assert [r.name for r in reports] == [r.name for r in recordings]
    assert sum(r.windows for r in reports) == len(windows)
    assert sum(r.net_speech_seconds for r in reports) == pytest.approx(enrolment.net_speech_seconds)
    for report in reports:
        assert report.consistency is not None and report.consistency_threshold is not None
        assert report.consistency >= report.consistency_threshold
        assert report.snr_db >= EnrolmentPolicy().min_snr_db
        assert -50 < report.level_dbfs < -10
        assert report.clipped_fraction == 0.0

    quality = enrolment.quality()
    assert quality["min_snr_db"] == pytest.approx(min(r.snr_db for r in reports), abs=0.05)
    assert quality["min_level_dbfs"] == pytest.approx(min(r.level_dbfs for r in reports), abs=0.05)
    assert quality["min_consistency"] == pytest.approx(min(r.consistency for r in reports), abs=1e-4)
    assert quality["max_clipped_fraction"] == 0.0
    assert quality["net_speech_seconds"] == pytest.approx(enrolment.net_speech_seconds, abs=0.01)
    # The front end it was made with: telephone recordings, filled at the default level.
    assert quality["min_sample_rate_hz"] == 8000
    assert quality["narrowband_fill_dbfs"] == VadConfig().narrowband_fill_dbfs

    # The voiceprint knows its speaker: an utterance it has not heard scores higher than someone else's.
    same = campplus.embed_batch([prepare_speech(*_audio(telephone_devset, f"{SPEAKER_A}/09.wav"))])[0]
    other = campplus.embed_batch([prepare_speech(*_audio(telephone_devset, f"{SPEAKER_B}/09.wav"))])[0]
    assert cosine(enrolment.vector, same) > cosine(enrolment.vector, other) + 0.2


def _audio(devset: Path, name: str) -> tuple[np.ndarray, int]:
    audio = read_audio(devset / "wav" / name)
    return audio.samples, audio.sample_rate


def test_one_recording_has_no_consistency_figure(campplus: Embedder, telephone_devset: Path) -> None:
    long_one = recording(telephone_devset, f"{SPEAKER_A}/04.wav")
    enrolment = enrol(campplus, [long_one], EnrolmentPolicy(min_net_speech=4.0))
    assert isinstance(enrolment, Enrolment)
    assert enrolment.recordings[0].consistency is None
    assert "min_consistency" not in enrolment.quality()


# --- the gates --------------------------------------------------------------------------------------
def test_too_little_speech_in_all(campplus: Embedder, telephone_devset: Path) -> None:
    one = recording(telephone_devset, f"{SPEAKER_A}/01.wav")  # about 4.5 s of speech
    with pytest.raises(EnrolmentError) as excinfo:
        enrol(campplus, [one])
    message = refused(excinfo, "too_little_speech", None)
    assert excinfo.value.limit == EnrolmentPolicy().min_net_speech
    assert 3.0 < excinfo.value.measured < excinfo.value.limit
    assert f"{int(excinfo.value.measured * 10) / 10:.1f} s" in message
    assert f"{excinfo.value.limit:.1f} s" in message


def test_too_little_speech_in_one_recording_names_it(campplus: Embedder, telephone_devset: Path) -> None:
    names = [f"{SPEAKER_A}/01.wav", f"{SPEAKER_A}/02.wav", f"{SPEAKER_A}/03.wav"]  # 4.5, 2.4, 5.4 s
    policy = EnrolmentPolicy(min_recording_speech=3.0)
    with pytest.raises(EnrolmentError) as excinfo:
        enrol(campplus, [recording(telephone_devset, n) for n in names], policy)
    refused(excinfo, "too_little_speech", names[1])
    assert excinfo.value.measured < 3.0 == excinfo.value.limit


def test_clipped_recording(campplus: Embedder, telephone_devset: Path, clean_devset: Path) -> None:
    good = [recording(telephone_devset, f"{SPEAKER_A}/0{i}.wav") for i in (1, 2, 3)]
    original = recording(clean_devset, f"{SPEAKER_A}/04.wav")
    # +20 dB drives the loud half of the speech into the rails: about 4 % of samples at full scale.
    clipped = altered(original, np.clip(original.samples * 10.0, -1.0, 1.0))
    with pytest.raises(EnrolmentError) as excinfo:
        enrol(campplus, [*good, clipped])
    message = refused(excinfo, "clipped", original.name)
    assert excinfo.value.measured > 0.02 and excinfo.value.limit == 0.01
    assert "gain" in message
    # A few clipped peaks (+12 dB: about 0.2 % of samples) are not worth a refusal.
    mild = altered(original, np.clip(original.samples * 10 ** (12 / 20), -1.0, 1.0))
    assert 0 < check_recording(mild).level.clipped_fraction < 0.01


def test_too_quiet_recording(clean_devset: Path) -> None:
    original = recording(clean_devset, f"{SPEAKER_A}/04.wav")
    gain = 10 ** ((-60.0 - active_level_dbfs(original.samples)) / 20)
    quiet = altered(original, original.samples * gain)
    with pytest.raises(EnrolmentError) as excinfo:
        check_recording(quiet)
    refused(excinfo, "too_quiet", original.name)
    # Within a dB: frames under -70 dBFS never count as speech, which lifts the level of very quiet audio.
    assert excinfo.value.measured == pytest.approx(-60.0, abs=1.0)
    assert excinfo.value.limit == -50.0


def test_silent_recording_has_no_speech(clean_devset: Path) -> None:
    silence = Recording("muted.wav", np.zeros(5 * 16000, np.float32), 16000)
    with pytest.raises(EnrolmentError) as excinfo:
        check_recording(silence)
    assert "microphone" in refused(excinfo, "no_speech", "muted.wav")


def test_noisy_recording_is_named_among_good_ones(
    campplus: Embedder, telephone_devset: Path, clean_devset: Path
) -> None:
    original = recording(clean_devset, f"{SPEAKER_A}/04.wav")
    noise = np.random.default_rng(0).standard_normal(len(original.samples))
    level = active_level_dbfs(original.samples)
    noisy = altered(original, original.samples + noise * 10 ** ((level + 5.0) / 20))  # SNR -5 dB
    good = [recording(telephone_devset, f"{SPEAKER_A}/0{i}.wav") for i in (1, 2, 3)]
    with pytest.raises(EnrolmentError) as excinfo:
        enrol(campplus, [good[0], noisy, *good[1:]])
    message = refused(excinfo, "noisy", original.name)
    assert excinfo.value.measured < 0.0 < excinfo.value.limit
    assert "quieter" in message


def test_the_odd_one_out_is_named(campplus: Embedder, telephone_devset: Path) -> None:
    a1, a2 = (recording(telephone_devset, f"{SPEAKER_A}/0{i}.wav") for i in (1, 3))
    b = recording(telephone_devset, f"{SPEAKER_B}/01.wav")
    with pytest.raises(EnrolmentError) as excinfo:
        enrol(campplus, [a1, b, a2])
    refused(excinfo, "inconsistent", b.name)
    assert excinfo.value.measured < excinfo.value.limit  # the cosine, below the threshold for its speech
    # The same recordings pass when the check is off: only the consistency gate refused them.
    mixed = enrol(campplus, [a1, b, a2], EnrolmentPolicy(check_consistency=False))
    assert mixed.recordings[1].consistency is None


def test_two_recordings_that_disagree_blame_neither(campplus: Embedder, telephone_devset: Path) -> None:
    a = recording(telephone_devset, f"{SPEAKER_A}/04.wav")
    b = recording(telephone_devset, f"{SPEAKER_B}/03.wav")
    with pytest.raises(EnrolmentError) as excinfo:
        enrol(campplus, [a, b], EnrolmentPolicy(min_net_speech=4.0))
    message = refused(excinfo, "inconsistent", None)
    assert repr(a.name) in message and repr(b.name) in message and "third" in message


# --- the SNR estimate -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [f"{SPEAKER_A}/01.wav", "fillets_cs_big/02.wav", "librivox_ss01/01.wav"])
def test_snr_estimate_is_within_a_few_db_of_the_truth(clean_devset: Path, name: str) -> None:
    """Truth: the P.56 active level of the clean speech over the power of the white noise added to it."""
    speech = recording(clean_devset, name)
    level = active_level_dbfs(speech.samples)
    noise = np.random.default_rng(1).standard_normal(len(speech.samples))
    estimates = []
    for snr in (0.0, 10.0, 20.0):
        mixed = speech.samples + noise * 10 ** ((level - snr) / 20)
        estimate = estimate_snr_db(prepare_speech(mixed.astype(np.float32), speech.sample_rate))
        assert estimate == pytest.approx(snr, abs=3.0)
        estimates.append(estimate)
    assert estimates == sorted(estimates)
    assert estimates[0] < EnrolmentPolicy().min_snr_db < estimates[1]  # 0 dB refused, 10 dB accepted


def test_snr_estimate_parts_and_edge_cases() -> None:
    rng = np.random.default_rng(2)
    noise_only = (rng.standard_normal(16000 * 3) * 0.01).astype(np.float32)
    parts = estimate_snr(noise_only)
    assert parts.noise_dbfs == pytest.approx(-40.0, abs=0.5)  # the noise floor is found exactly
    assert parts.snr_db < 3.0  # and noise is not mistaken for speech far above it
    silent = estimate_snr(np.zeros(16000, np.float32))
    assert np.isfinite(silent.snr_db) and silent.snr_db <= 0.0
