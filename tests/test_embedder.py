"""The Embedder on the real models: batching changes nothing, windows are handled as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from verifier.embedder import Embedder, partial_slices
from verifier.errors import AudioError
from verifier.pipeline import load_speech


@pytest.fixture(scope="module")
def speech(telephone_devset: Path) -> np.ndarray:
    return load_speech(telephone_devset / "wav" / "librivox_ss01" / "01.wav")


@pytest.mark.parametrize("model", ["campplus", "ge2e"])
def test_batch_equals_one_by_one(model: str, speech: np.ndarray, request) -> None:
    embedder: Embedder = request.getfixturevalue(model)
    # windows of several lengths, two of them equal so that they share a batch
    windows = [speech[:48000], speech[8000:56000], speech[:16000], speech[:27000], speech[:9000]]
    batched = embedder.embed_batch(windows)
    single = np.stack([embedder.embed_batch([w])[0] for w in windows])
    assert batched.shape == (5, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_bucketing_crops_at_most_one_bucket(campplus: Embedder, speech: np.ndarray) -> None:
    # 1.37 s → 135 fbank frames → cropped to 130; the same as giving it 1.32 s (130 frames)
    (features,) = campplus._model_inputs(speech[:21920])
    assert len(features) == 130
    a = campplus.embed_batch([speech[:21920]])[0]
    b = campplus.embed_batch([speech[:21120]])[0]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_long_audio_is_split_and_averaged(campplus: Embedder, speech: np.ndarray) -> None:
    long = np.tile(speech, int(np.ceil(25 * 16000 / len(speech))))[: 25 * 16000]  # 25 s > 10 s maximum
    pieces = campplus._pieces(long)
    assert len(pieces) == 3 and max(len(p) for p in pieces) <= campplus.max_samples
    embedding = campplus.embed_batch([long])[0]
    expected = campplus.embed_batch(pieces)
    assert np.dot(embedding, expected.mean(axis=0) / np.linalg.norm(expected.mean(axis=0))) > 0.999


def test_too_short_window_is_refused(campplus: Embedder, speech: np.ndarray) -> None:
    with pytest.raises(AudioError, match=r"shorter than the 0\.5 s"):
        campplus.embed_batch([speech[:4000]])


def test_ge2e_partials_follow_resemblyzer_rules() -> None:
    # 1.6 s partials every 77 frames (rate 1.3/s); the last one kept only if 75 % covered
    assert partial_slices(160, 160, 77, 0.75) == [slice(0, 160)]
    assert partial_slices(50, 160, 77, 0.75) == [slice(0, 160)]  # never fewer than one
    slices = partial_slices(400, 160, 77, 0.75)
    assert [s.start for s in slices] == [0, 77, 154, 231]
    assert all(s.stop - s.start == 160 for s in slices)


def test_same_speaker_scores_higher_than_another(campplus: Embedder, telephone_devset: Path) -> None:
    wav = telephone_devset / "wav"
    a1, a2 = (load_speech(wav / "librivox_ss01" / f"0{i}.wav") for i in (1, 2))
    b1 = load_speech(wav / "warzone_narrator" / "01.wav")
    e_a1, e_a2, e_b1 = campplus.embed_batch([a1[:48000], a2[:48000], b1[:48000]])
    assert np.dot(e_a1, e_a2) > np.dot(e_a1, e_b1) + 0.2
