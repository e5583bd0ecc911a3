"""The offline chain: truncation to net speech, combining windows, and scoring verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from verifier.calibration import packaged_calibration
from verifier.errors import AudioError, CalibrationError
from verifier.pipeline import (
    SAMPLE_RATE,
    combine_embeddings,
    embed_file,
    embed_windows,
    load_speech,
    speech_windows,
    truncate_speech,
)
from verifier.scoring import Decision, Scorer
from verifier.vad import SpeechWindow


def window(start: float, seconds: float, speech: float) -> SpeechWindow:
    samples = np.zeros(round(seconds * SAMPLE_RATE), np.float32)
    return SpeechWindow(samples, start, start + seconds, speech)


def test_truncate_keeps_whole_windows_then_cuts_the_next() -> None:
    windows = [window(0, 2.0, 2.0), window(3, 3.0, 3.0), window(7, 1.0, 1.0)]
    kept = truncate_speech(windows, 3.0)
    assert len(kept) == 2
    assert kept[0] is windows[0]
    assert len(kept[1].samples) == SAMPLE_RATE and kept[1].speech_seconds == pytest.approx(1.0)
    assert sum(w.speech_seconds for w in kept) == pytest.approx(3.0)


def test_truncate_never_cuts_below_the_minimum_window() -> None:
    kept = truncate_speech([window(0, 3.0, 3.0)], 0.2, min_window=0.5)
    assert len(kept[0].samples) == SAMPLE_RATE // 2
    assert kept[0].speech_seconds == pytest.approx(0.5)


def test_truncate_longer_than_available_keeps_everything() -> None:
    windows = [window(0, 2.0, 1.5), window(3, 1.0, 0.8)]
    assert truncate_speech(windows, 60.0) == windows


def test_combine_weights_by_speech() -> None:
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    combined = combine_embeddings(np.concatenate([a, b]), np.array([3.0, 1.0]))
    assert combined == pytest.approx(np.array([3.0, 1.0]) / np.sqrt(10))


def test_embed_file_counts_speech_and_windows(campplus, telephone_devset: Path) -> None:
    path = telephone_devset / "wav" / "librivox_ss01" / "01.wav"
    whole = embed_file(campplus, path)
    windows = speech_windows(load_speech(path))
    assert whole.windows == len(windows) >= 1
    assert whole.net_speech_seconds == pytest.approx(sum(w.speech_seconds for w in windows), abs=1e-4)
    first_second = embed_file(campplus, path, max_speech_seconds=1.0)
    assert first_second.net_speech_seconds == pytest.approx(1.0, abs=0.05)
    assert first_second.windows == 1
    assert np.dot(whole.embedding, first_second.embedding) > 0.5  # same talker, less evidence


def test_no_windows_is_a_clear_error(campplus) -> None:
    with pytest.raises(AudioError, match="no speech"):
        embed_windows(campplus, [])


def test_scorer_decides_by_calibrated_threshold(campplus) -> None:
    scorer = Scorer(campplus.model_id, packaged_calibration(campplus.model_id))
    voiceprint = np.array([1.0, 0.0])
    threshold = scorer.threshold(3.0)
    above = np.array([threshold + 0.02, np.sqrt(1 - (threshold + 0.02) ** 2)])
    below = np.array([threshold - 0.02, np.sqrt(1 - (threshold - 0.02) ** 2)])
    match, mismatch = scorer.verdict(voiceprint, above, 3.0), scorer.verdict(voiceprint, below, 3.0)
    assert match.decision is Decision.MATCH and match.llr > 0
    assert mismatch.decision is Decision.MISMATCH and mismatch.llr < 0
    assert match.threshold == pytest.approx(threshold) and match.model_id == campplus.model_id
    short = scorer.verdict(voiceprint, above, 0.6)
    assert short.decision is Decision.UNKNOWN and "0.60 s" in short.reason


def test_scorer_without_calibration_needs_a_threshold() -> None:
    with pytest.raises(CalibrationError, match="vpmon calibrate"):
        Scorer("some-model")
    scorer = Scorer("some-model", fixed_threshold=0.5)
    assert scorer.verdict(np.array([1.0, 0.0]), np.array([0.6, 0.8]), 2.0).decision is Decision.MATCH
