"""Is the agent still the agent? Evidence accumulated over windows, and a decision with hysteresis.

Two statistics per call and agent, both in calibrated log-likelihood ratios (LLR > 0: the agent):

* the **evidence**: the speech-weighted mean of the embeddings of the last ``evidence_seconds`` of net
  speech, scored against the voiceprint and calibrated by its amount of speech (the Foundation's
  accumulation table: averaging window embeddings does as well as re-embedding the joined audio). It is
  what a verdict shows, and it decides VERIFIED: a steady, slow view of who is talking.
* the **impostor evidence**: a CUSUM (Page, 1954) of the windows' own LLRs, ``g ← max(0, g − clip(llr) −
  allowance)``, the sequential test for a change of speaker. Windows against the agent add up, windows
  for the agent pay it back down to zero, so a takeover is caught as soon as the new voice has said
  enough, however long the agent spoke before; an average over a span has to wait until the impostor
  fills most of it. Each window counts at most ``window_llr_limit`` (one window, however bad, never
  pages), and ``allowance`` is what a window may score against the agent for free (genuine windows of
  line noise or a cough score low now and then). The alert is raised when ``g`` reaches
  ``alert_evidence`` (benchmarks/takeover.py chose the values; README, "Takeover detection").

``CallDecision`` is an explicit state machine (in the style of h11): every window moves it by one
transition, and each transition is a ``Verdict``; an ``Alert`` is raised on entering MISMATCH only.

    WARMING_UP ──(net speech ≥ min)──▶ VERIFIED ◀───────────────────────────────────┐
         │                               │  ▲                                     │ evidence ≥ match_llr
         │          g ≥ alert_evidence/2 │  │ evidence ≥ match_llr, g small       │ (recovery)
         └───────────────────────────▶ SUSPECT ──(g ≥ alert_evidence)──▶ MISMATCH ─▶ Alert, once

Below ``match_llr`` and short of SUSPECT the state holds (hysteresis), so a score that wobbles around one
threshold does not flap. After an alert, a new alert for the same call needs the evidence to recover to
VERIFIED first (a new takeover), and ``cooldown_seconds`` of speech since the last alert.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from verifier.adaptation import UpdateMaterial
from verifier.calibration import Calibration
from verifier.pipeline import VadConfig, combine_embeddings
from verifier.score_norm import centre
from verifier.scoring import cosine

# Live calls skip windows less than 4 dB above the line's noise floor (line noise the VAD took for speech
# scores like another speaker), with webrtcvad's mode 1 as for files: the setting the takeover sweep chose.
LIVE_VAD = VadConfig(aggressiveness=1, min_window_snr_db=4.0)


class State(StrEnum):
    WARMING_UP = "warming_up"  # not enough net speech for any verdict
    VERIFIED = "verified"
    SUSPECT = "suspect"  # evidence says another speaker, not yet confirmed
    MISMATCH = "mismatch"  # confirmed: an alert was raised


@dataclass(frozen=True)
class DecisionPolicy:
    # Chosen from the sweep of benchmarks/takeover.py (README, "Takeover detection"): no false alert on
    # the tuning split, then the most takeovers caught within 6 s of impostor speech. Kept at 4 / 1 / 10
    # after the narrowband fill: the faster 3 / 0 / 12 (allowance 0) raised false alerts on the load
    # benchmark's hours of genuine calls (README "Takeover detection").
    evidence_seconds: float = 9.0  # net agent speech the evidence (the verdict's score) spans
    min_net_speech: float = 3.0  # before any verdict
    match_llr: float = 1.0  # evidence LLR at or above which the agent is verified
    window_llr_limit: float = 4.0  # a window's LLR counts at most this much, either way
    allowance: float = 1.0  # a window LLR this far below zero does not count against the agent
    alert_evidence: float = 10.0  # impostor evidence (the CUSUM, in LLR) that raises the alert
    cooldown_seconds: float = 60.0  # net speech between two alerts of one call

    def __post_init__(self) -> None:
        if self.window_llr_limit <= 0 or self.allowance < 0:
            raise ValueError("window_llr_limit > 0 and allowance ≥ 0 are needed")
        if self.alert_evidence <= self.window_llr_limit - self.allowance:
            raise ValueError(
                "alert_evidence must exceed what one window can add (window_llr_limit − allowance): "
                "one window, however bad, must never raise an alert"
            )
        if self.evidence_seconds <= 0 or self.min_net_speech < 0:
            raise ValueError("evidence_seconds > 0 and min_net_speech ≥ 0 are needed")

    def impostor_step(self, window_llr: float) -> float:
        """What one window adds to the impostor evidence (negative: pays it back)."""
        clipped = min(max(window_llr, -self.window_llr_limit), self.window_llr_limit)
        return -clipped - self.allowance


@dataclass(frozen=True)
class WindowVerdict:
    """The state after one window, with everything a supervisor or a log needs to trust it."""

    state: State
    score: float  # cosine of the evidence with the voiceprint
    llr: float  # calibrated for the evidence's net speech
    threshold: float  # the cosine at which the evidence would be at match_llr
    net_speech_seconds: float  # in the evidence
    media_start: float  # the evidence spans this range of the call's agent audio (seconds)
    media_end: float
    window_score: float  # the newest window alone, for diagnosis
    window_llr: float  # the newest window alone, calibrated for its speech
    impostor_evidence: float  # the CUSUM of window LLRs against the agent (alert at alert_evidence)
    model_id: str
    centred: bool = False  # scores are cosines centred on the tenant's other voiceprints

    def to_dict(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "score": round(self.score, 4),
            "llr": round(self.llr, 3),
            "threshold": round(self.threshold, 4),
            "net_speech_seconds": round(self.net_speech_seconds, 2),
            "media_start": round(self.media_start, 2),
            "media_end": round(self.media_end, 2),
            "window_score": round(self.window_score, 4),
            "window_llr": round(self.window_llr, 3),
            "impostor_evidence": round(self.impostor_evidence, 3),
            "model_id": self.model_id,
            "centred": self.centred,
        }


@dataclass(frozen=True)
class Alert:
    """The agent's voice was replaced: raised once per takeover."""

    verdict: WindowVerdict
    impostor_since: float  # media time of the first window of the run that built the impostor evidence


@dataclass
class Evidence:
    """The last ``span_seconds`` of net speech: window embeddings, their speech and media times."""

    span_seconds: float
    _windows: deque[tuple[np.ndarray, float, float, float]] = field(default_factory=deque)

    def add(self, embedding: np.ndarray, speech_seconds: float, start: float, end: float) -> None:
        self._windows.append((embedding, float(speech_seconds), float(start), float(end)))
        while len(self._windows) > 1 and self.net_speech - self._windows[0][1] >= self.span_seconds:
            self._windows.popleft()

    def clear(self) -> None:
        self._windows.clear()

    @property
    def net_speech(self) -> float:
        return float(sum(w[1] for w in self._windows))

    def combined(self) -> np.ndarray:
        embeddings = np.stack([w[0] for w in self._windows])
        return combine_embeddings(embeddings, np.array([w[1] for w in self._windows]))

    @property
    def span(self) -> tuple[float, float]:
        return self._windows[0][2], self._windows[-1][3]


class CallDecision:
    """The verdicts of one call against one agent's voiceprint. A transfer makes a new one."""

    def __init__(
        self,
        voiceprint: np.ndarray,
        calibration: Calibration,
        model_id: str,
        policy: DecisionPolicy,
        mean: np.ndarray | None = None,
    ) -> None:
        """``mean``: score in the space centred on the tenant's other voiceprints (verifier/score_norm.py),
        with the calibration's fit for centred scores; fixed for the call, so its evidence stays
        comparable from window to window."""
        self.mean = mean
        self.centred = mean is not None
        self.voiceprint = self._centred(np.asarray(voiceprint, dtype=np.float32))
        self.calibration = calibration.for_scores(self.centred)
        self.model_id = model_id
        self.policy = policy
        self.evidence = Evidence(policy.evidence_seconds)
        self.state = State.WARMING_UP
        self.impostor_evidence = 0.0
        self._impostor_since: float | None = None  # where the current run of impostor evidence began
        self._speech_total = 0.0
        self._last_alert_at: float | None = None  # in total net speech
        self.material = UpdateMaterial()  # what the call may add to the voiceprint (verifier/adaptation.py)

    def observe(
        self, embedding: np.ndarray, speech_seconds: float, start: float, end: float
    ) -> tuple[WindowVerdict, Alert | None]:
        """One more window of agent speech → the verdict after it, and an alert if this one raised it."""
        self.evidence.add(embedding, speech_seconds, start, end)
        self._speech_total += speech_seconds
        net = self.evidence.net_speech
        score = cosine(self.voiceprint, self._centred(self.evidence.combined()))
        llr = float(self.calibration.llr(score, net))
        window_score = cosine(self.voiceprint, self._centred(embedding))
        window_llr = float(self.calibration.llr(window_score, speech_seconds))
        alert = self._step(llr, window_llr, start)
        media_start, media_end = self.evidence.span
        verdict = WindowVerdict(
            state=self.state,
            score=score,
            llr=llr,
            threshold=float(self.calibration.threshold(net, self.policy.match_llr)),
            net_speech_seconds=net,
            media_start=media_start,
            media_end=media_end,
            window_score=window_score,
            window_llr=window_llr,
            impostor_evidence=self.impostor_evidence,
            model_id=self.model_id,
            centred=self.centred,
        )
        verified = self.state is State.VERIFIED
        self.material.add(embedding, speech_seconds, verified, llr, self.impostor_evidence)
        return verdict, (Alert(verdict, alert) if alert is not None else None)

    def _centred(self, vector: np.ndarray) -> np.ndarray:
        return vector if self.mean is None else centre(vector, self.mean)

    def _step(self, llr: float, window_llr: float, window_start: float) -> float | None:
        """One transition on the evidence LLR and the newest window's LLR (``_speech_total`` already
        counts the window); returns the impostor's start time when this window raises an alert."""
        policy = self.policy
        evidence = max(0.0, self.impostor_evidence + policy.impostor_step(window_llr))
        if evidence > 0 and self.impostor_evidence == 0:
            self._impostor_since = window_start
        self.impostor_evidence = evidence
        if self._speech_total < policy.min_net_speech:
            return None  # WARMING_UP: the statistics run, no verdict yet
        if self.state is State.MISMATCH:
            if llr >= policy.match_llr:  # the agent's voice is back: a later takeover is a new one
                self.state = State.VERIFIED
                self.impostor_evidence = 0.0
            return None
        if evidence >= policy.alert_evidence:
            cooled = (
                self._last_alert_at is None
                or self._speech_total - self._last_alert_at >= policy.cooldown_seconds
            )
            if not cooled:
                self.state = State.SUSPECT
                return None
            self.state = State.MISMATCH
            self._last_alert_at = self._speech_total
            return self._impostor_since
        if evidence >= policy.alert_evidence / 2:
            self.state = State.SUSPECT
        elif llr >= policy.match_llr:
            self.state = State.VERIFIED
        elif self.state is State.WARMING_UP:
            self.state = State.SUSPECT  # a first verdict below match: not verified
        return None
