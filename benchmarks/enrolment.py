"""What enrolment needs, measured on the dev voices (real recorded speech, see ../shared/DATA.md).

    python benchmarks/enrolment.py            everything (about 1 min on 2 cores)
    python benchmarks/enrolment.py --quick    a smoke run on fewer utterances
    python benchmarks/enrolment.py --seeds 0  section 1 on one dev-set draw only (default: seeds 0 and 1)

Sections (CAM++, the default model; the same stages as ``verifier.enrolment.enrol``):

1. **Enrolment length** (telephone set): EER and minDCF(p=0.01) of voiceprints made from 2 / 4 / 6 / 10 / 15 s
   of net speech, scored against 3 s test windows and whole test utterances; then 10 / 15 / 20 / 30 s on
   the speakers with that much speech to spare. How the trials are formed: see ``length_rows``. Run on
   two draws of the dev set (seeds 0 and 1; seed 1 is built on first use) to show what is luck of the
   draw. This is what ``EnrolmentPolicy.min_net_speech`` is chosen from.
2. **Consistency** (telephone set): how often the odd-one-out check flags three genuine recordings of one
   speaker, and how often it names the stranger in two recordings of one speaker plus one of another, for
   several LLR thresholds (``EnrolmentPolicy.consistency_llr_threshold``).
3. **Quality figures** over every dev-set recording (telephone and clean): ``estimate_snr_db``, active
   level and clipped fraction of the decoded audio (min / 5th percentile / median / max), and on the
   telephone set the SNR estimate against the true in-band SNR (see ``true_snr_db``).
4. **SNR estimate at known SNRs**: clean dev-set speech mixed with white and pink noise at -5 to 20 dB
   (P.56 active speech level over noise power), and the share of each that passes ``min_snr_db``.
5. **Clipping**: clean speech driven into clipping by +6 to +20 dB: the clipped fraction, and how far the
   embedding moves (cosine to the unclipped recording's embedding).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from accuracy import environment, percent, utterances_by_speaker  # noqa: E402
from devset import devset_dir  # noqa: E402

from verifier.audio import active_level_dbfs, describe_level, read_audio, resample  # noqa: E402
from verifier.calibration import packaged_calibration  # noqa: E402
from verifier.embedder import Embedder  # noqa: E402
from verifier.enrolment import (  # noqa: E402
    DEFAULT_POLICY,
    consistency_verdicts,
    estimate_snr_db,
    odd_one_out,
)
from verifier.metrics import detection_errors  # noqa: E402
from verifier.pipeline import (  # noqa: E402
    VadConfig,
    combine_embeddings,
    embed_windows,
    prepare_speech,
    speech_windows,
    truncate_speech,
)
from verifier.scoring import Scorer  # noqa: E402
from verifier.vad import SpeechWindow  # noqa: E402

MODEL = "campplus"
ENROL_SECONDS = (2.0, 4.0, 6.0, 10.0, 15.0)
# Does it flatten beyond 15 s? Only the speakers with 30 s of speech besides the test utterance take part.
LONG_ENROL_SECONDS = (10.0, 15.0, 20.0, 30.0)
TEST_SECONDS = 3.0
P_TARGET = 0.01
LLR_THRESHOLDS = (0.0, -1.0, -2.0, -3.0)
MIX_SNRS = (-5.0, 0.0, 5.0, 10.0, 20.0)
NOISES = {"white": 0.0, "pink": 1.0}  # spectral slope: power ∝ 1/f^alpha
CLIP_GAINS_DB = (6.0, 12.0, 16.0, 20.0)
QUICK_UTTERANCES = 6
OUTPUT = BENCH / "results" / "enrolment.json"
VAD = VadConfig()

console = Console(width=None if sys.stdout.isatty() else 160)


# --- embeddings, once per window ------------------------------------------------------------------
class WindowEmbeddings:
    """Embeds speech windows once and remembers them by identity (truncate_speech keeps whole windows)."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._cache: dict[int, np.ndarray] = {}
        self._keep: list[SpeechWindow] = []  # keeps ids valid

    def add(self, windows: Sequence[SpeechWindow]) -> None:
        new = [w for w in windows if id(w) not in self._cache]
        if not new:
            return
        for window, embedding in zip(new, self.embedder.embed_batch([w.samples for w in new]), strict=True):
            self._cache[id(window)] = embedding
            self._keep.append(window)

    def combined(self, windows: Sequence[SpeechWindow]) -> np.ndarray:
        """The speech-weighted normalised mean, as enrol() and the live path combine windows."""
        embeddings = np.stack([self._cache[id(w)] for w in windows])
        return combine_embeddings(embeddings, np.array([w.speech_seconds for w in windows]))

    def matrix(self, windows: Sequence[SpeechWindow]) -> np.ndarray:
        return np.stack([self._cache[id(w)] for w in windows])


def load_windows(paths: Sequence[Path]) -> dict[Path, list[SpeechWindow]]:
    return {p: speech_windows(prepare_speech(*_decoded(p)), VAD) for p in paths}


def _decoded(path: Path) -> tuple[np.ndarray, int]:
    audio = read_audio(path)
    return audio.samples, audio.sample_rate


# --- 1: enrolment length ---------------------------------------------------------------------------
def length_rows(
    by_speaker: dict[str, list[Path]],
    windows: dict[Path, list[SpeechWindow]],
    cache: WindowEmbeddings,
    lengths: Sequence[float] = ENROL_SECONDS,
) -> dict[str, Any]:
    """Trials: for every utterance j of a speaker s, the enrolment stream is s's *other* utterances in
    file order starting after j (wrapping round), their VAD windows end to end; a voiceprint of N s is
    the first N s of net speech of that stream (``truncate_speech``: whole windows, then the start of the
    next), combined as ``enrol`` does. Only streams with at least max(N) s take part, so every N is
    scored on the same trials. Target trials: the voiceprint against every utterance of s that the
    longest voiceprint did not use (j always among them); non-target trials: against every utterance of
    every other speaker. Test side: the whole utterance, or its first 3 s of net speech."""
    longest = max(lengths)
    enrolments: list[dict[str, Any]] = []
    for speaker, paths in by_speaker.items():
        for j in range(len(paths)):
            order = paths[j + 1 :] + paths[:j]
            stream = [w for p in order for w in windows[p]]
            if sum(w.speech_seconds for w in stream) < longest:
                continue
            owner = [p for p in order for _ in windows[p]]  # the utterance of each window of the stream
            cuts = {n: truncate_speech(stream, n, VAD.min_window) for n in lengths}
            # truncate_speech keeps stream[0 .. k-1] whole and may cut stream[k]: either way the first
            # len(cut) windows of the stream are (partly) used.
            used = set(owner[: len(cuts[longest])])
            enrolments.append({"speaker": speaker, "held_out": paths[j], "used": used, "cuts": cuts})
    if not enrolments:  # --quick: too little speech per speaker for the longest voiceprint
        return {"enrolments": 0, "speakers": [], "speakers_left_out": sorted(by_speaker), "rows": []}
    cache.add([w for e in enrolments for cut in e["cuts"].values() for w in cut])

    tests = sorted({p for paths in by_speaker.values() for p in paths})
    test_speaker = {p: s for s, paths in by_speaker.items() for p in paths}
    cut_tests = {p: truncate_speech(windows[p], TEST_SECONDS, VAD.min_window) for p in tests}
    cache.add([w for cut in cut_tests.values() for w in cut])
    test_sides = {
        "3 s": np.stack([cache.combined(cut_tests[p]) for p in tests]),
        "full": np.stack([cache.combined(windows[p]) for p in tests]),
    }
    # valid[e, t]: same trials for every N; label 1 for the speaker's unused utterances.
    same = np.array([[test_speaker[t] == e["speaker"] for t in tests] for e in enrolments])
    unused = np.array([[t not in e["used"] for t in tests] for e in enrolments])
    valid = ~same | unused
    labels = same[valid].astype(np.int64)
    rows = []
    for n in lengths:
        voiceprints = np.stack([cache.combined(e["cuts"][n]) for e in enrolments])
        net = np.array([sum(w.speech_seconds for w in e["cuts"][n]) for e in enrolments])
        row: dict[str, Any] = {"enrol_seconds": n, "mean_net_speech_seconds": float(net.mean())}
        for side, embeddings in test_sides.items():
            scores = (voiceprints @ embeddings.T)[valid]  # all L2-normalised: cosines
            errors = detection_errors(scores, labels, p_target=P_TARGET)
            row[side] = {"eer": errors.eer, "min_dcf": errors.min_dcf}
        rows.append(row)
    return {
        "enrolments": len(enrolments),
        "speakers": sorted({e["speaker"] for e in enrolments}),
        "speakers_left_out": sorted(set(by_speaker) - {e["speaker"] for e in enrolments}),
        "targets": int(labels.sum()),
        "nontargets": int(len(labels) - labels.sum()),
        "rows": rows,
    }


# --- 2: consistency --------------------------------------------------------------------------------
def consistency_rows(
    by_speaker: dict[str, list[Path]],
    windows: dict[Path, list[SpeechWindow]],
    cache: WindowEmbeddings,
    model_id: str,
) -> dict[str, Any]:
    """Genuine sets: utterances j, j+1, j+2 of one speaker (wrapping round), every j. Stranger sets:
    utterances j and j+1 of speaker A plus one utterance of every other speaker B (B's utterance j, or
    its last one). Each recording is whole; its windows are combined as in ``enrol``."""
    calibration = packaged_calibration(model_id)
    scorers = {t: Scorer(model_id, calibration, llr_threshold=t) for t in LLR_THRESHOLDS}

    def parts(paths: list[Path]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return (
            [cache.matrix(windows[p]) for p in paths],
            [np.array([w.speech_seconds for w in windows[p]], dtype=np.float32) for p in paths],
        )

    genuine: list[list[Path]] = []
    stranger: list[list[Path]] = []
    for speaker, paths in by_speaker.items():
        for j in range(len(paths)):
            genuine.append([paths[(j + k) % len(paths)] for k in range(3)])
            for other, theirs in by_speaker.items():
                if other != speaker:
                    stranger.append([paths[j], paths[(j + 1) % len(paths)], theirs[min(j, len(theirs) - 1)]])
    genuine = [s for s in genuine if all(windows[p] for p in s)]
    stranger = [s for s in stranger if all(windows[p] for p in s)]
    rows = []
    for threshold, scorer in scorers.items():
        flagged = sum(odd_one_out(consistency_verdicts(*parts(s), scorer)) is not None for s in genuine)
        named = 0
        any_flag = 0
        for s in stranger:
            odd = odd_one_out(consistency_verdicts(*parts(s), scorer))
            any_flag += odd is not None
            named += odd == 2
        rows.append(
            {
                "llr_threshold": threshold,
                "genuine_flagged": flagged / len(genuine),
                "stranger_named": named / len(stranger),
                "stranger_flagged": any_flag / len(stranger),
            }
        )
    return {"genuine_sets": len(genuine), "stranger_sets": len(stranger), "rows": rows}


# --- 3: quality figures ----------------------------------------------------------------------------
def true_snr_db(telephone: Path, clean: Path) -> float:
    """The in-band SNR of a telephone recording, from its clean counterpart in the clean dev set (same
    utterance, same seed): the telephone channel (resampling, band-pass, gain) is identified as the
    least-squares FIR filter from the clean speech at 8 kHz to the telephone recording; the filtered clean
    speech is the speech, the rest is noise (plus μ-law error, 35+ dB down). SNR = P.56 active level of
    the speech over the noise power: the definition ``estimate_snr_db`` aims at."""
    received = read_audio(telephone)
    original = read_audio(clean)
    y = received.samples.astype(np.float64)
    x = resample(original.samples, original.sample_rate, received.sample_rate).astype(np.float64)
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    lags = np.arange(-32, 96)  # the channel delays by a few ms; allow a little lead too
    size = 1 << int(np.ceil(np.log2(2 * n)))
    fx, fy = np.fft.rfft(x, size), np.fft.rfft(y, size)
    auto = np.fft.irfft(fx * np.conj(fx), size)
    cross = np.fft.irfft(fy * np.conj(fx), size)  # cross[k] = sum y[t] x[t - k]
    gram = auto[np.abs(lags[:, None] - lags[None, :])]
    taps = np.linalg.solve(gram + 1e-9 * np.trace(gram) / len(lags) * np.eye(len(lags)), cross[lags])
    speech = np.zeros(n)
    for lag, tap in zip(lags, taps, strict=True):
        if lag >= 0:
            speech[lag:] += tap * x[: n - lag]
        else:
            speech[:lag] += tap * x[-lag:]
    noise = y - speech
    level = active_level_dbfs(speech.astype(np.float32), received.sample_rate)
    return float(level - 10 * np.log10(np.mean(noise**2)))


def spread(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "min": float(a.min()),
        "p5": float(np.percentile(a, 5)),
        "median": float(np.median(a)),
        "max": float(a.max()),
    }


def quality_rows(dirs: dict[str, Path], paths: dict[str, list[Path]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, files in paths.items():
        snr, level, clipped = [], [], []
        for path in files:
            samples, rate = _decoded(path)
            stats = describe_level(samples, rate)
            level.append(stats.active_dbfs)
            clipped.append(stats.clipped_fraction)
            snr.append(estimate_snr_db(prepare_speech(samples, rate)))
        out[mode] = {
            "recordings": len(files),
            "snr_db": spread(snr),
            "level_dbfs": spread(level),
            "clipped_fraction": spread(clipped),
            "pass_min_snr": float(np.mean(np.array(snr) >= DEFAULT_POLICY.min_snr_db)),
        }
        if mode == "telephone" and "clean" in dirs:
            truth = np.array([true_snr_db(p, dirs["clean"] / p.relative_to(dirs[mode])) for p in files])
            error = np.array(snr) - truth
            out[mode]["true_snr_db"] = spread(truth)
            out[mode]["snr_error_db"] = {
                **spread(error),
                "mean": float(error.mean()),
                "sd": float(error.std()),
            }
    return out


# --- 4: SNR at known mixes -------------------------------------------------------------------------
def coloured_noise(n: int, alpha: float, rng: np.random.Generator, rate: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.maximum(np.fft.rfftfreq(n, 1 / rate), 20.0) ** (alpha / 2)
    noise = np.fft.irfft(spectrum, n)
    return noise / np.sqrt(np.mean(noise**2))


def mix_rows(clean_paths: Sequence[Path]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    estimates: dict[tuple[str, float], list[float]] = {}
    for path in clean_paths:
        samples, rate = _decoded(path)
        level = active_level_dbfs(samples, rate)
        for noise_name, alpha in NOISES.items():
            shape = coloured_noise(len(samples), alpha, rng, rate)
            for snr in MIX_SNRS:
                mixed = (samples + shape * 10 ** ((level - snr) / 20)).astype(np.float32)
                estimates.setdefault((noise_name, snr), []).append(
                    estimate_snr_db(prepare_speech(mixed, rate))
                )
    rows = []
    for (noise_name, snr), values in estimates.items():
        a = np.array(values)
        rows.append(
            {
                "noise": noise_name,
                "snr_db": snr,
                "mean": float(a.mean()),
                "sd": float(a.std()),
                "min": float(a.min()),
                "max": float(a.max()),
                "pass_min_snr": float(np.mean(a >= DEFAULT_POLICY.min_snr_db)),
            }
        )
    return rows


# --- 5: clipping -----------------------------------------------------------------------------------
def clipping_rows(embedder: Embedder, clean_paths: Sequence[Path]) -> list[dict[str, Any]]:
    reference = {}
    for path in clean_paths:
        samples, rate = _decoded(path)
        reference[path] = embed_windows(
            embedder, speech_windows(prepare_speech(samples, rate), VAD)
        ).embedding
    rows = []
    for gain in CLIP_GAINS_DB:
        fractions, cosines = [], []
        for path in clean_paths:
            samples, rate = _decoded(path)
            clipped = np.clip(samples * 10 ** (gain / 20), -1.0, 1.0).astype(np.float32)
            fractions.append(describe_level(clipped, rate).clipped_fraction)
            windows = speech_windows(prepare_speech(clipped, rate), VAD)
            cosines.append(float(embed_windows(embedder, windows).embedding @ reference[path]))
        rows.append(
            {
                "gain_db": gain,
                "clipped_fraction": spread(fractions),
                "cosine_to_unclipped": spread(cosines),
                "pass_max_clipped": float(
                    np.mean(np.array(fractions) <= DEFAULT_POLICY.max_clipped_fraction)
                ),
            }
        )
    return rows


# --- report ----------------------------------------------------------------------------------------
def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="right")
    for row in rows:
        out.add_row(*row)
    console.print(out)


def print_length(length: dict[str, Any], model_id: str) -> None:
    if not length["rows"]:
        return
    table(
        f"Enrolment length, {model_id}, telephone seed {length['seed']}: EER % / minDCF(p={P_TARGET:g}) "
        f"({length['enrolments']} voiceprints of {len(length['speakers'])} speakers, {length['targets']} "
        f"target / {length['nontargets']} non-target trials)",
        ("enrolment net speech", "mean actual", f"test {TEST_SECONDS:g} s", "test full utterance"),
        [
            (
                f"{r['enrol_seconds']:g} s",
                f"{r['mean_net_speech_seconds']:.1f} s",
                *(f"{percent(r[side]['eer'])} / {r[side]['min_dcf']:.3f}" for side in ("3 s", "full")),
            )
            for r in length["rows"]
        ],
    )
    if length["speakers_left_out"]:
        console.print(f"  left out as enrolled speakers (too little speech): {length['speakers_left_out']}")


def print_report(report: dict[str, Any]) -> None:
    for key in ("length", "length_long"):
        for length in report[key]:
            print_length(length, report["model_id"])
    consistency = report["consistency"]
    table(
        f"Consistency check, telephone ({consistency['genuine_sets']} sets of 3 genuine recordings, "
        f"{consistency['stranger_sets']} sets of 2 + 1 stranger)",
        ("LLR threshold", "genuine sets flagged %", "stranger named %", "stranger sets flagged %"),
        [
            (
                f"{r['llr_threshold']:g}",
                percent(r["genuine_flagged"]),
                percent(r["stranger_named"]),
                percent(r["stranger_flagged"]),
            )
            for r in consistency["rows"]
        ],
    )
    rows = []
    for mode, q in report["quality"].items():
        for figure, unit in (("snr_db", "dB"), ("level_dbfs", "dBFS"), ("clipped_fraction", "")):
            s = q[figure]
            fmt = (lambda v: f"{100 * v:.3f} %") if figure == "clipped_fraction" else (lambda v: f"{v:.1f}")
            rows.append(
                (mode, f"{figure} {unit}".strip(), *(fmt(s[k]) for k in ("min", "p5", "median", "max")))
            )
        if "snr_error_db" in q:
            t, e = q["true_snr_db"], q["snr_error_db"]
            rows.append(
                (mode, "true in-band SNR dB", *(f"{t[k]:.1f}" for k in ("min", "p5", "median", "max")))
            )
            rows.append(
                (mode, "estimate - truth dB", *(f"{e[k]:+.2f}" for k in ("min", "p5", "median", "max")))
            )
    table(
        "Quality figures over all dev-set recordings (decoded audio; SNR from estimate_snr_db)",
        ("dev set", "figure", "min", "5th pct", "median", "max"),
        rows,
    )
    for mode, q in report["quality"].items():
        extra = ""
        if "snr_error_db" in q:
            error = q["snr_error_db"]
            extra = f"; SNR estimate - truth: mean {error['mean']:+.2f} dB, sd {error['sd']:.2f} dB"
        console.print(
            f"  {mode}: {percent(q['pass_min_snr'])} % pass min_snr_db {DEFAULT_POLICY.min_snr_db:g}{extra}"
        )
    table(
        f"estimate_snr_db on clean dev speech + noise at known SNR (share passing min_snr_db "
        f"{DEFAULT_POLICY.min_snr_db:g})",
        ("noise", "true SNR dB", "mean", "sd", "min", "max", "pass %"),
        [
            (
                r["noise"],
                f"{r['snr_db']:g}",
                *(f"{r[k]:.1f}" for k in ("mean", "sd", "min", "max")),
                percent(r["pass_min_snr"]),
            )
            for r in sorted(report["snr_mixes"], key=lambda r: (r["noise"], r["snr_db"]))
        ],
    )
    table(
        f"Clipping: clean dev speech amplified and clipped (share passing max_clipped_fraction "
        f"{DEFAULT_POLICY.max_clipped_fraction:g})",
        (
            "gain dB",
            "clipped % median",
            "clipped % min",
            "cosine to unclipped median",
            "cosine min",
            "pass %",
        ),
        [
            (
                f"+{r['gain_db']:g}",
                f"{100 * r['clipped_fraction']['median']:.2f}",
                f"{100 * r['clipped_fraction']['min']:.2f}",
                f"{r['cosine_to_unclipped']['median']:.3f}",
                f"{r['cosine_to_unclipped']['min']:.3f}",
                percent(r["pass_max_clipped"]),
            )
            for r in report["clipping"]
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"first {QUICK_UTTERANCES} utterances per speaker"
    )
    parser.add_argument(
        "--seeds", default="0,1", help="dev-set draws for section 1 (the first one for the other sections)"
    )
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the JSON results")
    args = parser.parse_args()

    started = time.perf_counter()
    embedder = Embedder.load(MODEL, threads=args.threads)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    dirs = {mode: devset_dir(mode, seeds[0]) for mode in ("telephone", "clean")}
    all_paths = {
        mode: [
            p
            for paths in utterances_by_speaker(d).values()
            for p in paths[: QUICK_UTTERANCES if args.quick else None]
        ]
        for mode, d in dirs.items()
    }
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(),
        "model_id": embedder.model_id,
        "settings": {
            "threads": args.threads,
            "quick": args.quick,
            "p_target": P_TARGET,
            "vad": asdict(VAD),
            "policy": asdict(DEFAULT_POLICY),
            "seeds": seeds,
        },
        "section_seconds": {},
    }

    def timed(section: str, run: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = run()
        spent = time.perf_counter() - start + report["section_seconds"].get(section, 0)
        report["section_seconds"][section] = round(spent, 1)
        return result

    def quick(by_speaker: dict[str, list[Path]]) -> dict[str, list[Path]]:
        return {s: p[:QUICK_UTTERANCES] for s, p in by_speaker.items()} if args.quick else by_speaker

    # Section 1 on every seed asked for: another seed draws other utterances and degradations of the
    # same speakers, which shows how much of a difference between two lengths is luck of the draw.
    report["length"], report["length_long"] = [], []
    for seed in seeds:
        by_speaker = quick(utterances_by_speaker(devset_dir("telephone", seed)))
        paths = [p for ps in by_speaker.values() for p in ps]
        windows = timed("vad", lambda paths=paths: load_windows(paths))
        cache = WindowEmbeddings(embedder)
        timed(
            "embed",
            lambda windows=windows, cache=cache: cache.add([w for ws in windows.values() for w in ws]),
        )
        for key, lengths in (("length", ENROL_SECONDS), ("length_long", LONG_ENROL_SECONDS)):
            rows = timed(key, lambda b=by_speaker, w=windows, c=cache, n=lengths: length_rows(b, w, c, n))
            report[key].append({"seed": seed, **rows})
        if seed == seeds[0]:
            telephone, telephone_windows, telephone_cache = by_speaker, windows, cache
    report["length_trials"] = length_rows.__doc__
    report["consistency"] = timed(
        "consistency",
        lambda: consistency_rows(telephone, telephone_windows, telephone_cache, embedder.model_id),
    )
    report["consistency"]["sets"] = consistency_rows.__doc__
    report["quality"] = timed("quality", lambda: quality_rows(dirs, all_paths))
    report["quality_truth"] = true_snr_db.__doc__
    clean_subset = all_paths["clean"][:: 2 if not args.quick else 4]
    report["snr_mixes"] = timed("snr_mixes", lambda: mix_rows(clean_subset))
    report["clipping"] = timed("clipping", lambda: clipping_rows(embedder, all_paths["clean"][::4]))
    print_report(report)

    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"took {report['elapsed_seconds']:.0f} s {report['section_seconds']}; wrote {args.output}")


if __name__ == "__main__":
    main()
