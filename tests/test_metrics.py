"""EER and minDCF against a brute-force evaluation over every threshold."""

from __future__ import annotations

import numpy as np
import pytest

from verifier.metrics import detection_errors


def brute_force(scores: np.ndarray, labels: np.ndarray, p_target: float) -> tuple[float, float]:
    """Smallest max(miss, fa) over thresholds (an EER bracket) and the exact minDCF."""
    best_gap, best_cost = 1.0, np.inf
    for threshold in np.concatenate([np.unique(scores), [np.inf]]):
        accept = scores >= threshold
        miss = np.mean(~accept[labels == 1])
        false_alarm = np.mean(accept[labels == 0])
        best_gap = min(best_gap, max(miss, false_alarm))
        best_cost = min(best_cost, p_target * miss + (1 - p_target) * false_alarm)
    return best_gap, best_cost / min(p_target, 1 - p_target)


def test_perfect_separation_gives_zero_error() -> None:
    errors = detection_errors([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0])
    assert errors.eer == 0.0
    assert errors.min_dcf == 0.0
    assert 0.2 < errors.eer_threshold <= 0.8


def test_reversed_scores_give_full_error() -> None:
    assert detection_errors([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]).eer == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_random_gaussians(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.ones(300, int), np.zeros(1200, int)])
    scores = np.concatenate([rng.normal(1.5, 1, 300), rng.normal(0, 1, 1200)])
    errors = detection_errors(scores, labels, p_target=0.01)
    bracket, min_dcf = brute_force(scores, labels, 0.01)
    # the interpolated EER lies between the two operating points around the crossing
    assert bracket - 1 / 300 <= errors.eer <= bracket + 1e-12
    assert errors.min_dcf == pytest.approx(min_dcf)
    assert errors.targets == 300 and errors.nontargets == 1200


def test_eer_of_equal_variance_gaussians_is_close_to_theory() -> None:
    rng = np.random.default_rng(7)
    labels = np.concatenate([np.ones(20000, int), np.zeros(20000, int)])
    scores = np.concatenate([rng.normal(2, 1, 20000), rng.normal(0, 1, 20000)])
    # crossing at 1: Φ(-1) = 0.1587
    assert detection_errors(scores, labels).eer == pytest.approx(0.1587, abs=0.006)


def test_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="target"):
        detection_errors([0.1, 0.2], [1, 1])
