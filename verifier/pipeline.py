"""The chain every recording goes through, offline and live:

    decode → mono → resample to 16 kHz → level → VAD speech windows (0.5–3 s)
           → narrowband fill (audio that arrived at ≤ 8 kHz) → embeddings → combine

``vpmon compare``, ``vpmon score`` and the benchmarks call these functions; the gateway feeds the same
stages chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from verifier.audio import normalise_level, read_audio, resample
from verifier.embedder import Embedder, l2_normalise
from verifier.errors import AudioError
from verifier.narrowband import FILL_LEVEL_DBFS, fill_windows
from verifier.vad import SpeechWindow, segment

SAMPLE_RATE = 16000
TARGET_LEVEL_DBFS = -26.0  # what prepare_speech (and the live RunningLevel) bring active speech to
Combine = Literal["average", "concatenate"]


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = 1  # 2 and 3 miss quiet speech on noisy phone lines: 7.5 vs 7.3 % EER (README)
    min_window: float = 0.5
    max_window: float = 3.0
    hangover_ms: int = 300
    min_speech_ratio: float = 0.6
    # Frames this far below the normalised speech level (-26 dBFS) are never speech: line noise
    # between turns. None: no gate (webrtcvad alone).
    level_gate_db: float | None = None
    # Live calls: windows whose speech is less than this far above the line's noise floor are not
    # scored (mostly line noise the VAD took for speech; they look like another speaker). None: keep all.
    min_window_snr_db: float | None = None
    # The front end after the VAD: windows of audio that arrived at 8 kHz or less get a faint noise floor
    # at this level above 3.8 kHz (verifier.narrowband; the telephone dev set's held-out 3 s EER 6.66 ->
    # 5.54 %). None: off, the windows as the VAD cut them. Voiceprints and calibration depend on it.
    narrowband_fill_dbfs: float | None = FILL_LEVEL_DBFS

    @property
    def min_frame_dbfs(self) -> float | None:
        return None if self.level_gate_db is None else TARGET_LEVEL_DBFS - self.level_gate_db


@dataclass(frozen=True)
class SpeechEmbedding:
    """One side of a comparison: the combined embedding and how much speech went into it."""

    embedding: np.ndarray
    net_speech_seconds: float
    windows: int
    model_id: str
    window_embeddings: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.float32))


def prepare_speech(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Decoded mono audio → 16 kHz float32, level-normalised (the VAD is level-sensitive)."""
    return normalise_level(resample(samples, sample_rate, SAMPLE_RATE))


def load_speech(path: Path | str, channel: int | None = None) -> np.ndarray:
    """A recording as 16 kHz mono float32, level-normalised (no windows: see ``load_windows``)."""
    audio = read_audio(Path(path), channel=channel)
    return prepare_speech(audio.samples, audio.sample_rate)


def speech_windows(
    samples: np.ndarray, vad: VadConfig = VadConfig(), source_rate: int | None = None
) -> list[SpeechWindow]:
    """VAD windows of 16 kHz level-normalised ``samples``, through the front end for audio that arrived at
    ``source_rate`` Hz (before resampling): the windows the embedder gets. ``source_rate`` None: the VAD's
    windows only, never filled (for callers that process them further themselves)."""
    windows = segment(
        samples,
        sample_rate=SAMPLE_RATE,
        aggressiveness=vad.aggressiveness,
        min_window=vad.min_window,
        max_window=vad.max_window,
        hangover_ms=vad.hangover_ms,
        min_speech_ratio=vad.min_speech_ratio,
        min_frame_dbfs=vad.min_frame_dbfs,
    )
    return windows if source_rate is None else front_end(windows, source_rate, vad)


def front_end(windows: list[SpeechWindow], source_rate: int, vad: VadConfig) -> list[SpeechWindow]:
    """What happens to speech windows after the VAD, files and live calls alike: the narrowband fill,
    when ``vad`` has it on and the audio arrived at ``source_rate`` ≤ 8 kHz."""
    if vad.narrowband_fill_dbfs is None:
        return windows
    return fill_windows(windows, source_rate, vad.narrowband_fill_dbfs)


def load_windows(
    path: Path | str, vad: VadConfig = VadConfig(), channel: int | None = None
) -> list[SpeechWindow]:
    """A recording's speech windows as the embedder gets them (``speech_windows`` at its own rate)."""
    audio = read_audio(Path(path), channel=channel)
    return speech_windows(prepare_speech(audio.samples, audio.sample_rate), vad, audio.sample_rate)


def truncate_speech(
    windows: list[SpeechWindow], seconds: float, min_window: float = 0.5
) -> list[SpeechWindow]:
    """The first ``seconds`` of net speech: whole windows, then the start of the next one.

    A cut is never shorter than ``min_window`` (the model's minimum), so a little more speech than asked
    may be kept; ``speech_seconds`` of the cut window says how much.
    """
    kept: list[SpeechWindow] = []
    total = 0.0
    for window in windows:
        missing = seconds - total
        if missing <= 1e-9:
            break
        if window.speech_seconds <= missing + 1e-9:
            kept.append(window)
            total += window.speech_seconds
            continue
        duration = window.end - window.start
        # Speech is spread evenly enough inside a window to cut it in proportion.
        keep_seconds = min(duration, max(min_window, duration * missing / window.speech_seconds))
        n = round(keep_seconds * SAMPLE_RATE)
        speech = window.speech_seconds * keep_seconds / duration
        kept.append(SpeechWindow(window.samples[:n], window.start, window.start + n / SAMPLE_RATE, speech))
        break
    return kept


def combine_embeddings(embeddings: np.ndarray, speech_seconds: np.ndarray) -> np.ndarray:
    """Evidence from several windows: their normalised embeddings, weighted by speech, averaged."""
    weights = np.asarray(speech_seconds, dtype=np.float32)[:, None]
    return l2_normalise((l2_normalise(embeddings) * weights).sum(axis=0))


def embed_windows(
    embedder: Embedder, windows: list[SpeechWindow], combine: Combine = "average"
) -> SpeechEmbedding:
    if not windows:
        raise AudioError("no speech found: the recording is silent, too quiet or too short")
    seconds = np.array([w.speech_seconds for w in windows], dtype=np.float32)
    if combine == "concatenate":
        joined = np.concatenate([w.samples for w in windows])
        per_window = embedder.embed_batch([joined])
        embedding = per_window[0]
    else:
        per_window = embedder.embed_batch([w.samples for w in windows])
        embedding = combine_embeddings(per_window, seconds)
    return SpeechEmbedding(embedding, float(seconds.sum()), len(windows), embedder.model_id, per_window)


def embed_file(
    embedder: Embedder,
    path: Path | str,
    *,
    vad: VadConfig = VadConfig(),
    max_speech_seconds: float | None = None,
    combine: Combine = "average",
    channel: int | None = None,
) -> SpeechEmbedding:
    """One recording → its speech embedding (optionally only its first ``max_speech_seconds``)."""
    windows = load_windows(path, vad, channel)
    if max_speech_seconds is not None:
        windows = truncate_speech(windows, max_speech_seconds, vad.min_window)
    if not windows:
        raise AudioError(f"no speech found in {path}: it is silent, too quiet or too short")
    return embed_windows(embedder, windows, combine)
