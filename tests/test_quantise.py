"""The INT8 CAM++: built at provisioning from the float model and the shipped activation ranges, its
embeddings close to the float model's on real telephone speech; ranges that do not fit are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from verifier.audio import read_audio, resample
from verifier.embedder import Embedder
from verifier.errors import ModelError
from verifier.models import provision
from verifier.models.quantise import quantise
from verifier.models.registry import CAMPPLUS, CAMPPLUS_INT8, get_spec


@pytest.fixture(scope="module")
def int8_model() -> Path:
    return provision.ensure_model(CAMPPLUS_INT8)


def test_the_int8_model_is_built_from_the_shipped_ranges(int8_model: Path) -> None:
    assert get_spec("campplus-int8") is CAMPPLUS_INT8
    graph = onnx.load(str(int8_model)).graph
    float_convs = sum(
        n.op_type == "Conv" for n in onnx.load(str(provision.ensure_model(CAMPPLUS))).graph.node
    )
    quantised = sum(n.op_type == "QLinearConv" for n in graph.node)
    assert quantised >= 0.95 * float_convs
    card = provision.read_card(CAMPPLUS_INT8)
    assert card is not None and card.id == CAMPPLUS_INT8.id
    assert card.source.endswith(f"quantised to INT8 with {CAMPPLUS_INT8.id}.ranges.json")
    assert card.calibration is not None  # its own score calibration, fitted on its own scores
    assert card.calibration != provision.read_card(CAMPPLUS).calibration


def test_int8_embeddings_are_close_to_the_float_models(int8_model: Path, telephone_devset: Path) -> None:
    recordings = sorted((telephone_devset / "wav").glob("*/*.wav"))[::15][:12]
    windows = []
    for path in recordings:
        audio = read_audio(path)
        samples = resample(audio.samples, audio.sample_rate)
        windows.append(samples[: 3 * 16000])
    float_embeddings = Embedder.load(CAMPPLUS.id).embed_batch(windows)
    int8_embeddings = Embedder.load(CAMPPLUS_INT8.id).embed_batch(windows)
    same_window = np.sum(float_embeddings * int8_embeddings, axis=1)
    # Closer to its float twin than any two different recordings are to each other.
    across = float_embeddings @ float_embeddings.T
    nearest_other = np.max(across - 2 * np.eye(len(windows)), axis=1)
    assert np.all(same_window > nearest_other), (same_window, nearest_other)
    assert np.median(same_window) > 0.9


def test_ranges_that_do_not_name_the_graph_are_refused(tmp_path: Path) -> None:
    shipped = json.loads(provision.quantisation_ranges(CAMPPLUS_INT8).read_text())
    shipped["data"] = {f"renamed/{name}": value for name, value in shipped["data"].items()}
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps(shipped))
    with pytest.raises(ModelError, match="do not fit this graph"):
        quantise(provision.ensure_model(CAMPPLUS), ranges, tmp_path / "model.onnx")
    with pytest.raises(ModelError, match="missing"):
        quantise(provision.ensure_model(CAMPPLUS), tmp_path / "absent.json", tmp_path / "model.onnx")
