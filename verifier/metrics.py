"""Detection metrics for trial lists: equal error rate and the minimum detection cost (NIST SRE style)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DetectionErrors:
    eer: float  # fraction, not percent
    eer_threshold: float
    min_dcf: float  # normalised by the cost of the best trivial system
    min_dcf_threshold: float
    p_target: float
    targets: int
    nontargets: int


def _error_curves(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates for every threshold between sorted scores (accept when score ≥ t)."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    n_target = sorted_labels.sum()
    n_nontarget = len(sorted_labels) - n_target
    # Threshold index i rejects the i lowest scores.
    misses = np.concatenate([[0], np.cumsum(sorted_labels)]) / n_target
    false_alarms = 1.0 - np.concatenate([[0], np.cumsum(1 - sorted_labels)]) / n_nontarget
    thresholds = np.concatenate([sorted_scores, [sorted_scores[-1] + 1e-6]])
    return misses, false_alarms, thresholds


def detection_errors(scores, labels, p_target: float = 0.01) -> DetectionErrors:
    """EER (at the crossing of the miss and false-alarm curves) and minDCF with C_miss = C_fa = 1."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and labels must be 1-D arrays of the same length")
    n_target = int(labels.sum())
    if n_target == 0 or n_target == len(labels):
        raise ValueError("need both target (1) and non-target (0) trials")
    misses, false_alarms, thresholds = _error_curves(scores, labels)
    gap = misses - false_alarms
    i = int(np.argmax(gap >= 0))  # first threshold where misses catch up with false alarms
    if i == 0:
        eer = misses[0]
    else:  # interpolate linearly between the two operating points around the crossing
        d0, d1 = gap[i - 1], gap[i]
        w = d0 / (d0 - d1) if d1 != d0 else 0.5
        eer = (1 - w) * (misses[i - 1] + false_alarms[i - 1]) / 2 + w * (misses[i] + false_alarms[i]) / 2
    costs = p_target * misses + (1 - p_target) * false_alarms
    j = int(np.argmin(costs))
    return DetectionErrors(
        eer=float(eer),
        eer_threshold=float(thresholds[i]),
        min_dcf=float(costs[j] / min(p_target, 1 - p_target)),
        min_dcf_threshold=float(thresholds[j]),
        p_target=p_target,
        targets=n_target,
        nontargets=len(labels) - n_target,
    )


def cllr(llrs, labels) -> float:
    """Log-likelihood-ratio cost in bits (Brümmer & du Preez 2006): 0 is perfect, 1 is an uninformative
    system that always says llr = 0; above 1 the scores mislead. ``llrs`` are natural-log ratios."""
    llrs = np.asarray(llrs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if llrs.shape != labels.shape or llrs.ndim != 1:
        raise ValueError("llrs and labels must be 1-D arrays of the same length")
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise ValueError("need both target (1) and non-target (0) trials")
    target_cost = np.logaddexp(0.0, -llrs[labels == 1]).mean()  # ln(1 + e^-llr)
    nontarget_cost = np.logaddexp(0.0, llrs[labels == 0]).mean()
    return float((target_cost + nontarget_cost) / (2 * np.log(2)))
