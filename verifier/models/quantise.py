"""Static INT8 quantisation of a built model, from activation ranges that ship with vpmon.

onnxruntime's static quantisation needs the range of every quantised tensor, measured by running the
float model on representative inputs (calibration). Users have no such audio at install time, so the
ranges are measured once, on the telephone dev voices, by ``benchmarks/quantise.py`` and committed next to
the score calibrations (``verifier/models/calibration/<model id>.ranges.json``, onnxruntime's own
calibration-cache format). Provisioning then quantises deterministically from them: same float model +
same ranges + same onnxruntime = same INT8 model.

The recipe (measured in benchmarks/quantise.py, which also tried the others): only ``Conv`` nodes, with
per-channel signed weights and unsigned activations (U8S8, the format onnxruntime's x86 kernels are
fastest at, using VNNI where the CPU has it), QOperator format (``QLinearConv``); the ranges file says
which calibration measured them.
Quantising the element-wise ops as well (the default) cost about 2 points of EER in an exploratory run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import onnx

from verifier.errors import ModelError

OP_TYPES = ["Conv"]
MIN_QUANTISED_FRACTION = 0.95  # of the float model's Conv nodes; fewer means the ranges do not fit


def quantisation_options(method: str = "MinMax") -> dict:
    """quantize_static's arguments; ``method`` names the calibration that measured the ranges."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return {
        "quant_format": QuantFormat.QOperator,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "per_channel": True,
        "op_types_to_quantize": OP_TYPES,
        "calibrate_method": CalibrationMethod[method],
    }


def ranges_method(ranges: Path) -> str:
    """The calibration method recorded in a ranges file (onnxruntime refuses a cache made otherwise)."""
    try:
        recorded = json.loads(ranges.read_text())["calibration_method"]
        return str(recorded["value"] if isinstance(recorded, dict) else recorded).split(".")[-1]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"the quantisation ranges {ranges} are unreadable ({exc})") from None


def prepare(float_model: Path, out: Path) -> None:
    """onnxruntime's pre-processing (shape inference and graph optimisation) that quantisation expects.
    Symbolic shape inference is skipped: it cannot bound CAM++'s frame-count arithmetic."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(float_model), str(out), skip_symbolic_shape=True)


def quantise(float_model: Path, ranges: Path, out: Path) -> onnx.ModelProto:
    """The INT8 model of ``float_model`` with the activation ranges in ``ranges``, written to ``out``."""
    from onnxruntime.quantization import quantize_static

    if not ranges.is_file():
        raise ModelError(f"the quantisation ranges {ranges} are missing from this vpmon installation")
    with tempfile.TemporaryDirectory(prefix="vpmon-quantise-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        prepare(float_model, prepared)
        convs = sum(node.op_type == "Conv" for node in onnx.load(str(prepared)).graph.node)
        # The ranges are read from the cache file; quantize_static never calibrates when it exists.
        options = quantisation_options(ranges_method(ranges))
        try:
            quantize_static(str(prepared), str(out), None, calibration_cache_path=str(ranges), **options)
        except Exception as exc:  # onnxruntime's quantiser fails with whatever it meets first
            raise ModelError(f"{_misfit(ranges)} ({type(exc).__name__}: {exc})") from None
    model = onnx.load(str(out))
    quantised = sum(node.op_type == "QLinearConv" for node in model.graph.node)
    if quantised < MIN_QUANTISED_FRACTION * convs:
        raise ModelError(f"only {quantised} of {convs} convolutions were quantised: {_misfit(ranges)}")
    return model


def _misfit(ranges: Path) -> str:
    return (
        f"the ranges in {ranges.name} do not fit this graph's tensors (measured with another onnxruntime "
        "version?); measure them again with benchmarks/quantise.py --write-ranges"
    )
