"""INT8 CAM++: speed and dev-set accuracy of static quantisation recipes against the float model.

    python benchmarks/quantise.py                  MinMax and percentile ranges (~6 min)
    python benchmarks/quantise.py --write-ranges   also ship the chosen recipe's ranges
                                                   (verifier/models/calibration/<int8 id>.ranges.json)

Ranges are measured on the **tuning** draw of the telephone dev set (seed 0): two 3 s windows from every
utterance long enough, as the live VAD cuts them, through the float model. Every recipe quantises only the
``Conv`` nodes (verifier/models/quantise.py: per-channel INT8 weights, UINT8 activations, QLinearConv);
quantising the element-wise ops too (onnxruntime's default) cost about 2 points of EER in a first try.

For the float model and each recipe: EER and minDCF (p_target 0.01) on full utterances, 3 s and 1 s of
test speech, on the tuning draw and on the **held-out** draw (seed 1, never used to choose); then the
network's time per second of audio on one onnxruntime thread (batch 1 and 8, 3 s windows), all variants
interleaved in rounds on this noisy machine and medians reported, as a ratio to the float model. The
recipe with the lowest tuning 3 s EER is the choice; ``--write-ranges`` ships its ranges.

The accuracy rule for a throughput lever (issue 8): the 3 s EER within 0.3 points of the float model's.
Note the scale of the dev set's own noise: 740 target trials, so one EER point is about 7 of them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from accuracy import utterances_by_speaker  # noqa: E402
from common import environment  # noqa: E402
from devset import devset_dir  # noqa: E402

from verifier.audio import read_audio, resample  # noqa: E402
from verifier.embedder import Embedder  # noqa: E402
from verifier.features import compute_features  # noqa: E402
from verifier.metrics import detection_errors  # noqa: E402
from verifier.models.provision import ensure_model, quantisation_ranges  # noqa: E402
from verifier.models.quantise import prepare, quantisation_options  # noqa: E402
from verifier.models.registry import CAMPPLUS, CAMPPLUS_INT8  # noqa: E402
from verifier.trials import duration_label, read_trials, score_trials  # noqa: E402

OUTPUT = BENCH / "results" / "quantise.json"
TUNE_SEED, HOLDOUT_SEED = 0, 1
WINDOW_SECONDS = 3.0
WINDOWS_PER_UTTERANCE = 2
DURATIONS: list[float | None] = [None, 3.0, 1.0]
P_TARGET = 0.01
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "minmax": ("MinMax", {}),
    "percentile-99.99": ("Percentile", {"CalibPercentile": 99.99}),
    "percentile-99.999": ("Percentile", {"CalibPercentile": 99.999}),
}
SPEED_ROUNDS = 5
SPEED_SECONDS = 1.0  # per measurement

console = Console(width=None if sys.stdout.isatty() else 150)


def calibration_inputs(seed: int) -> list[np.ndarray]:
    """Fbank matrices of 3 s windows of the dev set's speech, a fixed random draw."""
    rng = np.random.default_rng(seed)
    length = int(WINDOW_SECONDS * CAMPPLUS.sample_rate)
    inputs = []
    for paths in utterances_by_speaker(devset_dir("telephone", seed=seed)).values():
        for path in paths:
            audio = read_audio(path)
            samples = resample(audio.samples, audio.sample_rate, CAMPPLUS.sample_rate)
            if len(samples) < length:
                continue
            for start in rng.integers(0, len(samples) - length + 1, WINDOWS_PER_UTTERANCE):
                inputs.append(compute_features(samples[start : start + length], CAMPPLUS.frontend))
    return inputs


class Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of inputs."""

    def __init__(self, inputs: list[np.ndarray]) -> None:
        self._inputs = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        matrix = next(self._inputs, None)
        return None if matrix is None else {CAMPPLUS.input_name: matrix[None]}


def build_recipe(prepared: Path, inputs: list[np.ndarray], method: str, extra: dict, out_dir: Path) -> Path:
    """Measure the ranges (written to ``ranges.json``) and quantise; returns the recipe's directory."""
    from onnxruntime.quantization import quantize_static

    out_dir.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(prepared),
        str(out_dir / "model.onnx"),
        Reader(inputs),  # type: ignore[arg-type]
        calibration_cache_path=str(out_dir / "ranges.json"),
        extra_options=extra,
        **quantisation_options(method),
    )
    return out_dir


def accuracy(model: Path, trials: dict[int, list]) -> dict[str, Any]:
    embedder = Embedder(CAMPPLUS, model, threads=2)
    result: dict[str, Any] = {}
    for seed, seed_trials in trials.items():
        for scored in score_trials(embedder, seed_trials, DURATIONS):
            errors = detection_errors(scored.scores, scored.labels, p_target=P_TARGET)
            key = f"seed{seed}_{duration_label(scored.duration)}"
            result[key] = {"eer": errors.eer, "min_dcf": errors.min_dcf}
    return result


def speed(models: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Median ms of network time per second of audio, 1 thread, batch 1 and 8, variants interleaved."""
    frames = int(WINDOW_SECONDS * 100) - 10
    batch = (
        np.random.default_rng(0).standard_normal((8, frames, CAMPPLUS.frontend.num_bins)).astype(np.float32)
    )
    sessions = {}
    for name, path in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    samples: dict[str, dict[int, list[float]]] = {name: {1: [], 8: []} for name in models}
    for _ in range(SPEED_ROUNDS):
        for name, session in sessions.items():
            for size in (1, 8):
                feed = {CAMPPLUS.input_name: batch[:size]}
                session.run(None, feed)
                runs, start = 0, time.perf_counter()
                while time.perf_counter() - start < SPEED_SECONDS:
                    session.run(None, feed)
                    runs += 1
                seconds_of_audio = runs * size * frames / 100
                samples[name][size].append(1000 * (time.perf_counter() - start) / seconds_of_audio)
    return {
        name: {f"batch{size}_ms_per_audio_s": statistics.median(values) for size, values in by_size.items()}
        for name, by_size in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write-ranges", action="store_true", help="ship the chosen recipe's ranges")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    started = time.time()
    float_model = ensure_model(CAMPPLUS)
    trials = {
        seed: read_trials(devset_dir("telephone", seed=seed) / "trials.txt")
        for seed in (TUNE_SEED, HOLDOUT_SEED)
    }
    inputs = calibration_inputs(TUNE_SEED)
    console.print(
        f"calibration: {len(inputs)} windows of {WINDOW_SECONDS:g} s from the tuning draw (seed {TUNE_SEED})"
    )
    with tempfile.TemporaryDirectory(prefix="vpmon-quantise-bench-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        prepare(float_model, prepared)
        models = {"float32": float_model}
        built: dict[str, Path] = {}
        for name, (method, extra) in RECIPES.items():
            began = time.time()
            built[name] = build_recipe(prepared, inputs, method, extra, Path(scratch) / name)
            models[name] = built[name] / "model.onnx"
            console.print(f"{name}: ranges and INT8 model in {time.time() - began:.0f} s")
        rows = {name: {"accuracy": accuracy(path, trials)} for name, path in models.items()}
        for name, figures in speed(models).items():
            rows[name]["speed"] = figures
        base = rows["float32"]
        for row in rows.values():
            row["speed_ratio_batch1"] = (
                row["speed"]["batch1_ms_per_audio_s"] / base["speed"]["batch1_ms_per_audio_s"]
            )
            row["speed_ratio_batch8"] = (
                row["speed"]["batch8_ms_per_audio_s"] / base["speed"]["batch8_ms_per_audio_s"]
            )
            for seed in (TUNE_SEED, HOLDOUT_SEED):
                row[f"eer_3s_change_seed{seed}"] = (
                    row["accuracy"][f"seed{seed}_3 s"]["eer"] - base["accuracy"][f"seed{seed}_3 s"]["eer"]
                )
        chosen = min(RECIPES, key=lambda name: rows[name]["accuracy"][f"seed{TUNE_SEED}_3 s"]["eer"])
        if args.write_ranges:
            target = quantisation_ranges(CAMPPLUS_INT8)
            shutil.copyfile(built[chosen] / "ranges.json", target)
            console.print(f"wrote {target} ({chosen})")
    result = {
        "command": " ".join(["python", "benchmarks/quantise.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(),
        "calibration_windows": len(inputs),
        "calibration_draw": f"telephone seed {TUNE_SEED}",
        "holdout_draw": f"telephone seed {HOLDOUT_SEED}",
        "rows": rows,
        "chosen": chosen,
        "ranges_written": args.write_ranges,
        "elapsed_seconds": round(time.time() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, chosen)
    console.print(f"wrote {args.output} in {time.time() - started:.0f} s")


def print_table(rows: dict[str, dict[str, Any]], chosen: str) -> None:
    table = Table(
        title="CAM++ float vs INT8 (EER %, telephone dev set; ms of network per s of audio, 1 thread)"
    )
    columns = ["model", "tune full", "tune 3 s", "tune 1 s", "held-out full", "held-out 3 s", "held-out 1 s"]
    columns += ["Δ3 s tune / held-out", "ms/s b1", "ms/s b8", "× float b1", "× float b8"]
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in rows.items():
        acc = row["accuracy"]
        eers = [
            f"{100 * acc[f'seed{s}_{d}']['eer']:.2f}"
            for s in (TUNE_SEED, HOLDOUT_SEED)
            for d in ("full", "3 s", "1 s")
        ]
        change = f"{100 * row['eer_3s_change_seed0']:+.2f} / {100 * row['eer_3s_change_seed1']:+.2f}"
        label = f"{name} (chosen)" if name == chosen else name
        table.add_row(
            label,
            *eers,
            change,
            f"{row['speed']['batch1_ms_per_audio_s']:.2f}",
            f"{row['speed']['batch8_ms_per_audio_s']:.2f}",
            f"{row['speed_ratio_batch1']:.2f}",
            f"{row['speed_ratio_batch8']:.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
