"""The Kaldi log mel filterbank (verifier/features.py) against kaldi-native-fbank, the parity reference,
on real telephone speech: the features, and what CAM++ makes of them."""

from __future__ import annotations

from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import pytest

from verifier.embedder import Embedder
from verifier.features import kaldi_fbank
from verifier.models.registry import CAMPPLUS
from verifier.pipeline import load_speech

SPEC = CAMPPLUS.frontend


def reference_fbank(samples: np.ndarray) -> np.ndarray:
    """kaldi-native-fbank with the options CAM++ was trained with (as verifier/features.py documents)."""
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = 16000
    options.frame_opts.frame_length_ms = SPEC.frame_length_ms
    options.frame_opts.frame_shift_ms = SPEC.frame_shift_ms
    options.frame_opts.dither = 0.0
    options.frame_opts.snip_edges = True
    options.frame_opts.window_type = "povey"
    options.frame_opts.preemph_coeff = 0.97
    options.mel_opts.num_bins = SPEC.num_bins
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(16000, np.asarray(samples, dtype=np.float32) * 32768.0)
    fbank.input_finished()
    frames = [fbank.get_frame(i) for i in range(fbank.num_frames_ready)]
    return np.asarray(frames, dtype=np.float32).reshape(len(frames), SPEC.num_bins)


@pytest.fixture(scope="module")
def speeches(telephone_devset: Path) -> list[np.ndarray]:
    return [load_speech(path) for path in sorted((telephone_devset / "wav").glob("*/01.wav"))]


def test_features_match_kaldi_native_fbank(speeches: list[np.ndarray]) -> None:
    differences = []
    for speech in speeches:
        ours, reference = kaldi_fbank(speech, SPEC), reference_fbank(speech)
        assert ours.shape == reference.shape and ours.dtype == np.float32
        differences.append(np.abs(ours - reference).ravel())
    difference = np.concatenate(differences)
    # The reference computes frame by frame in float32, we in float64: they differ where there is almost
    # no energy (below 300 Hz and near 8 kHz on a telephone line), by float32's rounding of tiny powers.
    assert difference.mean() < 2e-3
    assert np.percentile(difference, 99) < 0.05
    assert difference.max() < 0.5


def test_embeddings_of_our_features_match_the_reference_ones(
    speeches: list[np.ndarray], campplus: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    windows = [speech[: 3 * 16000] for speech in speeches if len(speech) >= 16000]
    ours = campplus.embed_batch(windows)
    monkeypatch.setattr(
        "verifier.features.kaldi_fbank", lambda samples, spec, rate=16000: reference_fbank(samples)
    )
    reference = campplus.embed_batch(windows)
    cosines = (ours * reference).sum(axis=1)
    assert len(cosines) >= 10
    assert cosines.min() >= 0.9999


@pytest.mark.parametrize("samples, frames", [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (16000, 98)])
def test_frame_count_snips_edges(samples: int, frames: int) -> None:
    noise = np.random.default_rng(0).normal(0, 0.05, samples).astype(np.float32)
    ours = kaldi_fbank(noise, SPEC)
    assert ours.shape == (frames, SPEC.num_bins)
    if frames:
        np.testing.assert_allclose(ours, reference_fbank(noise), atol=2e-3)


def test_a_tone_peaks_in_its_own_mel_bin() -> None:
    """Independent of the reference: 1 kHz lies in the bin whose triangle peaks nearest 1 kHz."""
    tone = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    mel = lambda hz: 1127 * np.log1p(hz / 700)  # noqa: E731
    peaks = mel(20) + (mel(8000) - mel(20)) / (SPEC.num_bins + 1) * np.arange(1, SPEC.num_bins + 1)
    assert int(np.argmax(kaldi_fbank(tone, SPEC).mean(axis=0))) == int(np.argmin(np.abs(peaks - mel(1000))))
