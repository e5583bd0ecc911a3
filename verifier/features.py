"""Front ends: 16 kHz float samples in [-1, 1] → (frames, bins) float32 features for a model."""

from __future__ import annotations

import kaldi_native_fbank as knf
import numpy as np

from verifier.models.spec import FrontendSpec


def kaldi_fbank(samples: np.ndarray, spec: FrontendSpec, sample_rate: int = 16000) -> np.ndarray:
    """Kaldi-compatible log mel filterbank (what CAM++ was trained on), before mean normalisation.

    Kaldi works on 16-bit sample values, so the waveform is scaled by 32768 first.
    """
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = sample_rate
    options.frame_opts.frame_length_ms = spec.frame_length_ms
    options.frame_opts.frame_shift_ms = spec.frame_shift_ms
    options.frame_opts.dither = 0.0
    options.frame_opts.snip_edges = True
    options.frame_opts.window_type = "povey"
    options.frame_opts.preemph_coeff = 0.97
    options.mel_opts.num_bins = spec.num_bins
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(sample_rate, np.asarray(samples, dtype=np.float32) * 32768.0)
    fbank.input_finished()
    frames = [fbank.get_frame(i) for i in range(fbank.num_frames_ready)]
    return np.asarray(frames, dtype=np.float32).reshape(len(frames), spec.num_bins)


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
