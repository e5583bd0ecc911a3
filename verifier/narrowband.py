"""Narrowband audio for a wideband model: fill the empty band above the telephone line's.

A telephone line carries 300-3400 Hz at 8 kHz; resampled to 16 kHz for CAM++, the band above 4 kHz is
empty (only the resampler's stop-band leakage and rounding). CAM++ was trained on 16 kHz audio, where that
band always holds something, and its log-mel bins there turn near-silence into large, erratic values. A
faint, fixed white noise in that band, about 29 dB below the normalised speech level, gives those bins a
steady floor. On the telephone dev voices this cut the 3 s EER from 6.66 % to about 5.5 % and the 1 s
EER from 9.26 % to about 7.6 % on the held-out draw; on wideband (16 kHz) audio the same fill *hurts*
(2.57 → 3.55 % at 3 s), so it is only for audio that arrived at 8 kHz or less
(``benchmarks/accuracy_tried.py``).

The stage works on speech windows after the VAD (the VAD and the noise-floor estimates see the audio as it
came) and after level normalisation (the fill level is absolute). The noise is the same for every window of
a given length (a fixed seed), so a window always gives the same embedding, offline and live.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np

from verifier.vad import SpeechWindow

SAMPLE_RATE = 16000
EMPTY_BAND_HZ = 3800.0  # the line's band ends below 4 kHz; resampling to 16 kHz leaves nothing above
FILL_LEVEL_DBFS = -55.0  # RMS of the fill; chosen on the tuning draw among -45, -55 and -65 dBFS
NARROWBAND_MAX_RATE = 8000  # audio sampled at this rate or lower has no content above 4 kHz
_SEED = 20261125


def is_narrowband(source_rate: int) -> bool:
    """Whether audio that arrived at ``source_rate`` Hz leaves the band above 4 kHz empty at 16 kHz."""
    if source_rate <= 0:
        raise ValueError(f"a sample rate must be positive, got {source_rate}")
    return source_rate <= NARROWBAND_MAX_RATE


def band_noise(length: int, level_dbfs: float, low_hz: float = EMPTY_BAND_HZ) -> np.ndarray:
    """White noise limited to ``low_hz`` … 8 kHz at ``level_dbfs`` RMS; equal lengths give equal noise.

    Read-only and cached per length: making it costs about as much as 5-10 % of embedding the window
    (1.6 ms for 3 s), and live windows come in a few dozen lengths (whole 30 ms VAD frames, 0.5-3 s)."""
    if length <= 0:
        return np.zeros(0, dtype=np.float32)
    return _band_noise(length, level_dbfs, low_hz)


@lru_cache(maxsize=128)  # at most 128 x 3 s of float32, 25 MB; live calls use at most 84 lengths
def _band_noise(length: int, level_dbfs: float, low_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(np.random.default_rng(_SEED).standard_normal(length))
    spectrum[np.fft.rfftfreq(length, 1 / SAMPLE_RATE) < low_hz] = 0
    band = np.fft.irfft(spectrum, length)
    rms = float(np.sqrt(np.mean(band**2)))
    noise = np.zeros(length, dtype=np.float32)
    if rms > 0.0:  # zero when too short to hold any frequency in the band
        noise = (band * (10 ** (level_dbfs / 20) / rms)).astype(np.float32)
    noise.flags.writeable = False
    return noise


def fill_empty_band(samples: np.ndarray, level_dbfs: float = FILL_LEVEL_DBFS) -> np.ndarray:
    """16 kHz samples with a faint noise floor at ``level_dbfs`` above ``EMPTY_BAND_HZ``."""
    samples = np.asarray(samples, dtype=np.float32)
    return np.clip(samples + band_noise(len(samples), level_dbfs), -1.0, 1.0)


def fill_windows(
    windows: list[SpeechWindow], source_rate: int, level_dbfs: float = FILL_LEVEL_DBFS
) -> list[SpeechWindow]:
    """Speech windows of audio that arrived at ``source_rate`` Hz, filled if that audio was narrowband."""
    if not is_narrowband(source_rate):
        return windows
    return [replace(w, samples=fill_empty_band(w.samples, level_dbfs)) for w in windows]
