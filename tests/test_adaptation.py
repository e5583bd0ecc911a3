"""Voiceprint updates from verified calls, the pure part: which calls qualify, and how far calls can
move a voiceprint."""

from __future__ import annotations

import numpy as np
import pytest

from verifier.adaptation import CallMaterial, UpdateMaterial, UpdatePolicy, updated_voiceprint


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


RNG = np.random.default_rng(5)
AGENT = unit(RNG.standard_normal(32))


def window() -> np.ndarray:
    return unit(AGENT + 0.3 * unit(RNG.standard_normal(32)))


def test_only_verified_speech_after_the_first_verdict_counts() -> None:
    material = UpdateMaterial(UpdatePolicy(min_call_speech_seconds=10.0))
    material.add(window(), 3.0, verified=False, llr=0.5, impostor=0.0)  # warming up: not verified yet
    material.add(window(), 3.0, verified=True, llr=4.0, impostor=0.0)  # reaches the first verdict
    assert material.result() == "0 s of verified speech; 10 s needed"
    for _ in range(4):
        material.add(window(), 3.0, verified=True, llr=5.0, impostor=0.0)
    result = material.result()
    assert isinstance(result, CallMaterial) and result.speech_seconds == 12.0
    assert float(result.embedding @ AGENT) > 0.9 and np.linalg.norm(result.embedding) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("verified", "llr", "impostor", "doubt"),
    [
        (False, 5.0, 0.0, "left VERIFIED"),
        (True, 2.0, 0.0, "fell below 3"),
        (True, 5.0, 0.5, "impostor evidence rose"),
    ],
)
def test_any_doubt_disqualifies_the_whole_call(
    verified: bool, llr: float, impostor: float, doubt: str
) -> None:
    material = UpdateMaterial(UpdatePolicy(min_call_speech_seconds=3.0))
    for _ in range(5):
        material.add(window(), 3.0, verified=True, llr=5.0, impostor=0.0)
    material.add(window(), 3.0, verified=verified, llr=llr, impostor=impostor)
    for _ in range(5):  # confident again afterwards: still disqualified
        material.add(window(), 3.0, verified=True, llr=6.0, impostor=0.0)
    result = material.result()
    assert isinstance(result, str) and doubt in result


def test_calls_never_outweigh_the_enrolment() -> None:
    """An accepted impostor's calls, however many, leave the enrolment at least half the weight: the
    voiceprint stays within 45 degrees of what was enrolled."""
    policy = UpdatePolicy(max_adapted_share=0.5)
    r = RNG.standard_normal(32)
    other = unit(r - (r @ AGENT) * AGENT)  # as far from the agent as a voice gets
    vector, adapted = AGENT, 0.0
    updates = 0
    while (step := updated_voiceprint(vector, 12.0, adapted, CallMaterial(other, 40.0), policy)) is not None:
        vector, adapted = step
        updates += 1
    assert updates == 1 and adapted == pytest.approx(12.0)  # the first call is counted with 12 s only
    assert float(vector @ AGENT) >= np.cos(np.pi / 4) - 1e-6
    assert updated_voiceprint(vector, 12.0, adapted, CallMaterial(AGENT, 40.0), policy) is None


def test_an_update_is_the_speech_weighted_mean() -> None:
    material = CallMaterial(window(), 6.0)
    vector, adapted = updated_voiceprint(AGENT, 12.0, 2.0, material)
    expected = unit(AGENT * 14.0 + material.embedding * 6.0)
    np.testing.assert_allclose(vector, expected, atol=1e-6)
    assert adapted == 8.0
    with pytest.raises(ValueError):
        UpdatePolicy(max_adapted_share=1.0)
