"""One live call, without I/O: who the agent is, its audio chain, its decision, and what to publish.

The gateway owns the sockets, Redis and the embedder; it feeds a ``CallSession`` what happened (the
call started, agent audio arrived, a window was embedded, an agent was bound) and publishes what the
session returns (``Output``s). Until an agent is bound the session keeps the embeddings of up to
``unbound_speech_seconds`` of agent speech and reports "agent unknown"; binding replays them into the
new agent's decision. A transfer (a new agent mid-call) starts a new decision: evidence never mixes
two agents.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import numpy as np

from streamer.protocols.events import AudioChunk, CallStarted
from streamer.store import Voiceprint
from verifier.calibration import Calibration
from verifier.decision import LIVE_VAD, CallDecision, DecisionPolicy, WindowVerdict
from verifier.enrolment import front_end_difference
from verifier.pipeline import VadConfig
from verifier.stream import AgentAudio
from verifier.vad import SpeechWindow


class CallState(StrEnum):
    AGENT_UNKNOWN = "agent_unknown"  # no agent bound yet: speech is buffered
    WARMING_UP = "warming_up"
    VERIFIED = "verified"
    SUSPECT = "suspect"
    MISMATCH = "mismatch"
    NOT_ENROLLED = "not_enrolled"  # the agent has no voiceprint: nothing to verify against
    MODEL_MISMATCH = "model_mismatch"  # the voiceprint is another model's
    ENDED = "ended"


@dataclass(frozen=True)
class Output:
    """Something to publish: ``kind`` is alert | notice | verdict | call (see streamer/feeds.py)."""

    kind: str
    data: dict[str, Any]


@dataclass
class CallSession:
    tenant: str
    call_id: str
    protocol: str
    model_id: str
    calibration: Calibration
    policy: DecisionPolicy = field(default_factory=DecisionPolicy)
    vad: VadConfig = field(default_factory=lambda: LIVE_VAD)
    unbound_speech_seconds: float = 60.0
    site: str | None = None
    agent_id: str | None = None
    agent_channel: int | None = None
    state: CallState = CallState.AGENT_UNKNOWN
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    audio: AgentAudio | None = None
    decision: CallDecision | None = None
    alerts: int = 0
    net_speech_seconds: float = 0.0
    last_verdict: WindowVerdict | None = None
    _format: CallStarted | None = None
    _too_noisy_before: int = 0  # windows_too_noisy of agent audio chains replaced by a channel change
    _unbound: deque[tuple[SpeechWindow, np.ndarray]] = field(default_factory=deque)

    # --- audio ----------------------------------------------------------------------------------
    def start(self, started: CallStarted) -> None:
        self._format = started
        if self.agent_channel is None:
            self.agent_channel = started.agent_channel
        self.audio = self._new_audio()

    def _new_audio(self) -> AgentAudio:
        assert self._format is not None
        fmt = self._format
        channel = self.agent_channel if fmt.channels > 1 else None
        return AgentAudio(fmt.encoding, fmt.sample_rate, fmt.channels, channel, self.vad)

    def feed(self, chunk: AudioChunk) -> list[SpeechWindow]:
        if not chunk.is_agent or self.audio is None or self.state in _TERMINAL:
            return []
        return self.audio.feed(chunk.payload)

    def gap(self, seconds: float) -> list[SpeechWindow]:
        return [] if self.audio is None else self.audio.feed_silence(seconds)

    @property
    def windows_too_noisy(self) -> int:
        """Speech windows of this call not scored: too little above the line's noise floor."""
        return self._too_noisy_before + (self.audio.windows_too_noisy if self.audio is not None else 0)

    def finish(self) -> list[SpeechWindow]:
        """The last open window, at the end of the call."""
        return [] if self.audio is None or self.state in _TERMINAL else self.audio.flush()

    # --- the agent ------------------------------------------------------------------------------
    def bind(
        self,
        agent_id: str,
        voiceprint: Voiceprint | None,
        agent_channel: int | None = None,
        mean: np.ndarray | None = None,
    ) -> list[Output]:
        """An agent for this call (first time, or a transfer); ``voiceprint`` None: not enrolled.
        ``mean``: the tenant's other voiceprints' mean to centre scores on (verifier/score_norm.py)."""
        outputs = []
        changed = agent_id != self.agent_id
        self.agent_id = agent_id
        if agent_channel is not None and agent_channel != self.agent_channel:
            self.agent_channel = agent_channel
            if self._format is not None and self._format.channels > 1:
                self._too_noisy_before = self.windows_too_noisy
                self.audio = self._new_audio()  # another channel: its windows start afresh
                self._unbound.clear()
        if voiceprint is None:
            self.decision = None
            self.state = CallState.NOT_ENROLLED
            return [
                self._notice("agent_not_enrolled", f"agent {agent_id!r} has no voiceprint in this tenant")
            ]
        if voiceprint.model_id != self.model_id:
            self.decision = None
            self.state = CallState.MODEL_MISMATCH
            return [
                self._notice(
                    "model_mismatch",
                    f"agent {agent_id!r} was enrolled with {voiceprint.model_id}, the gateway runs "
                    f"{self.model_id}: re-embed the tenant's voiceprints (vpmon reembed)",
                )
            ]
        if changed or self.decision is None:
            self.decision = CallDecision(
                voiceprint.vector, self.calibration, self.model_id, self.policy, mean
            )
            self.state = CallState.WARMING_UP
            self.site = voiceprint.site
            outputs.append(Output("call", self.describe()))
            # Another front end's voiceprint is still verified, with a notice (not MODEL_MISMATCH): on
            # the takeover benchmark, voiceprints enrolled without the narrowband fill, on calls with it,
            # at the default policy caught as many takeovers with no more false alerts than re-enrolled
            # ones, but put more genuine windows in SUSPECT (benchmarks/results/takeover-old-voiceprints
            # .json); re-enrolling gains the fill's accuracy.
            difference = front_end_difference(voiceprint.quality, self.vad)
            if difference is not None:
                outputs.append(
                    self._notice(
                        "voiceprint_front_end",
                        f"agent {agent_id!r}'s voiceprint was made with another front end ({difference}): "
                        "verifying with it, less accurately; re-enrol the agent or re-embed the tenant's "
                        "voiceprints (vpmon reembed)",
                    )
                )
        # Speech heard before anyone was bound counts for the first agent only (a transfer resets).
        while self._unbound:
            window, embedding = self._unbound.popleft()
            outputs += self._observe(window, embedding)
        return outputs

    # --- verdicts -------------------------------------------------------------------------------
    def observe(self, window: SpeechWindow, embedding: np.ndarray) -> list[Output]:
        """An embedded window of agent speech → verdicts (and at most one alert)."""
        if self.state in _TERMINAL or self.state in (CallState.NOT_ENROLLED, CallState.MODEL_MISMATCH):
            return []
        self.net_speech_seconds += window.speech_seconds
        if self.decision is None:
            self._unbound.append((window, embedding))
            while sum(w.speech_seconds for w, _ in self._unbound) > self.unbound_speech_seconds:
                self._unbound.popleft()
            return [Output("verdict", {**self._ids(), "state": CallState.AGENT_UNKNOWN.value})]
        return self._observe(window, embedding)

    def _observe(self, window: SpeechWindow, embedding: np.ndarray) -> list[Output]:
        assert self.decision is not None
        verdict, alert = self.decision.observe(embedding, window.speech_seconds, window.start, window.end)
        self.last_verdict = verdict
        self.state = CallState(verdict.state.value)
        outputs = [Output("verdict", {**self._ids(), **verdict.to_dict()})]
        if alert is not None:
            self.alerts += 1
            outputs.append(
                Output(
                    "alert",
                    {
                        **self._ids(),
                        "alert_id": f"{self.call_id}:{self.alerts}",
                        "kind": "takeover",
                        "impostor_since": round(alert.impostor_since, 2),
                        **alert.verdict.to_dict(),
                    },
                )
            )
        return outputs

    def end(self, reason: str) -> Output:
        self.state = CallState.ENDED
        return Output("call", {**self.describe(), "ended_reason": reason})

    # --- describing -----------------------------------------------------------------------------
    def _ids(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "call_id": self.call_id,
            "agent_id": self.agent_id,
            "site": self.site,
            "protocol": self.protocol,
            "model_id": self.model_id,
        }

    def _notice(self, kind: str, message: str) -> Output:
        return Output(
            "notice", {**self._ids(), "kind": kind, "message": message, "alert_id": f"{self.call_id}:{kind}"}
        )

    def describe(self) -> dict[str, Any]:
        """The call's current state, as the live list shows it."""
        verdict = self.last_verdict
        return {
            **self._ids(),
            "state": self.state.value,
            "started_at": self.started_at,
            "net_speech_seconds": round(self.net_speech_seconds, 2),
            "score": None if verdict is None else round(verdict.score, 4),
            "threshold": None if verdict is None else round(verdict.threshold, 4),
            "alerts": self.alerts,
        }


_TERMINAL = (CallState.ENDED,)
