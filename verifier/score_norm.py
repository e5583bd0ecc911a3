"""Centring scores on the tenant's voiceprints: the channel's share of an embedding, taken out.

Every embedding of a call centre's audio carries what its lines have in common (8 kHz, the codec, the
headsets, the room) as well as who is speaking; that common part raises every cosine, between different
speakers as much as between recordings of one. Subtracting the mean of the tenant's voiceprints before
the cosine removes it (mean-centring, the usual first step of a PLDA or cosine back end: e.g. Garcia-Romero
& Espy-Wilson, Interspeech 2011, for length-normalised i-vectors). The tenant's voiceprints are the
in-domain data a deployment already has: its agents, enrolled over its own lines.

The mean is taken *without* the claimed agent's own voiceprint, so the voiceprint does not pull the mean
towards itself (with few agents it would cancel its own direction): with the tenant's sum ``S`` over
``n`` voiceprints, agent ``a`` is scored in the space centred on ``(S − v_a) / (n − 1)``.

Measured on the telephone dev voices (``benchmarks/accuracy_tried.py``; README "Accuracy"): 3 s EER
5.54 → 4.05 % on the held-out draw with a mean that holds neither trial speaker. Centred cosines are
distributed differently from raw ones, so they have a calibration of their own
(``Calibration.centred``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from verifier.embedder import l2_normalise

# Fewer other voiceprints than this and the mean is mostly a few people's voices, not the channel. On the
# telephone dev voices (benchmarks/accuracy_tried.py, a mean of k other speakers' voiceprints, held-out
# EER % full / 3 s / 1 s; none: 5.54 / 5.54 / 7.57): k = 2 6.35 / 6.32 / 8.82, 4 4.32 / 4.59 / 8.38,
# 8 4.32 / 4.63 / 7.84, 16 3.65 / 4.05 / 6.72: only from 16 is it better at every duration on both draws.
MIN_OTHER_VOICEPRINTS = 16


def centre(vector: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``vector − mean``, back to unit length (float32)."""
    return l2_normalise(np.asarray(vector, dtype=np.float32) - mean)


@dataclass(frozen=True)
class VoiceprintMean:
    """The sum of a tenant's unit voiceprints of one model, and whose they are."""

    model_id: str
    total: np.ndarray  # float64 sum of the unit voiceprints
    speakers: frozenset[str]
    min_others: int = MIN_OTHER_VOICEPRINTS

    @classmethod
    def of(
        cls, model_id: str, vectors: dict[str, np.ndarray], min_others: int = MIN_OTHER_VOICEPRINTS
    ) -> VoiceprintMean:
        """From ``{speaker id: unit voiceprint}`` (any size, including none)."""
        dims = {np.shape(v) for v in vectors.values()}
        if len(dims) > 1:
            raise ValueError(f"voiceprints of different sizes cannot share a mean: {sorted(dims)}")
        total = np.sum([np.asarray(v, dtype=np.float64) for v in vectors.values()], axis=0)
        return cls(model_id, np.atleast_1d(total), frozenset(vectors), min_others)

    @property
    def count(self) -> int:
        return len(self.speakers)

    def for_speaker(self, speaker_id: str, voiceprint: np.ndarray) -> np.ndarray | None:
        """The mean of the *other* voiceprints (float32), or None when there are too few of them."""
        total, count = self.total, self.count
        if speaker_id in self.speakers:
            total, count = total - np.asarray(voiceprint, dtype=np.float64), count - 1
        if count < self.min_others or total.shape != np.shape(voiceprint):
            return None
        return (total / count).astype(np.float32)
