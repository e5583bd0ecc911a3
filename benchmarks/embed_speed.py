"""Embedding speed: milliseconds of compute per second of audio, for 3 s windows of dev-set speech.

    python benchmarks/embed_speed.py               both models, batch 1 / 8 / 32, 1 and 2 threads (~3 min)
    python benchmarks/embed_speed.py --models campplus --seconds 5

For every model, batch size and thread count, three things are timed on the same windows:

- **raw ORT**: a plain ``onnxruntime.InferenceSession`` (intra-op threads set, everything else default) on
  features computed beforehand: one call with the whole batch (GE2E: all the partials of the batch);
- **ours**: ``Embedder.embed_batch`` on the raw audio (front end, bucketing, partials, normalising);
- **front end**: the features alone (``Embedder._model_inputs``, single-threaded Python + native code).

The machine is shared and noisy, so the variants of one (model, batch) group run interleaved — one
repetition of each, in a rotating order, with a 20 ms pause before each — and medians are reported, with the
interquartile range in the JSON. "ours / raw" is our throughput relative to raw ORT on the same features.

OpenBLAS is pinned to one thread unless ``OPENBLAS_NUM_THREADS`` is set: the front end's small matrix
products (GE2E's mel projection) gain nothing from BLAS threads, whose spin-waiting then takes the cores
from onnxruntime. Run with ``OPENBLAS_NUM_THREADS=2`` to see the unpinned behaviour.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS; see the docstring

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from common import environment  # noqa: E402
from devset import devset_dir  # noqa: E402

from verifier.embedder import Embedder, l2_normalise  # noqa: E402
from verifier.models.provision import ensure_model  # noqa: E402
from verifier.pipeline import SAMPLE_RATE, load_speech, speech_windows  # noqa: E402

WINDOW_SECONDS = 3.0
BATCHES = (1, 8, 32)
THREADS = (1, 2)
MIN_REPS = 8
MAX_REPS = 200
# onnxruntime's pool threads spin for a while after a run; without a pause they take a core from whichever
# variant runs next (CAM++, batch 1, 2 threads: 11.6 instead of 8.4 ms per second of audio).
SETTLE_SECONDS = 0.02
OUTPUT = BENCH / "results" / "embed_speed.json"

console = Console(width=None if sys.stdout.isatty() else 150)


def speech_chunks(count: int) -> list[np.ndarray]:
    """``count`` consecutive 3 s windows of VAD speech from the telephone dev set."""
    devdir = devset_dir("telephone")
    needed = round(count * WINDOW_SECONDS * SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    for path in sorted((devdir / "wav").rglob("*.wav")):
        pieces += [w.samples for w in speech_windows(load_speech(path))]
        if sum(len(p) for p in pieces) >= needed:
            break
    return list(np.split(np.concatenate(pieces)[:needed], count))


def raw_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(variants: dict[str, Callable[[], object]], budget: float) -> dict[str, list[float]]:
    """Seconds per call of every variant, one repetition of each in a rotating order (ABC, BCA, …),
    until ``budget`` seconds are spent (at least MIN_REPS repetitions)."""
    names = list(variants)
    for run in variants.values():  # warm-up: first calls allocate and pick kernels
        run()
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    rep = 0
    while rep < MIN_REPS or (time.perf_counter() - started < budget and rep < MAX_REPS):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(SETTLE_SECONDS)
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
        rep += 1
    return times


def summary(seconds: list[float], audio_seconds: float) -> dict[str, float]:
    """Milliseconds of compute per second of audio: median and interquartile range."""
    per_second = 1000 * np.array(seconds) / audio_seconds
    p25, p50, p75 = np.percentile(per_second, [25, 50, 75])
    return {"median": float(p50), "p25": float(p25), "p75": float(p75)}


def measure_batch(
    embedders: dict[int, Embedder],
    sessions: dict[int, ort.InferenceSession],
    windows: list[np.ndarray],
    budget: float,
) -> list[dict[str, Any]]:
    spec = embedders[THREADS[0]].spec
    front_end = embedders[THREADS[0]]
    matrices = [front_end._model_inputs(w) for w in windows]
    partials = len(matrices[0])  # per window: 1 for CAM++, 3 GE2E partials for 3 s
    features = np.stack([m for per_window in matrices for m in per_window])
    feed = {spec.input_name: features}

    # The same features through raw ORT must give our embeddings (partials averaged, normalised).
    raw = sessions[THREADS[0]].run([spec.output_name], feed)[0]
    expected = l2_normalise(l2_normalise(raw.reshape(len(windows), partials, -1)).mean(axis=1))
    mismatch = float(np.abs(expected - front_end.embed_batch(windows)).max())

    variants: dict[str, Callable[[], object]] = {
        "front end": lambda: [front_end._model_inputs(w) for w in windows]
    }
    for t in THREADS:
        variants[f"raw/{t}"] = lambda s=sessions[t]: s.run([spec.output_name], feed)
        variants[f"ours/{t}"] = lambda e=embedders[t]: e.embed_batch(windows)
    times = interleaved(variants, budget)

    audio = len(windows) * WINDOW_SECONDS
    front = summary(times["front end"], audio)
    rows = []
    for t in THREADS:
        raw_ms, ours_ms = summary(times[f"raw/{t}"], audio), summary(times[f"ours/{t}"], audio)
        rows.append(
            {
                "model_id": spec.id,
                "batch": len(windows),
                "network_inputs": len(features),
                "threads": t,
                "raw_ort_ms_per_audio_s": raw_ms,
                "ours_ms_per_audio_s": ours_ms,
                "front_end_ms_per_audio_s": front,
                "ours_vs_raw_throughput": raw_ms["median"] / ours_ms["median"],
                "front_end_share_of_ours": front["median"] / ours_ms["median"],
                "repetitions": len(times[f"ours/{t}"]),
                "max_abs_difference_vs_raw": mismatch,
            }
        )
    return rows


def measure(model: str, chunks: list[np.ndarray], budget: float) -> list[dict[str, Any]]:
    embedders = {t: Embedder.load(model, threads=t, max_batch=4 * max(BATCHES)) for t in THREADS}
    sessions = {t: raw_session(ensure_model(embedders[t].spec), t) for t in THREADS}
    return [row for batch in BATCHES for row in measure_batch(embedders, sessions, chunks[:batch], budget)]


def spread(ms: dict[str, float]) -> str:
    return f"{ms['median']:.2f} ({ms['p25']:.2f}–{ms['p75']:.2f})"


def print_rows(rows: list[dict[str, Any]]) -> None:
    title = f"ms of compute per second of audio ({WINDOW_SECONDS:g} s windows), median (p25–p75)"
    table = Table(title=f"{title}; OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    columns = (
        "model",
        "batch",
        "threads",
        "raw ORT",
        "ours",
        "ours / raw throughput",
        "front end",
        "front-end share",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["model_id"],
            f"{row['batch']} ({row['network_inputs']} inputs)",
            str(row["threads"]),
            spread(row["raw_ort_ms_per_audio_s"]),
            spread(row["ours_ms_per_audio_s"]),
            f"{row['ours_vs_raw_throughput']:.2f}",
            f"{row['front_end_ms_per_audio_s']['median']:.2f}",
            f"{100 * row['front_end_share_of_ours']:.0f} %",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="campplus,ge2e", help="comma-separated model names")
    parser.add_argument("--seconds", type=float, default=25.0, help="time budget per (model, batch) group")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the JSON results")
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(("vpmon", "numpy", "onnxruntime")),
        "settings": {
            "window_seconds": WINDOW_SECONDS,
            "seconds_per_group": args.seconds,
            "OPENBLAS_NUM_THREADS": os.environ["OPENBLAS_NUM_THREADS"],
        },
    }
    chunks = speech_chunks(max(BATCHES))
    rows: list[dict[str, Any]] = []
    for model in (m.strip() for m in args.models.split(",") if m.strip()):
        rows += measure(model, chunks, args.seconds)
    report["rows"] = rows
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print_rows(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"took {report['elapsed_seconds']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
