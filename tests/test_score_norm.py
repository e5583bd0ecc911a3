"""Centring scores on the tenant's other voiceprints: the leave-one-out mean, when there are too few, and
the calibration that goes with centred scores."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.redis_server import RedisServer
from streamer.store import Voiceprint, open_store
from streamer.voiceprint_means import TenantMeans
from verifier.calibration import Calibration, fit_calibration
from verifier.errors import CalibrationError
from verifier.score_norm import MIN_OTHER_VOICEPRINTS, VoiceprintMean, centre
from verifier.scoring import Scorer


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def tenant() -> dict[str, np.ndarray]:
    """Twenty voiceprints sharing a channel offset (the part centring removes)."""
    rng = np.random.default_rng(7)
    offset = 6.0 * unit(rng.standard_normal(16))
    return {f"agent-{i:02d}": unit(offset + rng.standard_normal(16)) for i in range(20)}


def test_the_mean_leaves_the_claimed_agent_out(tenant: dict[str, np.ndarray]) -> None:
    means = VoiceprintMean.of("m", tenant)
    assert means.count == 20
    mean = means.for_speaker("agent-03", tenant["agent-03"])
    others = [v for k, v in tenant.items() if k != "agent-03"]
    np.testing.assert_allclose(mean, np.mean(others, axis=0), atol=1e-6)
    # Someone not among the voiceprints (a recording compared ad hoc): the mean of all of them.
    outsider = unit(np.ones(16))
    np.testing.assert_allclose(
        means.for_speaker("visitor", outsider), np.mean(list(tenant.values()), axis=0), atol=1e-6
    )


def test_too_few_other_voiceprints_mean_no_centring(tenant: dict[str, np.ndarray]) -> None:
    enough = dict(list(tenant.items())[: MIN_OTHER_VOICEPRINTS + 1])
    assert VoiceprintMean.of("m", enough).for_speaker("agent-00", tenant["agent-00"]) is not None
    too_few = dict(list(tenant.items())[:MIN_OTHER_VOICEPRINTS])
    assert VoiceprintMean.of("m", too_few).for_speaker("agent-00", tenant["agent-00"]) is None
    assert VoiceprintMean.of("m", {}).for_speaker("agent-00", tenant["agent-00"]) is None
    # A voiceprint of another size (another model) is never centred on this mean.
    assert VoiceprintMean.of("m", tenant).for_speaker("x", unit(np.ones(8))) is None
    with pytest.raises(ValueError, match="different sizes"):
        VoiceprintMean.of("m", {**tenant, "odd": unit(np.ones(8))})


def test_centring_removes_the_shared_offset(tenant: dict[str, np.ndarray]) -> None:
    """Raw cosines between different agents are high (the channel); centred ones are not."""
    mean = VoiceprintMean.of("m", tenant).for_speaker("agent-00", tenant["agent-00"])
    raw = [float(tenant["agent-00"] @ v) for k, v in tenant.items() if k != "agent-00"]
    centred = [
        float(centre(tenant["agent-00"], mean) @ centre(v, mean))
        for k, v in tenant.items()
        if k != "agent-00"
    ]
    assert np.mean(raw) > 0.5 and abs(np.mean(centred)) < 0.2
    assert np.linalg.norm(centre(tenant["agent-01"], mean)) == pytest.approx(1.0, abs=1e-6)


def calibrations() -> Calibration:
    rng = np.random.default_rng(3)
    seconds = rng.choice([1.0, 3.0, 10.0], size=400)
    labels = rng.random(400) < 0.5
    raw = fit_calibration(rng.normal(np.where(labels, 0.6, 0.3), 0.1), seconds, labels, trained_on="raw")
    centred = fit_calibration(rng.normal(np.where(labels, 0.4, 0.0), 0.1), seconds, labels, trained_on="c")
    return Calibration(**{**raw.to_dict(), "centred": centred})


def test_a_calibration_with_a_centred_fit_round_trips() -> None:
    calibration = calibrations()
    assert Calibration.from_dict(calibration.to_dict()) == calibration
    assert (
        calibration.for_scores(True) is calibration.centred and calibration.for_scores(False) is calibration
    )
    plain = Calibration.from_dict({k: v for k, v in calibration.to_dict().items() if k != "centred"})
    assert "centred" not in plain.to_dict()  # written as calibrations were before centring
    with pytest.raises(CalibrationError, match="no fit for centred scores"):
        plain.for_scores(True)
    with pytest.raises(CalibrationError, match="expected form"):
        Calibration.from_dict({**calibration.to_dict(), "centred": {"scale": 1.0}})


def test_the_scorer_uses_the_centred_fit_for_centred_scores(tenant: dict[str, np.ndarray]) -> None:
    calibration = calibrations()
    scorer = Scorer("m", calibration)
    assert scorer.can_centre()
    assert not Scorer("m", fixed_threshold=0.5).can_centre()
    assert not Scorer("m", Calibration.from_dict(calibration.to_dict() | {"centred": None})).can_centre()

    voiceprint = tenant["agent-00"]
    test = unit(voiceprint + 0.5 * unit(np.arange(16.0)))
    mean = VoiceprintMean.of("m", tenant).for_speaker("agent-00", voiceprint)
    raw = scorer.verdict(voiceprint, test, 3.0)
    centred = scorer.verdict(voiceprint, test, 3.0, mean)
    assert not raw.centred and centred.centred and centred.to_dict()["centred"] is True
    assert centred.score == pytest.approx(float(centre(voiceprint, mean) @ centre(test, mean)), abs=1e-6)
    assert centred.threshold == pytest.approx(calibration.centred.threshold(3.0))
    assert centred.llr == pytest.approx(float(calibration.centred.llr(centred.score, 3.0)))
    assert raw.threshold == pytest.approx(calibration.threshold(3.0))


# --- the server's cache of each tenant's voiceprints, on a real Redis ----------------------------------
def test_tenant_means_cache_forget_and_survive_redis_going_away(
    redis_to_kill: RedisServer, tenant: dict[str, np.ndarray]
) -> None:
    client = redis_to_kill.client()
    store = open_store(client, "vset")
    for speaker, vector in tenant.items():
        store.put(Voiceprint("acme", speaker, vector, "m"))
    store.put(Voiceprint("other", "x", unit(np.ones(16)), "m"))
    means = TenantMeans(open_store(redis_to_kill.client(), "vset"), max_age_s=3600)

    first = means.get("acme", "m")
    assert first is not None and first.speakers == frozenset(tenant)  # no other tenant's voiceprint
    np.testing.assert_allclose(first.total, np.sum(list(tenant.values()), axis=0), atol=1e-5)
    assert means.get("acme", "another-model") is None

    # Another process enrols: this one keeps its mean until it is told, or until max_age_s.
    store.put(Voiceprint("acme", "newcomer", unit(np.arange(16.0)), "m"))
    assert means.get("acme", "m").count == len(tenant)
    means.forget("acme")
    assert means.get("acme", "m").count == len(tenant) + 1

    # Redis goes away: the last mean is kept (a stale one too), nothing raises.
    means.max_age_s = 0.0
    redis_to_kill.kill()
    kept = means.get("acme", "m")
    assert kept is not None and kept.count == len(tenant) + 1
    assert means.get("nobody", "m") is None
