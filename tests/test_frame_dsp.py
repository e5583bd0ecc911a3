"""The per-frame DSP of live calls runs on the event loop for every 20 ms of every call, so it uses numpy's
ufuncs directly instead of their Python wrappers (np.clip, np.mean, np.issubdtype). These tests hold the
fast forms to the plain numpy they replace, bit for bit, on long streams in chunks of every size."""

from __future__ import annotations

from collections import deque

import numpy as np

from verifier.audio import PCM16_SCALE, to_pcm16
from verifier.stream import FrameHistory, RunningLevel


class PlainRunningLevel(RunningLevel):
    """RunningLevel with its per-block steps written with np.clip and np.mean, as they were."""

    def _gained(self, frames: np.ndarray, out: np.ndarray) -> None:
        out[:] = np.clip(frames * np.float32(self._gain), -1.0, 1.0)

    @staticmethod
    def _frame_powers(frames: np.ndarray) -> np.ndarray:
        return np.mean(frames.astype(np.float64) ** 2, axis=1)


def speech_like(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Bursts of loud noise (some past full scale once gained) between quiet line noise, at 16 kHz."""
    parts = []
    while sum(len(p) for p in parts) < seconds * 16000:
        loud = rng.random() < 0.6
        length = int(rng.integers(800, 24000))
        level = rng.uniform(0.05, 0.9) if loud else rng.uniform(1e-4, 3e-3)
        parts.append((rng.standard_normal(length) * level).astype(np.float32))
    return np.concatenate(parts)


def test_the_running_level_is_the_plain_numpy_one_bit_for_bit() -> None:
    rng = np.random.default_rng(11)
    audio = speech_like(60.0, rng)
    fast, plain = RunningLevel(), PlainRunningLevel()
    start = 0
    while start < len(audio):
        size = int(rng.choice((1, 37, 160, 320, 321, 1600, 5000)))
        chunk = audio[start : start + size]
        start += size
        np.testing.assert_array_equal(fast.process(chunk), plain.process(chunk))
        assert fast.noise_floor_dbfs == plain.noise_floor_dbfs
    assert fast._gain == plain._gain and fast._gain != 1.0  # the gain moved, identically


def test_frame_history_keeps_the_newest_whatever_the_sizes() -> None:
    rng = np.random.default_rng(5)
    history, reference = FrameHistory(50), deque(maxlen=50)
    for _ in range(2000):
        values = rng.random(int(rng.choice((0, 1, 2, 5, 49, 50, 51, 130))))
        history.extend(values)
        reference.extend(values.tolist())
        assert history.view().tolist() == list(reference)


def test_to_pcm16_is_clip_and_round_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    samples = np.concatenate(
        (
            rng.uniform(-1.5, 1.5, 100_000),
            np.array([-1.0, 1.0, -32768.5 / PCM16_SCALE, 32767.5 / PCM16_SCALE, 0.5 / PCM16_SCALE, 0.0]),
        )
    ).astype(np.float32)
    plain = np.clip(np.rint(samples.astype(np.float64) * PCM16_SCALE), -32768, 32767).astype(np.int16)
    np.testing.assert_array_equal(to_pcm16(samples), plain)
