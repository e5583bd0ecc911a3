"""Is the agent still the agent? Evidence accumulated over windows, and a decision with hysteresis.

Per call and per agent, windows' embeddings go into an ``Evidence`` buffer that keeps the last
``evidence_seconds`` of net speech; their speech-weighted mean is scored against the agent's voiceprint
and calibrated by the amount of speech (the Foundation's accumulation table: averaging window embeddings
does as well as re-embedding the joined audio, and EER falls with every doubling of speech).

``CallDecision`` is an explicit state machine (in the style of h11): every window moves it by one
transition, and each transition is a ``Verdict``; an ``Alert`` is raised on entering MISMATCH only.

    WARMING_UP ──(net speech ≥ min)──▶ VERIFIED ◀──────────────────────────┐
         │                               │  ▲                            │ llr ≥ match_llr
         │                 llr < alert_llr │  │ llr ≥ match_llr          │ (recovery)
         └───────────────────────────▶ SUSPECT ──(confirmations)──▶ MISMATCH ─▶ Alert, once

Between ``alert_llr`` and ``match_llr`` the state holds (hysteresis), so a score that wobbles around one
threshold does not flap. One noisy window never pages: MISMATCH needs ``confirmations`` windows below
``alert_llr`` with no verified window in between (windows in the band neither count nor reset). After
an alert, a new alert for the same call needs the evidence to recover to VERIFIED first (a new
takeover), and ``cooldown_seconds`` of speech since the last alert.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from verifier.calibration import Calibration
from verifier.pipeline import VadConfig, combine_embeddings
from verifier.scoring import cosine

# Live calls use webrtcvad's mode 2, part of the setting the takeover sweep chose: on agent channels with
# line noise between turns it keeps more noise out of the evidence; files (one speaker, little silence)
# do slightly better with mode 1 (benchmarks/accuracy.py).
LIVE_VAD = VadConfig(aggressiveness=2)


class State(StrEnum):
    WARMING_UP = "warming_up"  # not enough net speech for any verdict
    VERIFIED = "verified"
    SUSPECT = "suspect"  # evidence says another speaker, not yet confirmed
    MISMATCH = "mismatch"  # confirmed: an alert was raised


@dataclass(frozen=True)
class DecisionPolicy:
    # Chosen from the sweep of benchmarks/takeover.py (README, "Takeover detection"): of 1080 settings,
    # the fewest false alerts on the tuning split, then the most takeovers caught within 6 s; the
    # held-out split agrees (1 false alert per hour of speech on both).
    evidence_seconds: float = 9.0  # net agent speech the evidence spans
    min_net_speech: float = 3.0  # before any verdict
    match_llr: float = 1.0  # evidence LLR at or above which the agent is verified
    alert_llr: float = -4.0  # evidence LLR below which the window counts against the agent
    confirmations: int = 3  # windows below alert_llr, with no verified one between, before an alert
    cooldown_seconds: float = 60.0  # net speech between two alerts of one call

    def __post_init__(self) -> None:
        if self.alert_llr > self.match_llr:
            raise ValueError("alert_llr must not be above match_llr (the band between is the hysteresis)")
        if self.confirmations < 1 or self.evidence_seconds <= 0 or self.min_net_speech < 0:
            raise ValueError("confirmations ≥ 1, evidence_seconds > 0 and min_net_speech ≥ 0 are needed")


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
    model_id: str

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
            "model_id": self.model_id,
        }


@dataclass(frozen=True)
class Alert:
    """The agent's voice was replaced: raised once per takeover."""

    verdict: WindowVerdict
    impostor_since: float  # media time of the first window that counted against the agent


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
        self, voiceprint: np.ndarray, calibration: Calibration, model_id: str, policy: DecisionPolicy
    ) -> None:
        self.voiceprint = np.asarray(voiceprint, dtype=np.float32)
        self.calibration = calibration
        self.model_id = model_id
        self.policy = policy
        self.evidence = Evidence(policy.evidence_seconds)
        self.state = State.WARMING_UP
        self._below = 0  # windows below alert_llr since the last verified one
        self._suspect_since: float | None = None
        self._speech_total = 0.0
        self._last_alert_at: float | None = None  # in total net speech

    def observe(
        self, embedding: np.ndarray, speech_seconds: float, start: float, end: float
    ) -> tuple[WindowVerdict, Alert | None]:
        """One more window of agent speech → the verdict after it, and an alert if this one raised it."""
        self.evidence.add(embedding, speech_seconds, start, end)
        self._speech_total += speech_seconds
        net = self.evidence.net_speech
        score = cosine(self.voiceprint, self.evidence.combined())
        llr = float(self.calibration.llr(score, net))
        alert = None
        if self._speech_total >= self.policy.min_net_speech:
            alert = self._step(llr, start)
        media_start, media_end = self.evidence.span
        verdict = WindowVerdict(
            state=self.state,
            score=score,
            llr=llr,
            threshold=float(self.calibration.threshold(net, self.policy.match_llr)),
            net_speech_seconds=net,
            media_start=media_start,
            media_end=media_end,
            window_score=cosine(self.voiceprint, embedding),
            model_id=self.model_id,
        )
        return verdict, (Alert(verdict, alert) if alert is not None else None)

    def _step(self, llr: float, window_start: float) -> float | None:
        """One transition; returns the impostor's start time when this window raises an alert."""
        policy = self.policy
        if llr >= policy.match_llr:
            self._below = 0
            self._suspect_since = None
            self.state = State.VERIFIED
            return None
        if llr >= policy.alert_llr:
            if self.state is State.WARMING_UP:
                self.state = State.SUSPECT  # a first verdict in the band: not verified
            return None  # the hysteresis band: hold
        self._below += 1
        if self._suspect_since is None:
            self._suspect_since = window_start
        if self.state is State.MISMATCH:
            return None  # already alerted for this takeover
        if self._below < policy.confirmations:
            self.state = State.SUSPECT
            return None
        cooled = (
            self._last_alert_at is None or self._speech_total - self._last_alert_at >= policy.cooldown_seconds
        )
        if not cooled:
            self.state = State.SUSPECT
            return None
        self.state = State.MISMATCH
        self._last_alert_at = self._speech_total
        return self._suspect_since
