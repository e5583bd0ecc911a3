"""Turning raw cosine scores into log-likelihood ratios that account for how much speech was heard.

A cosine from 1 s of phone speech and one from 10 s do not mean the same: short tests spread the
target and non-target scores towards each other. Following the "quality measure function" approach
(Mandasari et al., IEEE TASLP 2013), the calibration is linear in the score with coefficients that
depend on log net speech:

    llr = (a + b·log d) · score + (c + e·log d)          d = net speech seconds of the test side

fitted by prior-weighted logistic regression (Brümmer & du Preez, Computer Speech and Language 2006),
so that with an effective target prior of ``p_target`` the Bayes decision is ``llr ≥ 0``. Durations are
clamped to the range seen in training. The fitted values live in the model card.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np

from verifier.errors import CalibrationError


@dataclass(frozen=True)
class Calibration:
    scale: float  # a
    scale_per_log_seconds: float  # b
    offset: float  # c
    offset_per_log_seconds: float  # e
    min_seconds: float
    max_seconds: float
    p_target: float = 0.5
    trained_on: str = ""
    # The same fit for cosines centred on the tenant's voiceprint mean (verifier/score_norm.py), which
    # are distributed differently; None: this calibration cannot score centred cosines.
    centred: Calibration | None = None

    def _log_seconds(self, seconds):
        return np.log(np.clip(seconds, self.min_seconds, self.max_seconds))

    def llr(self, score, seconds):
        """Log-likelihood ratio (natural log) of same speaker vs different speakers."""
        log_d = self._log_seconds(np.asarray(seconds, dtype=np.float64))
        slope = self.scale + self.scale_per_log_seconds * log_d
        return slope * np.asarray(score, dtype=np.float64) + self.offset + self.offset_per_log_seconds * log_d

    def threshold(self, seconds: float, llr_threshold: float = 0.0) -> float:
        """The raw cosine at which the LLR equals ``llr_threshold`` for this much speech."""
        log_d = float(self._log_seconds(seconds))
        slope = self.scale + self.scale_per_log_seconds * log_d
        return (llr_threshold - self.offset - self.offset_per_log_seconds * log_d) / slope

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["centred"]  # None is left out, as calibrations were written before centring
        if self.centred is not None:
            data["centred"] = self.centred.to_dict()
        return data

    def for_scores(self, centred: bool) -> Calibration:
        """The fit for raw cosines, or for centred ones (which this calibration must have)."""
        if not centred:
            return self
        if self.centred is None:
            raise CalibrationError(
                f"this calibration ({self.trained_on or 'no source'}) has no fit for centred scores: "
                "run `vpmon calibrate TRIALS`"
            )
        return self.centred

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        try:
            centred = data.get("centred")
            return cls(**{**data, "centred": cls.from_dict(centred) if centred is not None else None})
        except (TypeError, AttributeError) as exc:
            raise CalibrationError(f"calibration data is not in the expected form: {exc}") from None


def fit_calibration(
    scores, seconds, labels, *, p_target: float = 0.5, trained_on: str = "", iterations: int = 50
) -> Calibration:
    """Prior-weighted logistic regression of the labels on [s, s·log d, 1, log d] (Newton's method)."""
    scores = np.asarray(scores, dtype=np.float64)
    seconds = np.asarray(seconds, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    n_target = labels.sum()
    n_nontarget = len(labels) - n_target
    if n_target < 5 or n_nontarget < 5:
        raise CalibrationError("calibration needs at least 5 target and 5 non-target trials")
    if np.any(seconds <= 0):
        raise CalibrationError("every trial needs a positive amount of net speech")
    log_d = np.log(seconds)
    features = np.stack([scores, scores * log_d, np.ones_like(scores), log_d], axis=1)
    # Each class carries the weight of its prior, so the fit does not depend on the trial mix.
    weights = np.where(labels == 1, p_target / n_target, (1 - p_target) / n_nontarget)
    prior_logit = math.log(p_target / (1 - p_target))
    coef = np.zeros(4)
    for _ in range(iterations):
        posterior = 1.0 / (1.0 + np.exp(-(features @ coef + prior_logit)))
        gradient = features.T @ (weights * (posterior - labels))
        hessian = (features * (weights * posterior * (1 - posterior))[:, None]).T @ features
        step = np.linalg.solve(hessian + 1e-9 * np.eye(4), gradient)
        coef -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return Calibration(
        scale=float(coef[0]),
        scale_per_log_seconds=float(coef[1]),
        offset=float(coef[2]),
        offset_per_log_seconds=float(coef[3]),
        min_seconds=float(seconds.min()),
        max_seconds=float(seconds.max()),
        p_target=p_target,
        trained_on=trained_on,
    )


def packaged_calibration(model_id: str) -> Calibration | None:
    """The calibration shipped with vpmon for a built-in model (fitted with ``vpmon calibrate``)."""
    path = resources.files("verifier.models").joinpath("calibration", f"{model_id}.json")
    if not path.is_file():
        return None
    return Calibration.from_dict(json.loads(path.read_text()))
