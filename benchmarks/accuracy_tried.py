"""Everything tried to make CAM++ more accurate on telephone audio (issue 10), kept or not, in one table.

    python benchmarks/accuracy_tried.py              every variant on both draws (about 20 min cold
                                                     on 2 busy cores, 1 min with the embedding cache warm)
    python benchmarks/accuracy_tried.py --fresh      recompute the cached embeddings

The dev voices (``devset.py``, telephone mode) come in two draws of the same 18 speakers: seed 0 is the
**tuning** draw, seed 1 the **held-out** one. A variant is *kept* only when it is better on the tuning draw
and, on the held-out draw, its 3 s EER is at least ``KEEP_MARGIN`` points lower than its group's
reference and its 1 s EER is not higher. One EER point is about 7 of the 740 target trials, so smaller
changes are noise. Caveat: some speakers have few source recordings (codec2, librivox, tuxpaint_en), so
the held-out draw re-uses some of the tuning draw's audio under another degradation; the held-out figures
are less independent than the word suggests.

Every variant is scored on the dev set's trial lists (enrolment: one whole utterance; test side cut to
full / 3 / 1 / 0.5 s of net speech, as ``accuracy.py`` does) and on *6 s accumulated* trials: two
consecutive 3 s windows of the test speaker cut from their other utterances, embeddings averaged
(``accuracy.build_calls``; the trials of ``accuracy.accumulation_rows`` with k = 2).

Groups of variants:

* **Front end** (own embeddings, cached under ``$VPMON_HOME/bench/accuracy_tried``): the VAD always runs
  on the unprocessed recording, so every variant embeds the same spans. A band noise fill above 3.8 kHz
  (the band a μ-law line leaves empty, which CAM++'s 16 kHz training audio never did), on the whole
  recording and per VAD window as ``verifier.narrowband.fill_windows`` does; power spectral subtraction;
  upper mel bins set to zero after mean normalisation.
* **Back end** (on the baseline embeddings, then on those of the -55 dBFS per-window fill):
  mean-centring with the tuning draw's mean, with the mean of the tuning draw's *other* speakers, or
  with the evaluated draw's own mean (at run time: the tenant's enrolled voiceprints, no labels needed);
  adaptive symmetric score normalisation (AS-norm, top-N of a cohort = the tuning draw's whole
  utterances, never the claimed speaker, never a recording of the trial itself), with the impostor's
  other recordings in the cohort (an impostor who is another enrolled agent) or left out (an outsider).
* **Clean 16 kHz** dev set: does a telephone mean, or the fill forced on, hurt wideband audio?
* **Enrolment channel**: voiceprints made from the *clean* 16 kHz recordings (a web microphone), tested on
  the telephone recordings, as they are, band-limited to 4 kHz, or passed through a telephone channel
  (8 kHz, 300-3400 Hz, μ-law) before enrolment. Compared with the clean-enrolment row, not the baseline.

Reading the table: rows whose statistics include the trial's own speakers are optimistic here: the
tuning-draw mean holds 1/18 of each voice (a real tenant's mean holds far less of any one agent; "mean of
the other speakers" is the honest figure), and "impostor may be in cohort" lets the cohort hold other
recordings of the impostor (the case of an impostor who is another enrolled agent; "outside cohort" is an
outsider). Both draws share the speakers, so nothing here is a speaker-disjoint test except those rows.

Every variant also gets a duration-aware calibration (``verifier.calibration.fit_calibration``) fitted
on its tuning scores (all four test durations pooled) and applied to the held-out scores: the Cllr
columns (bits; 1 = uninformative).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import signal

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from accuracy import build_calls, utterances_by_speaker  # noqa: E402
from common import environment  # noqa: E402
from devset import devset_dir  # noqa: E402

from verifier.audio import decode_mulaw, encode_mulaw, normalise_level, read_audio, resample  # noqa: E402
from verifier.calibration import fit_calibration, packaged_calibration  # noqa: E402
from verifier.embedder import Embedder, l2_normalise  # noqa: E402
from verifier.metrics import cllr, detection_errors  # noqa: E402
from verifier.models.provision import default_home, ensure_model  # noqa: E402
from verifier.models.registry import get_spec  # noqa: E402
from verifier.narrowband import fill_windows  # noqa: E402
from verifier.pipeline import (  # noqa: E402
    SAMPLE_RATE,
    combine_embeddings,
    embed_windows,
    load_speech,
    prepare_speech,
    speech_windows,
    truncate_speech,
)
from verifier.trials import Trial, duration_label, read_trials  # noqa: E402
from verifier.trials import speaker_folder as speaker_of  # noqa: E402  (wav/<speaker>/<nn>.wav)
from verifier.vad import SpeechWindow  # noqa: E402

OUTPUT = BENCH / "results" / "accuracy_tried.json"
CACHE_VERSION = 1  # bump when a front end or the way embeddings are cut changes
TUNE_SEED, HOLDOUT_SEED = 0, 1
SEEDS = (TUNE_SEED, HOLDOUT_SEED)
DURATIONS: list[float | None] = [None, 3.0, 1.0, 0.5]
ACCUMULATED = "6 s acc"  # two 3 s windows of the test talker, averaged
COLUMNS = [duration_label(d) for d in DURATIONS] + [ACCUMULATED]
WINDOW_SECONDS = 3.0
P_TARGET = 0.01
KEEP_MARGIN = 0.003  # 0.3 EER points on the held-out 3 s column
TELEPHONE_RATE = 8000
HIGH_BAND_HZ = 3800.0  # a μ-law line's band ends at 3.4-4 kHz; above this the upsampled audio is empty

console = Console(width=None if sys.stdout.isatty() else 200)


# --- front ends -----------------------------------------------------------------------------------
def high_band_noise(samples: np.ndarray, level_dbfs: float, seed: int = 0) -> np.ndarray:
    """White noise limited to HIGH_BAND_HZ … 8 kHz, at ``level_dbfs`` (RMS), added to the recording."""
    noise = np.random.default_rng(seed).standard_normal(len(samples))
    spectrum = np.fft.rfft(noise)
    spectrum[np.fft.rfftfreq(len(noise), 1 / SAMPLE_RATE) < HIGH_BAND_HZ] = 0
    noise = np.fft.irfft(spectrum, len(noise))
    noise *= 10 ** (level_dbfs / 20) / max(float(np.sqrt(np.mean(noise**2))), 1e-12)
    return (samples + noise).astype(np.float32)


def spectral_subtraction(
    samples: np.ndarray,
    over_subtraction: float = 2.0,
    floor_db: float = -15.0,
    noise_share: float = 0.1,
    frame: int = 512,
    hop: int = 128,
) -> np.ndarray:
    """Power spectral subtraction (Berouti et al. 1979): the noise spectrum is the mean power spectrum of
    the quietest ``noise_share`` of frames; each bin keeps ``max(1 - α·N/|X|², floor)`` of its power."""
    window = np.hanning(frame + 1)[:-1].astype(np.float64)
    padded = np.pad(np.asarray(samples, dtype=np.float64), (frame, frame + hop))
    count = (len(padded) - frame) // hop + 1
    index = np.arange(frame)[None, :] + hop * np.arange(count)[:, None]
    spectra = np.fft.rfft(padded[index] * window, axis=1)
    power = np.abs(spectra) ** 2
    energy = power.sum(axis=1)
    quiet = energy <= np.quantile(energy, noise_share)
    noise = power[quiet].mean(axis=0)
    gain = np.sqrt(np.maximum(1 - over_subtraction * noise / np.maximum(power, 1e-20), 10 ** (floor_db / 10)))
    frames = np.fft.irfft(spectra * gain, frame, axis=1) * window
    out = np.zeros(len(padded))
    norm = np.zeros(len(padded))
    np.add.at(out, index, frames)
    np.add.at(norm, index, np.broadcast_to(window**2, frames.shape))
    out = out / np.maximum(norm, 1e-8)
    return out[frame : frame + len(samples)].astype(np.float32)


def rnnoise_denoise(samples: np.ndarray) -> np.ndarray:
    """RNNoise (Valin, MMSP 2018; the ``pyrnnoise`` wheel's library): a small recurrent denoiser that
    ships inside a wheel, run at its 48 kHz (soxr up and back down)."""
    from pyrnnoise.rnnoise import FRAME_SIZE, create, destroy, process_mono_frame

    upsampled = np.clip(resample(samples, SAMPLE_RATE, 48000), -1.0, 1.0).astype(np.float32)
    state = create()
    try:
        frames = [
            process_mono_frame(state, upsampled[i : i + FRAME_SIZE])[0]
            for i in range(0, len(upsampled), FRAME_SIZE)
        ]
    finally:
        destroy(state)
    denoised = np.concatenate(frames).astype(np.float32) / 32767
    # Back to the level the rest of the chain expects (it attenuates speech too, by ≈ 10 dB here).
    return normalise_level(resample(denoised, 48000, SAMPLE_RATE)[: len(samples)])


def has_rnnoise() -> bool:
    try:
        import pyrnnoise.rnnoise  # noqa: F401
    except (ImportError, OSError):
        console.print("no pyrnnoise: the RNNoise row is left out (pip install pyrnnoise==0.4.5)")
        return False
    return True


def mel_bin_centres_hz(num_bins: int = 80, low: float = 20.0, high: float = SAMPLE_RATE / 2) -> np.ndarray:
    """Centre frequencies of Kaldi's mel filterbank bins (mel = 1127 ln(1 + f/700))."""
    mel_low, mel_high = (1127 * np.log1p(f / 700) for f in (low, high))
    centres = mel_low + (mel_high - mel_low) * np.arange(1, num_bins + 1) / (num_bins + 1)
    return 700 * np.expm1(centres / 1127)


def zero_high_bins(features: np.ndarray) -> np.ndarray:
    """Bins above HIGH_BAND_HZ hold only the line's quantisation noise: make them constant (0 after CMN)."""
    features = features.copy()
    features[:, mel_bin_centres_hz(features.shape[1]) > HIGH_BAND_HZ] = 0.0
    return features


@dataclass(frozen=True)
class FrontEnd:
    name: str
    slug: str
    wave: Callable[[np.ndarray], np.ndarray] | None = None  # on the 16 kHz level-normalised recording
    features: Callable[[np.ndarray], np.ndarray] | None = None  # on each mean-normalised feature matrix
    windows: Callable[[list[SpeechWindow]], list[SpeechWindow]] | None = None  # on the VAD's windows


FRONT_ENDS = [
    FrontEnd("baseline (cosine)", "baseline"),
    FrontEnd("noise fill > 3.8 kHz at -45 dBFS", "hfnoise-45", wave=lambda x: high_band_noise(x, -45.0)),
    FrontEnd("noise fill > 3.8 kHz at -55 dBFS", "hfnoise-55", wave=lambda x: high_band_noise(x, -55.0)),
    FrontEnd("noise fill > 3.8 kHz at -65 dBFS", "hfnoise-65", wave=lambda x: high_band_noise(x, -65.0)),
    *(
        FrontEnd(
            f"noise fill {level:g} dBFS per window (verifier.narrowband)",
            f"fillw{level:g}",
            windows=lambda found, level=level: fill_windows(found, TELEPHONE_RATE, level),
        )
        for level in (-45.0, -55.0, -65.0)
    ),
    FrontEnd("mel bins > 3.8 kHz zeroed after CMN", "zerohigh", features=zero_high_bins),
    FrontEnd("spectral subtraction a=2, floor -15 dB", "specsub-2", wave=spectral_subtraction),
    FrontEnd(
        "spectral subtraction a=1, floor -10 dB",
        "specsub-1",
        wave=lambda x: spectral_subtraction(x, over_subtraction=1.0, floor_db=-10.0),
    ),
    *(
        [
            FrontEnd(
                "RNNoise denoiser (pyrnnoise 0.4.5), then the noise fill -55 dBFS per window",
                "rnnoise-fillw-55",
                wave=rnnoise_denoise,
                windows=lambda found: fill_windows(found, TELEPHONE_RATE, -55.0),
            )
        ]
        if has_rnnoise()
        else []
    ),
]


class FeatureHookEmbedder(Embedder):
    """An Embedder whose feature matrices pass through ``hook`` before the network."""

    def __init__(self, hook: Callable[[np.ndarray], np.ndarray], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hook = hook

    def _model_inputs(self, samples: np.ndarray) -> list[np.ndarray]:
        return [self.hook(matrix) for matrix in super()._model_inputs(samples)]


# --- enrolment channels (clean recordings → voiceprints) --------------------------------------------
TELEPHONE_BAND = signal.butter(4, [300, 3400], btype="bandpass", fs=8000, output="sos")


def band_limit_4k(samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    return resample(samples, rate, 8000), 8000


def telephone_channel(samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    """8 kHz, 300-3400 Hz, G.711 μ-law: the line the test side came through (without its noise)."""
    narrow = signal.sosfilt(TELEPHONE_BAND, resample(samples, rate, 8000)).astype(np.float32)
    return decode_mulaw(encode_mulaw(np.clip(narrow, -1, 1))), 8000


@dataclass(frozen=True)
class EnrolChannel:
    name: str
    slug: str
    channel: Callable[[np.ndarray, int], tuple[np.ndarray, int]] | None


ENROL_CHANNELS = [
    EnrolChannel("clean 16 kHz enrolment (reference)", "clean", None),
    EnrolChannel("clean enrolment band-limited to 4 kHz", "clean-4k", band_limit_4k),
    EnrolChannel("clean enrolment through a telephone channel", "clean-tel", telephone_channel),
]


# --- embeddings, cached -----------------------------------------------------------------------------
@dataclass
class DrawEmbeddings:
    """One dev-set draw through one front end: every recording at every duration, and the 6 s calls."""

    devdir: Path
    by_duration: dict[tuple[str, float | None], tuple[np.ndarray, float]]  # (relative path, d) → (emb, s)
    calls: list[tuple[str, frozenset[str], np.ndarray]] = field(default_factory=list)  # speaker, used, emb

    def full_matrix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embeddings of whole recordings, their speakers and relative paths."""
        keys = sorted(k for k in self.by_duration if k[1] is None)
        paths = np.array([k[0] for k in keys])
        speakers = np.array([speaker_of(p) for p in paths])
        return np.stack([self.by_duration[k][0] for k in keys]), speakers, paths


def in_devset(path: Path) -> str:
    """A recording's path inside its dev set (``wav/<speaker>/<nn>.wav``), the same in every mode and draw."""
    return str(Path(*path.parts[-3:]))


def recut(window: SpeechWindow, processed: np.ndarray) -> SpeechWindow:
    start = round(window.start * SAMPLE_RATE)
    samples = processed[start : start + len(window.samples)]
    return SpeechWindow(samples, window.start, window.end, window.speech_seconds)


def embed_draw(embedder: Embedder, devdir: Path, frontend: FrontEnd) -> DrawEmbeddings:
    by_speaker = utterances_by_speaker(devdir)
    windows: dict[Path, list[SpeechWindow]] = {}
    for paths in by_speaker.values():
        for path in paths:
            audio = load_speech(path)
            found = speech_windows(audio)  # on the unprocessed recording: the same spans for every variant
            if frontend.wave is not None:
                processed = frontend.wave(audio)
                found = [recut(w, processed) for w in found]
            if frontend.windows is not None:
                found = frontend.windows(found)
            windows[path] = found
    by_duration = {}
    for path, found in windows.items():
        for duration in DURATIONS:
            cut = found if duration is None else truncate_speech(found, duration)
            embedded = embed_windows(embedder, cut)
            key = str(path.relative_to(devdir))
            by_duration[key, duration] = (embedded.embedding, embedded.net_speech_seconds)
    calls = []
    seconds = np.full(2, WINDOW_SECONDS, dtype=np.float32)
    for call in build_calls(by_speaker, windows, k_max=2, starts=None):
        per_window = embedder.embed_batch(list(call.windows))
        used = frozenset(str(p.relative_to(devdir)) for p in call.used)
        calls.append((call.speaker, used, combine_embeddings(per_window, seconds)))
    return DrawEmbeddings(devdir, by_duration, calls)


def embed_enrolments(
    embedder: Embedder, devdir: Path, channel: EnrolChannel, fill: bool = False
) -> DrawEmbeddings:
    """Whole clean recordings (optionally through ``channel``) → embeddings, keyed as in the telephone set.
    ``fill``: ``verifier.narrowband.fill_windows`` on the windows (it fills only audio at 8 kHz or less)."""
    by_duration = {}
    for paths in utterances_by_speaker(devdir).values():
        for path in paths:
            audio = read_audio(path)
            samples, rate = audio.samples, audio.sample_rate
            if channel.channel is not None:
                samples, rate = channel.channel(samples, rate)
            windows = speech_windows(prepare_speech(samples, rate))
            embedded = embed_windows(embedder, fill_windows(windows, rate) if fill else windows)
            by_duration[str(path.relative_to(devdir)), None] = (
                embedded.embedding,
                embedded.net_speech_seconds,
            )
    return DrawEmbeddings(devdir, by_duration)


def cached(name: str, compute: Callable[[], DrawEmbeddings], fresh: bool) -> DrawEmbeddings:
    path = default_home() / "bench" / "accuracy_tried" / f"v{CACHE_VERSION}-{name}.pkl"
    if path.is_file() and not fresh:
        return pickle.loads(path.read_bytes())
    started = time.perf_counter()
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(result))
    console.print(f"  embedded {name} in {time.perf_counter() - started:.0f} s")
    return result


# --- back ends --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialSet:
    """One column's trials as arrays: enrolment and test embeddings, labels, net speech and bookkeeping."""

    enrol: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    seconds: np.ndarray
    enrol_speaker: np.ndarray
    test_speaker: np.ndarray
    files: list[frozenset[str]]  # recordings the trial is made of (never in its cohort)


def trial_sets(
    test_side: DrawEmbeddings, enrol_side: DrawEmbeddings, trials: list[Trial]
) -> dict[str, TrialSet]:
    out = {}
    pairs = [(in_devset(t.enrol), in_devset(t.test)) for t in trials]
    labels = np.array([t.target for t in trials], dtype=np.int64)
    for duration in DURATIONS:
        out[duration_label(duration)] = TrialSet(
            enrol=np.stack([enrol_side.by_duration[e, None][0] for e, _ in pairs]),
            test=np.stack([test_side.by_duration[t, duration][0] for _, t in pairs]),
            labels=labels,
            seconds=np.array([test_side.by_duration[t, duration][1] for _, t in pairs]),
            enrol_speaker=np.array([speaker_of(e) for e, _ in pairs]),
            test_speaker=np.array([speaker_of(t) for _, t in pairs]),
            files=[frozenset(p) for p in pairs],
        )
    # 6 s accumulated: every utterance with a target call that does not contain it enrols; it is scored
    # against every call of every speaker that does not contain it.
    call_speakers = np.array([c[0] for c in test_side.calls])
    enrolments = [
        key
        for key in sorted(k for k, duration in enrol_side.by_duration if duration is None)
        if any(s == speaker_of(key) and key not in used for s, used, _ in test_side.calls)
    ]
    rows = [(e, c) for e in enrolments for c in range(len(test_side.calls)) if e not in test_side.calls[c][1]]
    out[ACCUMULATED] = TrialSet(
        enrol=np.stack([enrol_side.by_duration[e, None][0] for e, _ in rows]),
        test=np.stack([test_side.calls[c][2] for _, c in rows]),
        labels=np.array([speaker_of(e) == call_speakers[c] for e, c in rows], dtype=np.int64),
        seconds=np.full(len(rows), 2 * WINDOW_SECONDS),
        enrol_speaker=np.array([speaker_of(e) for e, _ in rows]),
        test_speaker=call_speakers[[c for _, c in rows]],
        files=[test_side.calls[c][1] | {e} for e, c in rows],
    )
    return out


@dataclass(frozen=True)
class Cohort:
    embeddings: np.ndarray
    speakers: np.ndarray
    paths: np.ndarray
    same_draw: bool  # the cohort is the evaluated draw: exclude the trial's own recordings


def top_stats(similarities: np.ndarray, excluded: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each row's ``top_n`` largest similarities, excluded ones left out."""
    ranked = -np.sort(-np.where(excluded, -np.inf, similarities), axis=1)[:, :top_n]
    return ranked.mean(axis=1), ranked.std(axis=1) + 1e-6


def as_norm(trials: TrialSet, raw: np.ndarray, cohort: Cohort, top_n: int, outsider: bool) -> np.ndarray:
    """Adaptive symmetric normalisation: ½((s − μ_e)/σ_e + (s − μ_t)/σ_t), μ/σ over each side's top-N
    cohort similarities. The claimed speaker is never in the cohort; ``outsider`` also leaves out the
    test speaker (an impostor who is not one of the tenant's agents)."""
    excluded = cohort.speakers[None, :] == trials.enrol_speaker[:, None]
    if outsider:
        excluded |= cohort.speakers[None, :] == trials.test_speaker[:, None]
    if cohort.same_draw:
        excluded |= np.array([[p in files for p in cohort.paths] for files in trials.files])
    mean_e, std_e = top_stats(trials.enrol @ cohort.embeddings.T, excluded, top_n)
    mean_t, std_t = top_stats(trials.test @ cohort.embeddings.T, excluded, top_n)
    return 0.5 * ((raw - mean_e) / std_e + (raw - mean_t) / std_t)


def centred(trials: TrialSet, mean: np.ndarray) -> TrialSet:
    return TrialSet(
        l2_normalise(trials.enrol - mean),
        l2_normalise(trials.test - mean),
        trials.labels,
        trials.seconds,
        trials.enrol_speaker,
        trials.test_speaker,
        trials.files,
    )


def cosines(trials: TrialSet) -> np.ndarray:
    return np.einsum("ij,ij->i", trials.enrol, trials.test)


@dataclass(frozen=True)
class Context:
    tune: DrawEmbeddings  # the tuning draw through the same front end
    own: DrawEmbeddings  # the evaluated draw through the same front end
    is_tune: bool


BackEnd = Callable[[TrialSet, Context], np.ndarray]


def cohort_of(context: Context, mean: np.ndarray | None = None) -> Cohort:
    embeddings, speakers, paths = context.tune.full_matrix()
    if mean is not None:
        embeddings = l2_normalise(embeddings - mean)
    return Cohort(embeddings, speakers, paths, same_draw=context.is_tune)


def tune_mean(context: Context) -> np.ndarray:
    return context.tune.full_matrix()[0].mean(axis=0)


def own_mean(context: Context) -> np.ndarray:
    return context.own.full_matrix()[0].mean(axis=0)


def as_norm_backend(top_n: int, outsider: bool, centre: bool = False) -> BackEnd:
    def score(trials: TrialSet, context: Context) -> np.ndarray:
        mean = tune_mean(context) if centre else None
        if mean is not None:
            trials = centred(trials, mean)
        return as_norm(trials, cosines(trials), cohort_of(context, mean), top_n, outsider)

    return score


def centre_without_trial_speakers(trials: TrialSet, context: Context) -> np.ndarray:
    """Centre each trial with the tuning draw's mean over the *other* speakers: is the mean a property of
    the channel that carries over to new speakers, or of these 18 voices?"""
    embeddings, speakers, _ = context.tune.full_matrix()
    sums = {s: embeddings[speakers == s].sum(axis=0) for s in set(speakers)}
    counts = {s: int(np.sum(speakers == s)) for s in set(speakers)}
    total, count = embeddings.sum(axis=0), len(embeddings)
    means: dict[tuple[str, str], np.ndarray] = {}
    for pair in set(zip(trials.enrol_speaker, trials.test_speaker, strict=True)):
        left_out = set(pair)
        means[pair] = (total - sum(sums[s] for s in left_out)) / (count - sum(counts[s] for s in left_out))
    mean = np.stack([means[p] for p in zip(trials.enrol_speaker, trials.test_speaker, strict=True)])
    return np.einsum("ij,ij->i", l2_normalise(trials.enrol - mean), l2_normalise(trials.test - mean))


def subset(trials: TrialSet, rows: np.ndarray) -> TrialSet:
    return TrialSet(
        trials.enrol[rows],
        trials.test[rows],
        trials.labels[rows],
        trials.seconds[rows],
        trials.enrol_speaker[rows],
        trials.test_speaker[rows],
        [trials.files[i] for i in rows],
    )


def others_centred_as_norm(top_n: int) -> BackEnd:
    """Centre with the other speakers' mean, then AS-norm against a cohort without the trial's speakers:
    nothing of either voice in any statistic (the honest figure for an outsider on a large tenant)."""

    def score(trials: TrialSet, context: Context) -> np.ndarray:
        embeddings, speakers, _ = context.tune.full_matrix()
        out = np.empty(len(trials.labels))
        pairs = np.char.add(np.char.add(trials.enrol_speaker, "|"), trials.test_speaker)
        for pair in np.unique(pairs):
            rows = np.flatnonzero(pairs == pair)
            enrol_speaker, test_speaker = pair.split("|")
            mean = embeddings[(speakers != enrol_speaker) & (speakers != test_speaker)].mean(axis=0)
            part = centred(subset(trials, rows), mean)
            out[rows] = as_norm(part, cosines(part), cohort_of(context, mean), top_n, outsider=True)
        return out

    return score


def centre_on_k_voiceprints(k: int) -> BackEnd:
    """Centre each trial on the mean of ``k`` other speakers' voiceprints of the evaluated draw (one per
    speaker: its recordings' mean), neither trial speaker among them: how many voiceprints a tenant's mean
    needs (the server centres from 16 other voiceprints on, ``verifier/score_norm.py``)."""

    def score(trials: TrialSet, context: Context) -> np.ndarray:
        embeddings, speakers, _ = context.own.full_matrix()
        names = sorted(set(speakers))
        voiceprints = {s: l2_normalise(embeddings[speakers == s].mean(axis=0)) for s in names}
        rng = np.random.default_rng(k)
        out = np.empty(len(trials.labels))
        pairs = np.char.add(np.char.add(trials.enrol_speaker, "|"), trials.test_speaker)
        for pair in np.unique(pairs):
            rows = np.flatnonzero(pairs == pair)
            others = [s for s in names if s not in pair.split("|")]
            chosen = rng.choice(len(others), size=min(k, len(others)), replace=False)
            part = centred(subset(trials, rows), np.mean([voiceprints[others[i]] for i in chosen], axis=0))
            out[rows] = cosines(part)
        return out

    return score


BACK_ENDS: dict[str, BackEnd] = {
    "centre: tuning-draw mean": lambda t, c: cosines(centred(t, tune_mean(c))),
    "centre: tuning-draw mean of the other speakers": centre_without_trial_speakers,
    "centre: own-draw mean (tenant's voiceprints)": lambda t, c: cosines(centred(t, own_mean(c))),
    "AS-norm top-10, impostor may be in cohort": as_norm_backend(10, outsider=False),
    "AS-norm top-25, impostor may be in cohort": as_norm_backend(25, outsider=False),
    "AS-norm top-50, impostor may be in cohort": as_norm_backend(50, outsider=False),
    "AS-norm top-25, impostor outside cohort": as_norm_backend(25, outsider=True),
    "centre + AS-norm top-25, impostor may be in cohort": as_norm_backend(25, outsider=False, centre=True),
    "centre + AS-norm top-25, impostor outside cohort": as_norm_backend(25, outsider=True, centre=True),
    "centre + AS-norm top-50, impostor outside cohort": as_norm_backend(50, outsider=True, centre=True),
    "centre (other speakers' mean) + AS-norm top-25, impostor outside cohort": others_centred_as_norm(25),
    **{
        f"centre: own-draw mean of {k} other speakers' voiceprints": centre_on_k_voiceprints(k)
        for k in (2, 4, 8, 16)
    },
}
BACK_END_FRONTS = {"baseline": "", "fillw-55": "noise fill -55 dBFS per window + "}


# --- evaluation -------------------------------------------------------------------------------------
def evaluate(
    scores: dict[int, dict[str, np.ndarray]], sets: dict[int, dict[str, TrialSet]]
) -> dict[str, Any]:
    """EER / minDCF per draw and column; Cllr of a calibration fitted on the tuning draw's durations."""
    result: dict[str, Any] = {}
    for seed in SEEDS:
        result[f"seed{seed}"] = {
            column: {
                "eer": (
                    errors := detection_errors(scores[seed][column], sets[seed][column].labels, P_TARGET)
                ).eer,
                "min_dcf": errors.min_dcf,
            }
            for column in COLUMNS
        }
    durations = [duration_label(d) for d in DURATIONS]

    def pooled(seed: int, what: str) -> np.ndarray:
        if what == "scores":
            return np.concatenate([scores[seed][c] for c in durations])
        return np.concatenate([getattr(sets[seed][c], what) for c in durations])

    calibration = fit_calibration(
        pooled(TUNE_SEED, "scores"), pooled(TUNE_SEED, "seconds"), pooled(TUNE_SEED, "labels")
    )
    held = sets[HOLDOUT_SEED]
    result["cllr_holdout"] = {
        c: cllr(calibration.llr(scores[HOLDOUT_SEED][c], held[c].seconds), held[c].labels) for c in durations
    }
    return result


def eer(row: dict[str, Any], seed: int, column: str) -> float:
    return row["metrics"][f"seed{seed}"][column]["eer"]


def judge(row: dict[str, Any], reference: dict[str, Any]) -> bool:
    better_on_tuning = eer(row, TUNE_SEED, "3 s") < eer(reference, TUNE_SEED, "3 s")
    held_3s = eer(row, HOLDOUT_SEED, "3 s") <= eer(reference, HOLDOUT_SEED, "3 s") - KEEP_MARGIN
    held_1s = eer(row, HOLDOUT_SEED, "1 s") <= eer(reference, HOLDOUT_SEED, "1 s")
    return better_on_tuning and held_3s and held_1s


def packaged_cllr(model_id: str, sets: dict[int, dict[str, TrialSet]]) -> dict[str, dict[str, float]] | None:
    calibration = packaged_calibration(model_id)
    if calibration is None:
        return None
    return {
        f"seed{seed}": {
            duration_label(d): cllr(
                calibration.llr(
                    cosines(sets[seed][duration_label(d)]), sets[seed][duration_label(d)].seconds
                ),
                sets[seed][duration_label(d)].labels,
            )
            for d in DURATIONS
        }
        for seed in SEEDS
    } | {"trained_on": calibration.trained_on}


# --- report ---------------------------------------------------------------------------------------
def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(
        title=f"Tried on CAM++, telephone dev set: EER % ({' / '.join(COLUMNS)}); Cllr held-out "
        f"(3 s / 1 s) of a calibration fitted on tuning; kept = better on tuning and held-out 3 s "
        f"≥ {100 * KEEP_MARGIN:.1f} points better, 1 s not worse than the group's reference (*)"
    )
    for column in ("group", "variant", "tuning (seed 0)", "held-out (seed 1)", "Cllr", "kept"):
        table.add_column(column, justify="left" if column in ("group", "variant") else "right")
    for row in rows:
        cells = [" / ".join(f"{100 * eer(row, seed, c):.2f}" for c in COLUMNS) for seed in SEEDS]
        c = row["metrics"]["cllr_holdout"]
        kept = "*" if row["reference"] else ("yes" if row["kept"] else "no")
        table.add_row(row["group"], row["variant"], *cells, f"{c['3 s']:.3f} / {c['1 s']:.3f}", kept)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="campplus", help="model name (default campplus)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument("--fresh", action="store_true", help="recompute cached embeddings")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the JSON results")
    args = parser.parse_args()

    started = time.perf_counter()
    spec = get_spec(args.model)
    onnx_path = ensure_model(spec)
    plain = Embedder(spec, onnx_path, threads=args.threads)
    dirs = {seed: devset_dir("telephone", seed) for seed in SEEDS}
    clean_dirs = {seed: devset_dir("clean", seed) for seed in SEEDS}
    trials = {seed: read_trials(dirs[seed] / "trials.txt") for seed in SEEDS}
    rows: list[dict[str, Any]] = []

    def add_row(group: str, variant: str, scores, sets, reference: dict[str, Any] | None) -> dict[str, Any]:
        row = {
            "group": group,
            "variant": variant,
            "metrics": evaluate(scores, sets),
            "reference": reference is None,
        }
        row["kept"] = False if reference is None else judge(row, reference)
        rows.append(row)
        return row

    # Front ends: each through its own embeddings, scored by cosine.
    draws: dict[str, dict[int, DrawEmbeddings]] = {}
    front_sets: dict[str, dict[int, dict[str, TrialSet]]] = {}
    baseline_row: dict[str, Any] | None = None
    for frontend in FRONT_ENDS:
        embedder = plain
        if frontend.features is not None:
            embedder = FeatureHookEmbedder(frontend.features, spec, onnx_path, threads=args.threads)
        draws[frontend.slug] = {
            seed: cached(
                f"{spec.id}-{frontend.slug}-seed{seed}",
                lambda seed=seed, embedder=embedder, frontend=frontend: embed_draw(
                    embedder, dirs[seed], frontend
                ),
                args.fresh,
            )
            for seed in SEEDS
        }
        sets = {
            seed: trial_sets(draws[frontend.slug][seed], draws[frontend.slug][seed], trials[seed])
            for seed in SEEDS
        }
        front_sets[frontend.slug] = sets
        scores = {seed: {c: cosines(s) for c, s in sets[seed].items()} for seed in SEEDS}
        row = add_row("front end", frontend.name, scores, sets, baseline_row)
        if baseline_row is None:
            baseline_row = row
            baseline_sets = sets

    # Turning the fill on for live calls only: voiceprints enrolled before, without it.
    mixed = {
        seed: trial_sets(draws["fillw-55"][seed], draws["baseline"][seed], trials[seed]) for seed in SEEDS
    }
    scores = {seed: {c: cosines(s) for c, s in mixed[seed].items()} for seed in SEEDS}
    add_row("front end", "noise fill -55 dBFS per window on the test side only", scores, mixed, baseline_row)

    # Back ends on the baseline embeddings and on the best front end (chosen on tuning).
    for slug, prefix in BACK_END_FRONTS.items():
        for name, backend in BACK_ENDS.items():
            scores = {
                seed: {
                    c: backend(s, Context(draws[slug][TUNE_SEED], draws[slug][seed], seed == TUNE_SEED))
                    for c, s in front_sets[slug][seed].items()
                }
                for seed in SEEDS
            }
            add_row("back end", prefix + name, scores, front_sets[slug], baseline_row)
    base = draws["baseline"]
    centre = BACK_ENDS["centre: tuning-draw mean"]

    # The clean (16 kHz) dev set: does a telephone mean hurt wideband audio?
    clean = {
        seed: cached(
            f"{spec.id}-clean-baseline-seed{seed}",
            lambda seed=seed: embed_draw(plain, clean_dirs[seed], FRONT_ENDS[0]),
            args.fresh,
        )
        for seed in SEEDS
    }
    clean_sets = {seed: trial_sets(clean[seed], clean[seed], trials[seed]) for seed in SEEDS}
    clean_row = add_row(
        "clean 16 kHz",
        "cosine",
        {seed: {c: cosines(s) for c, s in clean_sets[seed].items()} for seed in SEEDS},
        clean_sets,
        None,
    )
    for variant, tune_draw in (
        ("centre: clean tuning-draw mean", clean),
        ("centre: telephone tuning-draw mean", base),
    ):
        scores = {
            seed: {
                c: centre(s, Context(tune_draw[TUNE_SEED], clean[seed], False))
                for c, s in clean_sets[seed].items()
            }
            for seed in SEEDS
        }
        add_row("clean 16 kHz", variant, scores, clean_sets, clean_row)
    # The fill is meant for 8 kHz audio: what would it do to wideband audio (forced on, as if narrowband)?
    filled_front = next(f for f in FRONT_ENDS if f.slug == "fillw-55")
    clean_filled = {
        seed: cached(
            f"{spec.id}-clean-fillw-55-seed{seed}",
            lambda seed=seed: embed_draw(plain, clean_dirs[seed], filled_front),
            args.fresh,
        )
        for seed in SEEDS
    }
    filled_sets = {seed: trial_sets(clean_filled[seed], clean_filled[seed], trials[seed]) for seed in SEEDS}
    scores = {seed: {c: cosines(s) for c, s in filled_sets[seed].items()} for seed in SEEDS}
    add_row("clean 16 kHz", "noise fill -55 dBFS per window", scores, filled_sets, clean_row)

    # Enrolment channel: clean voiceprints, telephone tests.
    clean_reference: dict[str, Any] | None = None
    for channel in ENROL_CHANNELS:
        enrol = {
            seed: cached(
                f"{spec.id}-enrol-{channel.slug}-seed{seed}",
                lambda seed=seed, channel=channel: embed_enrolments(plain, clean_dirs[seed], channel),
                args.fresh,
            )
            for seed in SEEDS
        }
        sets = {seed: trial_sets(base[seed], enrol[seed], trials[seed]) for seed in SEEDS}
        scores = {seed: {c: cosines(s) for c, s in sets[seed].items()} for seed in SEEDS}
        row = add_row("enrolment channel", channel.name, scores, sets, clean_reference)
        clean_reference = clean_reference or row
        scores = {
            seed: {c: centre(s, Context(base[TUNE_SEED], base[seed], False)) for c, s in sets[seed].items()}
            for seed in SEEDS
        }
        add_row(
            "enrolment channel", channel.name + " + centre (telephone mean)", scores, sets, clean_reference
        )
    # The same with the fill on as it would run live: telephone tests filled, enrolments filled only when
    # they are narrowband (the 4 kHz and telephone-channel ones).
    for channel in ENROL_CHANNELS:
        enrol = {
            seed: cached(
                f"{spec.id}-enrol-{channel.slug}-filled-seed{seed}",
                lambda seed=seed, channel=channel: embed_enrolments(
                    plain, clean_dirs[seed], channel, fill=True
                ),
                args.fresh,
            )
            for seed in SEEDS
        }
        sets = {seed: trial_sets(draws["fillw-55"][seed], enrol[seed], trials[seed]) for seed in SEEDS}
        scores = {seed: {c: cosines(s) for c, s in sets[seed].items()} for seed in SEEDS}
        add_row("enrolment channel", channel.name + ", fill on", scores, sets, clean_reference)

    print_table(rows)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(),
        "model_id": spec.id,
        "settings": {
            "tune_seed": TUNE_SEED,
            "holdout_seed": HOLDOUT_SEED,
            "columns": COLUMNS,
            "p_target": P_TARGET,
            "keep_margin_eer": KEEP_MARGIN,
            "high_band_hz": HIGH_BAND_HZ,
        },
        "method": __doc__,
        "trials": {
            f"seed{seed}": {
                c: {"targets": int(s.labels.sum()), "nontargets": int(len(s.labels) - s.labels.sum())}
                for c, s in baseline_sets[seed].items()
            }
            for seed in SEEDS
        },
        "packaged_calibration_cllr": packaged_cllr(spec.id, baseline_sets),
        "rows": rows,
    }
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"took {report['elapsed_seconds']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
