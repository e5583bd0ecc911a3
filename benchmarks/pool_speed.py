"""The embedding pool's throughput against raw onnxruntime on the same windows (issue 8: ≥ 0.8).

    python benchmarks/pool_speed.py                   CAM++, 1–2 workers × 1–2 onnxruntime threads (~2 min)
    python benchmarks/pool_speed.py --windows 240 --seconds 60

The windows are the live VAD's windows (0.5–3 s, LIVE_VAD) of telephone dev-set speech, as many calls
would send them. For each (workers, threads) combination, on the same windows:

- **raw ORT**: the network alone on features computed beforehand, the windows grouped by network length
  in batches of ``max_batch``, the groups shared among ``workers`` Python threads, each session run with
  ``threads`` intra-op threads — the best the model can do with that many threads, with no front end,
  no queue and no event loop;
- **pool**: ``EmbeddingPool`` as the gateway runs it: ``--calls`` simulated calls queue all their windows
  at once and await them in order (the verdict loop's pattern); audio is embedded from samples, so
  the front end (≈ 1.2 ms per audio second) is part of the pool's time, as it is live;
- **naive** (once, 1 thread): one ``embed_batch([window])`` per window, the load benchmark's baseline.

Variants run interleaved, one repetition each in a rotating order, medians reported. "pool / raw" is
the pool's throughput relative to raw ORT with the same workers and threads.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as benchmarks/embed_speed.py: BLAS threads only spin

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

from streamer.embedding import EmbeddingPool  # noqa: E402
from streamer.embedding_queue import ShedPolicy  # noqa: E402
from verifier.decision import LIVE_VAD  # noqa: E402
from verifier.embedder import Embedder  # noqa: E402
from verifier.models.provision import ensure_model  # noqa: E402
from verifier.pipeline import SAMPLE_RATE, load_speech, speech_windows  # noqa: E402

COMBINATIONS = ((1, 1), (1, 2), (2, 1), (2, 2))  # (workers, onnxruntime intra-op threads)
SETTLE_SECONDS = 0.2  # onnxruntime's pool threads spin after a run; let them stop before the next variant
OUTPUT = BENCH / "results" / "pool_speed.json"

console = Console(width=None if sys.stdout.isatty() else 150)


def live_windows(count: int) -> list[np.ndarray]:
    """The first ``count`` live VAD windows of the telephone dev set, one file after another."""
    windows: list[np.ndarray] = []
    for path in sorted((devset_dir("telephone") / "wav").rglob("*.wav")):
        windows += [w.samples for w in speech_windows(load_speech(path), LIVE_VAD)]
        if len(windows) >= count:
            break
    return windows[:count]


def raw_runner(
    model: Path, embedder: Embedder, windows: list[np.ndarray], workers: int, threads: int, max_batch: int
) -> Callable[[], None]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    spec = embedder.spec
    by_length: dict[int, list[np.ndarray]] = defaultdict(list)
    for window in windows:
        for matrix in embedder._model_inputs(window):
            by_length[len(matrix)].append(matrix)
    batches = [
        np.stack(group[start : start + max_batch])
        for group in by_length.values()
        for start in range(0, len(group), max_batch)
    ]
    threads_pool = ThreadPoolExecutor(workers)

    def run() -> None:
        list(
            threads_pool.map(lambda batch: session.run([spec.output_name], {spec.input_name: batch}), batches)
        )

    return run


def pool_runner(
    embedder: Embedder, windows: list[np.ndarray], workers: int, max_batch: int, calls: int
) -> Callable[[], None]:
    per_call = [windows[i::calls] for i in range(calls)]

    async def all_calls() -> None:
        # A fresh pool per run: its asyncio primitives belong to this run's event loop.
        policy = ShedPolicy(capacity=len(windows), thin_after_s=3600, stale_after_s=3600)
        pool = EmbeddingPool(embedder, workers=workers, max_batch=max_batch, policy=policy)

        async def call(own: list[np.ndarray]) -> None:
            now = time.monotonic()
            tasks = [asyncio.create_task(pool.embed(w, now, sequence=i)) for i, w in enumerate(own)]
            for task in tasks:  # in call order, as the gateway's verdict loop
                assert await task is not None

        await asyncio.gather(*(call(own) for own in per_call))
        await pool.close()

    return lambda: asyncio.run(all_calls())


def naive_runner(embedder: Embedder, windows: list[np.ndarray]) -> Callable[[], None]:
    return lambda: [embedder.embed_batch([w]) for w in windows]


def interleaved(variants: dict[str, Callable[[], None]], repetitions: int) -> dict[str, list[float]]:
    names = list(variants)
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repetitions):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(SETTLE_SECONDS)
            started = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="campplus")
    parser.add_argument("--windows", type=int, default=160, help="live windows embedded per repetition")
    parser.add_argument("--calls", type=int, default=40, help="simulated calls the windows come from")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(("vpmon", "numpy", "onnxruntime")),
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "output"},
            "OPENBLAS_NUM_THREADS": os.environ["OPENBLAS_NUM_THREADS"],
        },
    }
    windows = live_windows(args.windows)
    audio_seconds = sum(len(w) for w in windows) / SAMPLE_RATE
    embedders = {t: Embedder.load(args.model, threads=t) for t in {t for _, t in COMBINATIONS}}
    model = ensure_model(embedders[1].spec)
    variants: dict[str, Callable[[], None]] = {"naive/1x1": naive_runner(embedders[1], windows)}
    for workers, threads in COMBINATIONS:
        name = f"{workers}x{threads}"
        variants[f"raw/{name}"] = raw_runner(
            model, embedders[threads], windows, workers, threads, args.max_batch
        )
        variants[f"pool/{name}"] = pool_runner(
            embedders[threads], windows, workers, args.max_batch, args.calls
        )
    times = interleaved(variants, args.repetitions)

    def throughput(name: str) -> float:  # seconds of audio embedded per second
        return audio_seconds / float(np.median(times[name]))

    rows = []
    for workers, threads in COMBINATIONS:
        name = f"{workers}x{threads}"
        raw, pool = throughput(f"raw/{name}"), throughput(f"pool/{name}")
        rows.append(
            {
                "workers": workers,
                "threads": threads,
                "raw_ort_audio_s_per_s": raw,
                "pool_audio_s_per_s": pool,
                "pool_vs_raw": pool / raw,
            }
        )
    report["windows"] = len(windows)
    report["audio_seconds"] = audio_seconds
    report["naive_audio_s_per_s"] = throughput("naive/1x1")
    report["rows"] = rows
    report["seconds_per_repetition"] = {name: [round(t, 4) for t in ts] for name, ts in times.items()}
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()

    title = f"{len(windows)} live windows ({audio_seconds:.0f} s of audio) from {args.calls} calls"
    table = Table(title=f"{title}: seconds of audio embedded per second, median of {args.repetitions}")
    for column in ("workers × threads", "raw ORT", "pool", "pool / raw"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            f"{row['workers']} × {row['threads']}",
            f"{row['raw_ort_audio_s_per_s']:.0f}",
            f"{row['pool_audio_s_per_s']:.0f}",
            f"{row['pool_vs_raw']:.2f}",
        )
    table.add_row("naive (1 × 1)", "", f"{report['naive_audio_s_per_s']:.0f}", "")
    console.print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    load = (report["machine"]["load_average_at_start"][0], report["machine"]["load_average_at_end"][0])
    console.print(f"took {report['elapsed_seconds']:.0f} s; load average {load[0]:.2f} → {load[1]:.2f}")
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
