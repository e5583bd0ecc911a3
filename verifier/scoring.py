"""Scores and verdicts: cosine against a voiceprint, calibrated by how much speech was heard."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np

from verifier.calibration import Calibration
from verifier.errors import CalibrationError
from verifier.score_norm import centre


class Decision(StrEnum):
    MATCH = "MATCH"
    MISMATCH = "MISMATCH"
    UNKNOWN = "UNKNOWN"  # not enough speech to say


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    score: float  # cosine similarity in [-1, 1]
    threshold: float  # the cosine at which the decision flips, for this much speech
    llr: float | None  # calibrated log-likelihood ratio (natural log); None without a calibration
    net_speech_seconds: float
    model_id: str
    reason: str = ""
    centred: bool = False  # the cosine was taken after centring on the tenant's voiceprints

    def to_dict(self) -> dict:
        """JSON-ready, rounded to what the numbers can honestly claim."""
        return {
            **asdict(self),
            "decision": self.decision.value,
            "score": round(self.score, 4),
            "threshold": round(self.threshold, 4),
            "llr": None if self.llr is None else round(self.llr, 3),
            "net_speech_seconds": round(self.net_speech_seconds, 2),
        }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@dataclass(frozen=True)
class Scorer:
    """Compares an embedding with a voiceprint and decides.

    With a calibration the decision is ``llr ≥ llr_threshold`` (0 = the Bayes decision at the
    calibration's prior); without one, a fixed cosine threshold must be given. Below
    ``min_net_speech`` seconds the verdict is UNKNOWN whatever the score.
    """

    model_id: str
    calibration: Calibration | None = None
    llr_threshold: float = 0.0
    fixed_threshold: float | None = None
    min_net_speech: float = 1.0

    def __post_init__(self) -> None:
        if self.calibration is None and self.fixed_threshold is None:
            raise CalibrationError(
                f"model {self.model_id} has no calibration: run `vpmon calibrate TRIALS` or pass a threshold"
            )

    def threshold(self, net_speech_seconds: float, centred: bool = False) -> float:
        if self.fixed_threshold is not None:
            return self.fixed_threshold
        assert self.calibration is not None
        calibration = self.calibration.for_scores(centred)
        return float(calibration.threshold(net_speech_seconds, self.llr_threshold))

    def can_centre(self) -> bool:
        """Whether scores may be centred on a tenant's voiceprint mean (a fit for them is calibrated)."""
        return (
            self.fixed_threshold is None
            and self.calibration is not None
            and self.calibration.centred is not None
        )

    def verdict(
        self,
        voiceprint: np.ndarray,
        embedding: np.ndarray,
        net_speech_seconds: float,
        mean: np.ndarray | None = None,
    ) -> Verdict:
        """``mean``: centre both sides on it first (verifier/score_norm.py); the calibration must have a
        fit for centred scores (``can_centre``)."""
        centred = mean is not None
        if centred:
            voiceprint, embedding = centre(voiceprint, mean), centre(embedding, mean)
        score = cosine(voiceprint, embedding)
        threshold = self.threshold(net_speech_seconds, centred)
        calibration = self.calibration.for_scores(centred) if self.calibration else None
        llr = float(calibration.llr(score, net_speech_seconds)) if calibration else None
        if net_speech_seconds < self.min_net_speech:
            decision = Decision.UNKNOWN
            reason = f"only {net_speech_seconds:.2f} s of speech; {self.min_net_speech:.2f} s needed"
        else:
            decision = Decision.MATCH if score >= threshold else Decision.MISMATCH
            reason = ""
        return Verdict(decision, score, threshold, llr, net_speech_seconds, self.model_id, reason, centred)
