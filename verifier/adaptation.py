"""Updating a voiceprint from the agent's own verified calls (opt-in per tenant).

A voiceprint made from 10-20 s of enrolment speech, often over another line, knows the agent less well
than hours of their calls could. But a voiceprint that learns from calls can be taught the wrong voice,
so a call updates it only when nothing in it doubts the agent:

* the call was confidently verified throughout: after its first VERIFIED verdict, every verdict is
  VERIFIED with an evidence LLR of at least ``min_evidence_llr`` (a takeover the CUSUM has not yet
  alerted on still drags the evidence down), and the CUSUM's impostor evidence never left zero;
* it holds at least ``min_call_speech_seconds`` of such speech (windows before the first verdict are
  not used: they were not verified yet);
* updates together never outweigh the enrolment: the calls' share of the voiceprint's weight is at most
  ``max_adapted_share``, so the enrolment always keeps the rest, whatever the calls were.

The new voiceprint is the speech-weighted mean of the old one (weighted by the enrolment's net speech
plus the speech of earlier updates) and the call's window embeddings, back to unit length: the same
average ``combine_embeddings`` makes of windows. Re-enrolling starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from verifier.embedder import l2_normalise


@dataclass(frozen=True)
class UpdatePolicy:
    min_call_speech_seconds: float = 30.0
    min_evidence_llr: float = 3.0
    max_adapted_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_adapted_share < 1.0 or self.min_call_speech_seconds <= 0:
            raise ValueError("0 <= max_adapted_share < 1 and min_call_speech_seconds > 0 are needed")


DEFAULT_UPDATE_POLICY = UpdatePolicy()


@dataclass(frozen=True)
class CallMaterial:
    """What a call may add to its agent's voiceprint: the speech-weighted mean of its verified windows."""

    embedding: np.ndarray
    speech_seconds: float


class UpdateMaterial:
    """Collects a call's verified windows as verdicts come; any doubt disqualifies the whole call."""

    def __init__(self, policy: UpdatePolicy = DEFAULT_UPDATE_POLICY) -> None:
        self.policy = policy
        self._sum: np.ndarray | None = None
        self._seconds = 0.0
        self._verified = False
        self.doubt: str | None = None  # why the call may not update the voiceprint

    def add(
        self, embedding: np.ndarray, speech_seconds: float, verified: bool, llr: float, impostor: float
    ) -> None:
        """One window and the verdict after it."""
        if self.doubt is not None:
            return
        if impostor > 0.0 and self._verified:
            self.doubt = "the impostor evidence rose during the call"
        elif self._verified and not verified:
            self.doubt = "the call left VERIFIED"
        elif verified and llr < self.policy.min_evidence_llr:
            self.doubt = f"the evidence fell below {self.policy.min_evidence_llr:g} (LLR)"
        if self.doubt is not None:
            return
        if verified:
            if self._verified:  # the window that reached the first verdict is not yet verified speech
                weighted = l2_normalise(np.asarray(embedding, dtype=np.float64)) * speech_seconds
                self._sum = weighted if self._sum is None else self._sum + weighted
                self._seconds += speech_seconds
            self._verified = True

    def result(self) -> CallMaterial | str:
        """The call's material, or why there is none."""
        if self.doubt is not None:
            return self.doubt
        if self._sum is None or self._seconds < self.policy.min_call_speech_seconds:
            return (
                f"{self._seconds:.0f} s of verified speech; {self.policy.min_call_speech_seconds:g} s needed"
            )
        return CallMaterial(l2_normalise(self._sum / self._seconds).astype(np.float32), self._seconds)


def updated_voiceprint(
    vector: np.ndarray,
    enrolled_seconds: float,
    adapted_seconds: float,
    material: CallMaterial,
    policy: UpdatePolicy = DEFAULT_UPDATE_POLICY,
) -> tuple[np.ndarray, float] | None:
    """The voiceprint with the call averaged in, and the calls' seconds in it now; None when the calls'
    share is already at ``max_adapted_share``. The call counts with at most the seconds that keep it so."""
    allowed = policy.max_adapted_share / (1.0 - policy.max_adapted_share) * enrolled_seconds - adapted_seconds
    weight = min(material.speech_seconds, allowed)
    if weight <= 0.0:
        return None
    old_weight = enrolled_seconds + adapted_seconds
    mixed = np.asarray(vector, dtype=np.float64) * old_weight + material.embedding * weight
    return l2_normalise(mixed).astype(np.float32), adapted_seconds + weight
