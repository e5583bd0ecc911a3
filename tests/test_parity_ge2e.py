"""GE2E: our ONNX graph and numpy front end against Resemblyzer's own code running on torch and librosa.

The reference is the real ``VoiceEncoder`` class imported from the unpacked ``resemblyzer`` wheel, with
its real weights; the audio is speech synthesised by espeak-ng.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import soxr

from tests.helpers import missing, reference_module
from verifier.models.ge2e import (
    EMBEDDING_DIM,
    MIN_COVERAGE,
    N_MELS,
    PARTIAL_RATE,
    build_ge2e_onnx,
    ge2e_mel,
)
from verifier.models.torch_weights import load_state_dict

pytestmark = pytest.mark.parity

LENGTHS = (160, 50, 400)  # the trained partial length, shorter and longer
BATCH = 3


@pytest.fixture(scope="module")
def wheel_dir(resemblyzer_wheel: Path) -> Path:
    return resemblyzer_wheel


@pytest.fixture(scope="module")
def reference(wheel_dir: Path) -> Iterator[Any]:
    """Resemblyzer's VoiceEncoder on CPU, imported from the wheel tree (needs torch, librosa, webrtcvad)."""
    torch = reference_module("torch", "torch==2.13.0")
    reference_module("librosa", "librosa")
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(wheel_dir))
        with warnings.catch_warnings():
            # resemblyzer/audio.py imports from scipy.ndimage.morphology, deprecated since SciPy 1.8.
            warnings.simplefilter("ignore", DeprecationWarning)
            voice_encoder = importlib.import_module("resemblyzer.voice_encoder")
        weights = wheel_dir / "resemblyzer" / "pretrained.pt"
        yield voice_encoder.VoiceEncoder("cpu", verbose=False, weights_fpath=weights).eval()


@pytest.fixture(scope="module")
def session(wheel_dir: Path) -> ort.InferenceSession:
    model = build_ge2e_onnx(load_state_dict(wheel_dir / "resemblyzer" / "pretrained.pt", key="model_state"))
    assert [i.name for i in model.graph.input] == ["mels"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """About 6 s of synthetic English at 16 kHz (espeak-ng writes 22.05 kHz; soxr resamples)."""
    if shutil.which("espeak-ng") is None:
        missing("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = tmp_path_factory.mktemp("ge2e") / "speech.wav"
    text = "The quick brown fox jumps over the lazy dog, and then it runs back home across the green field."
    subprocess.run(["espeak-ng", "-v", "en", "-w", str(wav), text], check=True, capture_output=True)
    samples, rate = sf.read(wav, dtype="float32")
    return soxr.resample(samples, rate, 16000).astype(np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("frames", LENGTHS)
def test_onnx_matches_voice_encoder(
    frames: int, reference: Any, session: ort.InferenceSession, speech: Any
) -> None:
    torch = reference_module("torch", "torch==2.13.0")
    mel = ge2e_mel(speech)
    assert mel.shape[0] >= (BATCH - 1) * 37 + frames
    # BATCH windows of real speech at different offsets, so the rows of the batch differ.
    mels = np.stack([mel[i * 37 : i * 37 + frames] for i in range(BATCH)])
    ours = session.run(["embedding"], {"mels": mels})[0]
    with torch.no_grad():
        expected = reference(torch.from_numpy(mels)).numpy()
    assert ours.shape == (BATCH, EMBEDDING_DIM)
    assert np.abs(ours - expected).max() <= 1e-4
    assert _cosines(ours, expected).min() >= 0.99999
    assert not np.allclose(ours[0], ours[1])  # the rows are really different inputs


def test_utterance_pipeline_matches_embed_utterance(
    reference: Any, session: ort.InferenceSession, speech: np.ndarray
) -> None:
    """Front end + partials + network together, against Resemblyzer's own embed_utterance."""
    expected, expected_partials, wav_slices = reference.embed_utterance(
        speech, return_partials=True, rate=PARTIAL_RATE, min_coverage=MIN_COVERAGE
    )
    _, mel_slices = reference.compute_partial_slices(len(speech), PARTIAL_RATE, MIN_COVERAGE)
    padded = np.pad(speech, (0, max(0, wav_slices[-1].stop - len(speech))))
    mel = ge2e_mel(padded)
    partials = session.run(["embedding"], {"mels": np.stack([mel[s] for s in mel_slices])})[0]
    assert partials.shape == expected_partials.shape and len(partials) > 1
    assert _cosines(partials, expected_partials).min() >= 0.99999
    mean = partials.mean(axis=0)
    assert float(mean @ expected / np.linalg.norm(mean)) >= 0.99999


def test_ge2e_mel_matches_librosa(speech: np.ndarray) -> None:
    librosa = reference_module("librosa", "librosa")
    expected = librosa.feature.melspectrogram(y=speech, sr=16000, n_fft=400, hop_length=160, n_mels=N_MELS).T
    ours = ge2e_mel(speech)
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (1 + len(speech) // 160, N_MELS)
    # librosa works in float32, we in float64: agreement to a few float32 ulps, relative to each value
    # (a tiny absolute floor covers bins that are exactly zero in digital silence).
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-9 * float(expected.max()))


@pytest.mark.parametrize("length", [0, 1, 159, 160, 161, 400, 16000])
def test_ge2e_mel_frame_count_and_edges_match_librosa(length: int) -> None:
    librosa = reference_module("librosa", "librosa")
    noise = (0.1 * np.random.default_rng(length).standard_normal(length)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # librosa warns that n_fft > len(y) for tiny inputs
        expected = librosa.feature.melspectrogram(
            y=noise, sr=16000, n_fft=400, hop_length=160, n_mels=N_MELS
        ).T
    ours = ge2e_mel(noise)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-9 * max(float(expected.max()), 1e-30))
