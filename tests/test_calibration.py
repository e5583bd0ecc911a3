"""Duration-aware calibration: recovers a known LLR, gives sensible thresholds, round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from verifier.calibration import Calibration, fit_calibration, packaged_calibration
from verifier.errors import CalibrationError
from verifier.models.registry import BUILTIN


def synthetic_trials(rng: np.random.Generator, n: int = 4000):
    """Scores whose separation grows with duration, like real ones: targets N(m(d), s²), non-targets
    N(0, s²) with m(d) = 0.3 + 0.1·log d. The true LLR is linear in the score with duration terms."""
    seconds = rng.choice([0.5, 1.0, 3.0, 10.0], size=n)
    labels = rng.random(n) < 0.3
    mean = 0.3 + 0.1 * np.log(seconds)
    scores = rng.normal(np.where(labels, mean, 0.0), 0.1)
    true_llr = (mean * scores - mean**2 / 2) / 0.1**2
    return scores, seconds, labels.astype(int), true_llr


def test_fit_recovers_the_true_llr() -> None:
    scores, seconds, labels, true_llr = synthetic_trials(np.random.default_rng(0))
    calibration = fit_calibration(scores, seconds, labels)
    fitted = calibration.llr(scores, seconds)
    # close where decisions are made (|LLR| < 5); the model family holds the truth only approximately
    central = np.abs(true_llr) < 5
    assert np.corrcoef(fitted[central], true_llr[central])[0, 1] > 0.98
    assert np.median(np.abs(fitted[central] - true_llr[central])) < 0.6


def test_threshold_is_where_llr_crosses_zero_and_rises_with_duration() -> None:
    scores, seconds, labels, _ = synthetic_trials(np.random.default_rng(1))
    calibration = fit_calibration(scores, seconds, labels)
    for duration in (0.5, 1.0, 3.0, 10.0):
        threshold = calibration.threshold(duration)
        assert calibration.llr(threshold, duration) == pytest.approx(0.0, abs=1e-9)
    assert calibration.threshold(0.5) < calibration.threshold(10.0)
    # durations outside the training range are clamped, not extrapolated
    assert calibration.threshold(100.0) == pytest.approx(calibration.threshold(10.0))


def test_round_trips_through_a_dict() -> None:
    scores, seconds, labels, _ = synthetic_trials(np.random.default_rng(2))
    calibration = fit_calibration(scores, seconds, labels, trained_on="synthetic")
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_refuses_too_few_trials() -> None:
    with pytest.raises(CalibrationError, match="at least 5"):
        fit_calibration([0.1, 0.9], [1.0, 1.0], [0, 1])


@pytest.mark.parametrize("model_id", sorted(BUILTIN))
def test_packaged_calibrations_are_sane(model_id: str) -> None:
    """Shipped calibrations (fitted on the seed-0 telephone dev set, the tuning draw, with the default
    front end) exist and rise with the amount of speech."""
    calibration = packaged_calibration(model_id)
    assert calibration is not None
    thresholds = [calibration.threshold(d) for d in (0.5, 1.0, 3.0, 10.0)]
    assert all(0.0 < t < 1.0 for t in thresholds)
    assert thresholds == sorted(thresholds)
    assert calibration.llr(0.95, 3.0) > 0 > calibration.llr(0.0, 3.0)
