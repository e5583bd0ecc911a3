import math

import numpy as np
import pytest

from verifier.metrics import cllr


def test_uninformative_system_costs_one_bit():
    assert cllr(np.zeros(6), np.array([1, 1, 0, 0, 0, 0])) == pytest.approx(1.0)


def test_confident_correct_llrs_cost_almost_nothing():
    assert cllr([50.0, 40.0, -50.0, -60.0], [1, 1, 0, 0]) < 1e-15


def test_confident_wrong_llrs_cost_more_than_one_bit():
    assert cllr([-5.0, 5.0], [1, 0]) > 1.0


def test_matches_the_definition():
    llrs = np.array([2.0, -1.0, 0.5, -3.0, 1.0])
    labels = np.array([1, 1, 0, 0, 0])
    expected = 0.5 * (
        np.mean([math.log2(1 + math.exp(-x)) for x in (2.0, -1.0)])
        + np.mean([math.log2(1 + math.exp(x)) for x in (0.5, -3.0, 1.0)])
    )
    assert cllr(llrs, labels) == pytest.approx(expected)


def test_stays_finite_for_huge_llrs():
    assert math.isfinite(cllr([-1e4, 1e4], [1, 0]))


def test_needs_both_classes():
    with pytest.raises(ValueError):
        cllr([1.0, 2.0], [1, 1])
