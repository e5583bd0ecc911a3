"""Front ends: 16 kHz float samples in [-1, 1] → (frames, bins) float32 features for a model."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from verifier.models.spec import FrontendSpec

_PREEMPHASIS = 0.97
_LOW_HZ = 20.0  # Kaldi's default lowest mel edge; the highest is the Nyquist frequency
_LOG_FLOOR = float(np.finfo(np.float32).eps)  # Kaldi floors energies at FLT_EPSILON before the log


def _mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


@lru_cache(maxsize=8)
def _fbank_tables(
    sample_rate: int, frame_length: int, num_bins: int
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The povey window (with the 16-bit scale folded in), the FFT size, and the mel filterbank as its two
    slopes: the FFT bins used, how far up its rising slope each lies, and where each mel bin's bins begin."""
    fft_size = 1 << (frame_length - 1).bit_length()
    n = np.arange(frame_length)
    # Kaldi works on 16-bit sample values: the 32768 is applied with the window (the FFT is linear).
    window = (0.5 - 0.5 * np.cos(2 * np.pi * n / (frame_length - 1))) ** 0.85 * 32768.0
    low, high = _mel(_LOW_HZ), _mel(sample_rate / 2)
    step = (high - low) / (num_bins + 1)  # mel bin b rises from low + b·step to its peak one step up
    # Where each FFT bin below Nyquist lies, in steps from the lowest edge (Kaldi leaves out the Nyquist bin).
    position = (_mel(np.arange(fft_size // 2) * sample_rate / fft_size) - low) / step
    used = np.flatnonzero((position > 0) & (position < num_bins + 1))
    slope = np.floor(position[used]).astype(np.int64)  # on the rise of bin `slope`, the fall of `slope - 1`
    rise = position[used] - slope
    starts = np.searchsorted(slope, np.arange(num_bins + 2))  # FFT bins of slope k: starts[k]:starts[k+1]
    return window, fft_size, used, rise, starts[:-1], starts[:-1] == starts[1:]


def kaldi_fbank(samples: np.ndarray, spec: FrontendSpec, sample_rate: int = 16000) -> np.ndarray:
    """Kaldi's log mel filterbank (what CAM++ was trained on), before mean normalisation: frames of
    ``frame_length_ms`` every ``frame_shift_ms``, edges snipped, no dither; per frame the DC offset removed,
    pre-emphasis 0.97, the povey window, the power spectrum (FFT size the next power of two), triangular
    mel filters (1127 ln(1 + f/700)) from 20 Hz to Nyquist, the log floored at FLT_EPSILON.

    Written with numpy on whole windows (kaldi-native-fbank, frame by frame in float32, is the parity
    reference in tests/test_features.py): about 3× faster (``benchmarks/embed_speed.py``'s front-end
    column: 0.36–0.54 against 1.21–1.30 ms per second of audio).
    """
    frame_length = round(sample_rate * spec.frame_length_ms / 1000)
    frame_shift = round(sample_rate * spec.frame_shift_ms / 1000)
    window, fft_size, used, rise, starts, empty = _fbank_tables(sample_rate, frame_length, spec.num_bins)
    samples = np.asarray(samples, dtype=np.float64)
    if len(samples) < frame_length:
        return np.zeros((0, spec.num_bins), dtype=np.float32)
    count = 1 + (len(samples) - frame_length) // frame_shift
    frames = np.lib.stride_tricks.sliding_window_view(samples, frame_length)[::frame_shift][:count]
    centred = frames - frames.mean(axis=1, keepdims=True)
    emphasised = np.empty_like(centred)
    np.subtract(centred[:, 1:], _PREEMPHASIS * centred[:, :-1], out=emphasised[:, 1:])
    np.multiply(centred[:, 0], 1 - _PREEMPHASIS, out=emphasised[:, 0])  # Kaldi: x[0] - 0.97·x[0]
    emphasised *= window
    spectrum = np.fft.rfft(emphasised, fft_size)[:, used]
    power = np.square(spectrum.real)
    power += np.square(spectrum.imag)
    # The filterbank is sparse (each FFT bin lies on one mel bin's rise and the previous bin's fall), so
    # the weighted sums are segment sums, not a dense matrix product. A zero column at the end keeps every
    # segment start a valid index; an empty segment sums to nothing.
    rising = np.zeros((count, len(used) + 1))
    np.multiply(power, rise, out=rising[:, :-1])
    falling = np.zeros_like(rising)
    np.subtract(power, rising[:, :-1], out=falling[:, :-1])
    rises = np.add.reduceat(rising, starts, axis=1)
    falls = np.add.reduceat(falling, starts, axis=1)
    rises[:, empty] = 0.0
    falls[:, empty] = 0.0
    energies = rises[:, : spec.num_bins] + falls[:, 1 : spec.num_bins + 1]
    return np.log(np.maximum(energies, _LOG_FLOOR)).astype(np.float32)


def compute_features(samples: np.ndarray, spec: FrontendSpec, sample_rate: int = 16000) -> np.ndarray:
    """The model's input features for one window, mean-normalised if the spec says so."""
    if spec.kind == "kaldi_fbank":
        features = kaldi_fbank(samples, spec, sample_rate)
    elif spec.kind == "ge2e_mel":
        from verifier.models.ge2e import ge2e_mel  # the GE2E front end lives with its model

        features = ge2e_mel(samples)
    else:  # pragma: no cover - FrontendSpec.kind is a closed set
        raise ValueError(f"unknown front end {spec.kind!r}")
    if spec.mean_normalise and len(features):
        features = features - features.mean(axis=0, keepdims=True)
    return features.astype(np.float32, copy=False)
