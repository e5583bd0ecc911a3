"""Enrolment: one or more recordings of a speaker → a voiceprint, through quality gates.

    recordings → per recording: level and clipping (decoded audio) → 16 kHz, SNR → VAD speech windows
               → enough speech in all? → embed every window (one batch) → voiceprint = speech-weighted
               normalised mean of all window embeddings → does each recording agree with the others?

A voiceprint is compared with every call an agent takes, so a poor one costs for a long time: it is better
to refuse it with a message the person recording can act on than to store it. Each gate raises an
``EnrolmentError`` that names the recording at fault, the figure measured, the limit and what to do.
Cheap gates (level, clipping, SNR, amount of speech) run on every recording before anything is embedded.

The defaults of ``EnrolmentPolicy`` are measured on the dev voices: ``benchmarks/enrolment.py`` and
``benchmarks/results/enrolment.json`` (EER against enrolment length, and the spread of each quality figure
over the dev set).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from verifier.audio import SILENCE_DBFS, TARGET_RATE, LevelStats, describe_level
from verifier.calibration import packaged_calibration
from verifier.embedder import Embedder
from verifier.errors import AudioError, CalibrationError
from verifier.narrowband import is_narrowband
from verifier.pipeline import VadConfig, combine_embeddings, embed_windows, prepare_speech, speech_windows
from verifier.scoring import Decision, Scorer, Verdict
from verifier.vad import SpeechWindow

Reason = Literal["too_little_speech", "clipped", "too_quiet", "noisy", "inconsistent", "no_speech"]
REASONS: tuple[Reason, ...] = get_args(Reason)


class EnrolmentError(AudioError):
    """A quality gate refused the enrolment. ``str(exc)`` is one line: what, which recording, the figure
    measured and the limit, and what to do. ``reason`` is machine-readable (one of ``REASONS``);
    ``recording`` names the recording at fault, or is None when the problem is about all of them."""

    def __init__(
        self,
        message: str,
        *,
        reason: Reason,
        recording: str | None = None,
        measured: float | None = None,
        limit: float | None = None,
    ) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown enrolment error reason {reason!r}; expected one of {REASONS}")
        super().__init__(message)
        self.reason: Reason = reason
        self.recording = recording
        # Plain floats (not numpy scalars), so the figures serialise as they are.
        self.measured = None if measured is None else float(measured)
        self.limit = None if limit is None else float(limit)


@dataclass(frozen=True)
class EnrolmentPolicy:
    """The quality gates. Defaults measured on the dev voices (benchmarks/enrolment.py, telephone set)."""

    # Net speech over all recordings. EER % / minDCF(0.01) of 3 s test windows against voiceprints of N s,
    # telephone dev set, seeds 0 / 1: 2 s 5.7 / 6.3 % (0.55 / 0.47), 4 s 5.1 / 5.0 % (0.36 / 0.28), 6 s
    # 4.3 / 4.2 % (0.29 / 0.23), 10 s 3.5 / 3.4 % (0.20 / 0.17), 15 s 2.9 / 3.3 % (0.16 / 0.14). Up to
    # 10 s each second of speech buys about 0.3 points of EER; from 10 to 15 s 0.03-0.13; from 15 to 30 s
    # (the speakers with 30 s to spare) 0.00-0.04, while minDCF keeps falling slowly. So 10 s, about 13 s
    # of reading aloud; asking for 20 s of reading (about 15 s net) still buys a little.
    min_net_speech: float = 10.0
    # Each recording: two of the VAD's shortest windows. Less is a false start or mostly silence, better
    # named than averaged in; it is also the scorer's minimum for a verdict (consistency needs one).
    min_recording_speech: float = 1.0
    # Share of decoded samples at or above audio.CLIP_THRESHOLD. The dev sets: at most 0.02 %. Clean
    # speech driven into clipping by +12 dB: median 0.12 % clipped, its embedding barely moves (median
    # cosine 0.997 to the unclipped one); +16 dB: 1.5 %, 0.946; +20 dB: 6 %, 0.868. 1 % lets the first
    # through and refuses most of the others (86 % at +16 dB, 98 % at +20 dB).
    max_clipped_fraction: float = 0.01
    # Active speech level of the decoded audio. The quietest dev-set recording is at -42 dBFS (telephone,
    # 5th percentile -39); well below -50 dBFS the wrong microphone is selected or its gain is at the
    # bottom, and the 30 dB of make-up gain that prepare_speech allows runs out.
    min_level_dbfs: float = -50.0
    # estimate_snr_db. Telephone dev set (coloured noise at 5-20 dB nominal; true in-band SNR 4.6-28 dB):
    # estimates 4.7 dB at the lowest, error against the truth mean 0.0 dB, sd 0.4 dB. Clean dev speech with
    # white / pink noise at 0 dB reads at most 2.3 / 3.4 dB (mean 1.1 / 2.5), at 5 dB at least 4.3 / 5.5.
    # 4 dB passes the whole dev set and every 5 dB mix, and refuses every 0 dB mix.
    min_snr_db: float = 4.0
    check_consistency: bool = True
    # The LLR below which a recording is called another speaker than the others, when enrol() builds the
    # scorer itself (a scorer passed in brings its own). Telephone dev set, sets of three recordings: at 0
    # (the Bayes decision at the calibration's prior, 0.5) 1.8 % of all-genuine sets are refused and the
    # stranger in 2 + 1 sets is named 91 % of the time; at -1, 0 % and 86 %. A stranger let through
    # corrupts every later verdict on the agent; a genuine set refused costs one more recording.
    consistency_llr_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not self.min_net_speech > 0 or not self.min_recording_speech > 0:
            raise ValueError("min_net_speech and min_recording_speech must be positive seconds")
        if not 0 <= self.max_clipped_fraction <= 1:
            raise ValueError(f"max_clipped_fraction must be within [0, 1], got {self.max_clipped_fraction}")


DEFAULT_POLICY = EnrolmentPolicy()


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays make field-wise == ambiguous
class Recording:
    name: str  # for messages, e.g. the uploaded file name
    samples: np.ndarray  # decoded mono float32 in [-1, 1] at sample_rate, NOT level-normalised
    sample_rate: int


@dataclass(frozen=True)
class RecordingReport:
    name: str
    net_speech_seconds: float
    windows: int
    level_dbfs: float  # active speech level of the decoded audio
    snr_db: float  # estimate_snr_db
    clipped_fraction: float
    # Cosine of this recording's embedding with the combined embedding of the OTHER recordings, and the
    # cosine the scorer required for this much speech (None with one recording or the check off).
    consistency: float | None = None
    consistency_threshold: float | None = None


@dataclass(frozen=True, eq=False)
class Enrolment:
    vector: np.ndarray  # L2-normalised float32 voiceprint
    net_speech_seconds: float
    windows: int
    model_id: str
    recordings: tuple[RecordingReport, ...]
    # The front end: the lowest sample rate among the recordings, and the narrowband fill its
    # narrowband recordings got (None: none was filled, being wideband or with the fill off).
    min_sample_rate: int
    narrowband_fill_dbfs: float | None

    def quality(self) -> dict[str, float]:
        """A small flat summary to store with the voiceprint: the worst recording on each figure, and the
        front end it was made with (``frontend_of`` reads it back)."""
        reports = self.recordings
        summary = {
            "net_speech_seconds": round(self.net_speech_seconds, 2),
            "recordings": len(reports),
            "min_snr_db": round(float(min(r.snr_db for r in reports)), 1),
            "min_level_dbfs": round(float(min(r.level_dbfs for r in reports)), 1),
            "max_clipped_fraction": round(float(max(r.clipped_fraction for r in reports)), 5),
            "min_sample_rate_hz": self.min_sample_rate,
        }
        if self.narrowband_fill_dbfs is not None:
            summary["narrowband_fill_dbfs"] = self.narrowband_fill_dbfs
        consistency = [r.consistency for r in reports if r.consistency is not None]
        if consistency:
            summary["min_consistency"] = round(float(min(consistency)), 4)
        return summary


def front_end_difference(quality: Mapping[str, float], vad: VadConfig) -> str | None:
    """How the front end a voiceprint was made with (its stored ``Enrolment.quality()``) differs from the
    one ``vad`` applies now, in words; None when its windows went through the same one. Only telephone
    (narrowband) recordings are concerned: wideband ones are never filled."""

    def fill(level: float | None) -> str:
        return "off" if level is None else f"{level:g} dBFS"

    if "min_sample_rate_hz" not in quality:  # enrolled before the front end was recorded
        if vad.narrowband_fill_dbfs is None:
            return None
        return (
            "it was enrolled before voiceprints recorded their front end: telephone recordings were then "
            f"embedded without the narrowband fill, which is now {fill(vad.narrowband_fill_dbfs)}"
        )
    if not is_narrowband(int(quality["min_sample_rate_hz"])):
        return None
    made = quality.get("narrowband_fill_dbfs")
    if made == vad.narrowband_fill_dbfs:
        return None
    return (
        f"its telephone recordings were embedded with the narrowband fill {fill(made)}, which is now "
        f"{fill(vad.narrowband_fill_dbfs)}"
    )


# --------------------------------------------------------------------------------------------- SNR
@dataclass(frozen=True)
class SnrEstimate:
    """Levels are relative to the full scale of the samples measured (enrol measures the 16 kHz,
    level-normalised audio, so only the ratio says something about the recording)."""

    snr_db: float
    speech_dbfs: float  # active speech level with the noise power taken out
    noise_dbfs: float  # stationary background noise power


_SNR_FRAME_SECONDS = 0.02
_DIGITAL_SILENCE = 1e-10  # -100 dBFS: below one 16-bit step, so only digital zeros (or resampled zeros)
_ACTIVITY_MARGIN = 10 ** (15.9 / 10)  # ITU-T P.56, as audio.active_level_dbfs
_NOISE_GATE_SIGMAS = 3.0
_HALF_NORMAL_MEAN = math.sqrt(2 / math.pi)  # E|X| / σ for a normal X
SNR_RANGE_DB = (-30.0, 100.0)  # estimates are clipped to this, so they stay finite and comparable


def estimate_snr(samples: np.ndarray, sample_rate: int = TARGET_RATE) -> SnrEstimate:
    """Signal-to-noise ratio of speech over stationary background noise, from 20 ms frame powers.

    SNR here means what ITU-T P.56 means: the active speech level over the noise power. No VAD is used:
    the webrtcvad segmenter hears noise as speech exactly when the SNR is low, which is when this matters.

    * Noise power N: frames of stationary noise have powers spread roughly normally around N with some
      σ. Frames *below* N are (almost) never speech, because speech only adds power; their mean is
      N - σ·√(2/π) and their RMS deviation from N is σ. So N = mean + √(2/π)·RMS over the frames below
      the current N, iterated to a fixed point from the 10th percentile frame.
    * Speech: each frame's power minus N (speech and noise are uncorrelated, so powers add), then the
      P.56 active level of those (the mean of the frames within 15.9 dB of it), but counting only
      frames more than 3σ above the noise: below that a frame cannot be told from noise.

    Checked in benchmarks/enrolment.py: on the telephone dev set (8 kHz, band-limited coloured noise,
    μ-law) the estimate is within -2.5/+1.3 dB of the true in-band SNR (mean error 0.0, sd 0.4 dB). At
    low SNR it reads high (0 dB of white noise reads 1 dB, of pink noise 2.5 dB), because the quietest
    speech frames sink into the noise and only the louder ones are counted.
    """
    samples = np.asarray(samples, dtype=np.float64).reshape(-1)
    frame = max(1, round(_SNR_FRAME_SECONDS * sample_rate))
    usable = len(samples) // frame * frame
    powers = np.mean(samples[:usable].reshape(-1, frame) ** 2, axis=1)
    powers = powers[powers > _DIGITAL_SILENCE]  # digital silence is no measure of the noise
    if len(powers) < 2:
        return SnrEstimate(SNR_RANGE_DB[0], SILENCE_DBFS, SILENCE_DBFS)
    noise = float(np.percentile(powers, 10))
    for _ in range(200):
        below = powers[powers <= noise]  # never empty: the minimum frame is at most the estimate
        updated = float(below.mean() + _HALF_NORMAL_MEAN * np.sqrt(np.mean((below - noise) ** 2)))
        if abs(updated - noise) <= 1e-9 * noise:
            break
        noise = updated
    below = powers[powers <= noise]
    gate = _NOISE_GATE_SIGMAS * float(np.sqrt(np.mean((below - noise) ** 2)))
    speech = powers - noise
    speech = speech[speech > gate]
    noise_dbfs = 10 * math.log10(noise)
    if len(speech) == 0:
        return SnrEstimate(SNR_RANGE_DB[0], SILENCE_DBFS, noise_dbfs)
    level = float(np.percentile(speech, 95))
    for _ in range(len(speech) + 1):  # each step moves the threshold one way only, as in P.56
        updated = float(speech[speech >= max(level / _ACTIVITY_MARGIN, gate)].mean())
        if updated == level:
            break
        level = updated
    speech_dbfs = 10 * math.log10(level)
    snr = float(np.clip(speech_dbfs - noise_dbfs, *SNR_RANGE_DB))
    return SnrEstimate(snr, speech_dbfs, noise_dbfs)


def estimate_snr_db(samples: np.ndarray, sample_rate: int = TARGET_RATE) -> float:
    """``estimate_snr(...).snr_db``: speech level over noise level in dB (see ``estimate_snr``)."""
    return estimate_snr(samples, sample_rate).snr_db


# --------------------------------------------------------------------------------------- the gates
@dataclass(frozen=True, eq=False)
class CheckedRecording:
    """A recording that passed the cheap per-recording gates, with its speech windows, ready to embed."""

    name: str
    windows: tuple[SpeechWindow, ...]
    level: LevelStats  # of the decoded audio
    snr: SnrEstimate  # of the 16 kHz audio

    @property
    def net_speech_seconds(self) -> float:
        return float(sum(w.speech_seconds for w in self.windows))


def _quoted(name: str) -> str:
    return repr(name)


def _short(seconds: float) -> str:
    """Seconds of speech that fell short, rounded down: 9.96 s must not read as the 10.0 s required."""
    return f"{math.floor(seconds * 10) / 10:.1f} s"


def check_recording(
    recording: Recording, policy: EnrolmentPolicy = DEFAULT_POLICY, vad: VadConfig = VadConfig()
) -> CheckedRecording:
    """Level, clipping, SNR and amount of speech of one recording; raises ``EnrolmentError`` naming it.

    Usable on its own to check each recording as it arrives (no embedding is computed)."""
    name = recording.name
    samples = np.asarray(recording.samples)
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(
            f"recording {_quoted(name)}: expected mono float samples (a 1-D float array), got "
            f"{samples.dtype} of shape {samples.shape}; decode and mix down first (verifier.audio.read_audio)"
        )
    if recording.sample_rate <= 0:
        raise AudioError(
            f"recording {_quoted(name)}: sample rate must be positive, got {recording.sample_rate}"
        )
    if len(samples) == 0 or not np.any(samples):
        raise EnrolmentError(
            f"recording {_quoted(name)} is empty or digital silence: check that the microphone is "
            "connected and not muted, and record it again",
            reason="no_speech",
            recording=name,
        )
    if not np.isfinite(samples).all():
        raise AudioError(f"recording {_quoted(name)} contains NaN or infinite samples: decode it again")

    level = describe_level(samples, recording.sample_rate)
    if level.clipped_fraction > policy.max_clipped_fraction:
        raise EnrolmentError(
            f"recording {_quoted(name)} is clipped: {100 * level.clipped_fraction:.2f} % of samples at full "
            f"scale (at most {100 * policy.max_clipped_fraction:.2f} %): lower the microphone gain or speak "
            "further from the microphone, and record it again",
            reason="clipped",
            recording=name,
            measured=level.clipped_fraction,
            limit=policy.max_clipped_fraction,
        )
    if level.active_dbfs <= SILENCE_DBFS:
        raise EnrolmentError(
            f"recording {_quoted(name)} holds no sound above -70 dBFS: check that the microphone is "
            "connected and not muted, and record it again",
            reason="no_speech",
            recording=name,
            measured=level.active_dbfs,
            limit=policy.min_level_dbfs,
        )
    if level.active_dbfs < policy.min_level_dbfs:
        raise EnrolmentError(
            f"recording {_quoted(name)} is too quiet: speech at {level.active_dbfs:.1f} dBFS (at least "
            f"{policy.min_level_dbfs:.1f} dBFS): check that the right microphone is selected, raise its "
            "gain, and record it again",
            reason="too_quiet",
            recording=name,
            measured=level.active_dbfs,
            limit=policy.min_level_dbfs,
        )

    speech = prepare_speech(samples.astype(np.float32, copy=False), recording.sample_rate)
    snr = estimate_snr(speech)
    if snr.snr_db < policy.min_snr_db:
        raise EnrolmentError(
            f"recording {_quoted(name)} is too noisy: speech-to-noise ratio {snr.snr_db:.1f} dB (at least "
            f"{policy.min_snr_db:.1f} dB): record it again somewhere quieter or with a headset microphone",
            reason="noisy",
            recording=name,
            measured=snr.snr_db,
            limit=policy.min_snr_db,
        )

    windows = tuple(speech_windows(speech, vad, recording.sample_rate))
    checked = CheckedRecording(name, windows, level, snr)
    if not windows:
        raise EnrolmentError(
            f"recording {_quoted(name)} contains no speech the voice detector could use (sound, but no "
            f"stretch of speech of {vad.min_window:g} s or more): record the speaker reading aloud",
            reason="no_speech",
            recording=name,
            measured=0.0,
            limit=policy.min_recording_speech,
        )
    if checked.net_speech_seconds < policy.min_recording_speech:
        raise EnrolmentError(
            f"recording {_quoted(name)} holds only {_short(checked.net_speech_seconds)} of speech (at least "
            f"{policy.min_recording_speech:.1f} s per recording): record it again with the speaker "
            "reading for longer, or leave it out",
            reason="too_little_speech",
            recording=name,
            measured=checked.net_speech_seconds,
            limit=policy.min_recording_speech,
        )
    return checked


# --------------------------------------------------------------------------------------- consistency
def consistency_verdicts(
    window_embeddings: Sequence[np.ndarray], speech_seconds: Sequence[np.ndarray], scorer: Scorer
) -> list[Verdict]:
    """For each recording: its combined embedding scored against the combined embedding of the others.

    ``window_embeddings[i]`` is recording i's (windows, dim) embeddings, ``speech_seconds[i]`` their net
    speech. The scorer is calibrated by the net speech of the side being tested, here recording i.
    Needs at least two recordings."""
    if len(window_embeddings) < 2 or len(window_embeddings) != len(speech_seconds):
        raise ValueError("consistency needs two or more recordings, each with embeddings and speech seconds")
    verdicts = []
    for i in range(len(window_embeddings)):
        own = combine_embeddings(window_embeddings[i], speech_seconds[i])
        rest = [j for j in range(len(window_embeddings)) if j != i]
        others = combine_embeddings(
            np.concatenate([window_embeddings[j] for j in rest]),
            np.concatenate([speech_seconds[j] for j in rest]),
        )
        verdicts.append(scorer.verdict(others, own, float(np.sum(speech_seconds[i]))))
    return verdicts


def _badness(verdict: Verdict) -> float:
    """How far below the decision a verdict lies: the LLR when calibrated, else the cosine margin."""
    return verdict.llr if verdict.llr is not None else verdict.score - verdict.threshold


def odd_one_out(verdicts: Sequence[Verdict]) -> int | None:
    """The index of the recording that agrees least with the others among those judged MISMATCH."""
    mismatched = [i for i, v in enumerate(verdicts) if v.decision is Decision.MISMATCH]
    return min(mismatched, key=lambda i: _badness(verdicts[i])) if mismatched else None


def default_scorer(model_id: str, policy: EnrolmentPolicy = DEFAULT_POLICY) -> Scorer:
    """The scorer ``enrol`` uses for the consistency check when none is given."""
    calibration = packaged_calibration(model_id)
    if calibration is None:
        raise CalibrationError(
            f"model {model_id} has no packaged calibration for the enrolment consistency check: pass a "
            "Scorer (e.g. from `vpmon calibrate`) or turn check_consistency off"
        )
    return Scorer(model_id, calibration, llr_threshold=policy.consistency_llr_threshold)


def _inconsistent(names: list[str], verdicts: list[Verdict], odd: int) -> EnrolmentError:
    verdict = verdicts[odd]
    figures = (
        f"score {verdict.score:.2f}, at least {verdict.threshold:.2f} needed for "
        f"{verdict.net_speech_seconds:.1f} s of speech"
    )
    if len(names) == 2:
        # Two recordings that disagree cannot say which of them is wrong.
        return EnrolmentError(
            f"recordings {_quoted(names[0])} and {_quoted(names[1])} do not sound like the same speaker "
            f"({figures}): check that both are the speaker, or add a third recording so the odd one can "
            "be found",
            reason="inconsistent",
            recording=None,
            measured=verdict.score,
            limit=verdict.threshold,
        )
    return EnrolmentError(
        f"recording {_quoted(names[odd])} does not sound like the same speaker as the other recordings "
        f"({figures}): leave it out, or record it again with the same person",
        reason="inconsistent",
        recording=names[odd],
        measured=verdict.score,
        limit=verdict.threshold,
    )


# --------------------------------------------------------------------------------------------- enrol
def enrol(
    embedder: Embedder,
    recordings: Sequence[Recording],
    policy: EnrolmentPolicy = DEFAULT_POLICY,
    scorer: Scorer | None = None,
    vad: VadConfig = VadConfig(),
) -> Enrolment:
    """Recordings of one speaker → their voiceprint, or an ``EnrolmentError`` saying what to fix.

    The voiceprint is the speech-weighted normalised mean of the embeddings of every speech window of
    every recording (``pipeline.combine_embeddings``), the same evidence combination the live path uses.
    ``scorer`` (for the consistency check) defaults to the packaged calibration of the embedder's model.
    """
    if not recordings:
        raise EnrolmentError(
            "no recordings to enrol from: give at least one recording of the speaker reading aloud",
            reason="no_speech",
        )
    if scorer is not None and scorer.model_id != embedder.model_id:
        raise CalibrationError(
            f"the scorer is for model {scorer.model_id} but the embedder is {embedder.model_id}: "
            "use a scorer calibrated for the embedder's model"
        )
    checked = [check_recording(recording, policy, vad) for recording in recordings]
    net_speech = sum(c.net_speech_seconds for c in checked)
    if net_speech < policy.min_net_speech:
        each = ", ".join(f"{_quoted(c.name)} {c.net_speech_seconds:.1f} s" for c in checked)
        raise EnrolmentError(
            f"the recordings hold {_short(net_speech)} of speech in all ({each}); at least "
            f"{policy.min_net_speech:.1f} s are needed: add a recording or have the speaker read for longer",
            reason="too_little_speech",
            measured=net_speech,
            limit=policy.min_net_speech,
        )

    # One batch for all windows of all recordings: the embedder groups them by length.
    windows = [w for c in checked for w in c.windows]
    embedded = embed_windows(embedder, windows)
    per_recording = np.split(embedded.window_embeddings, np.cumsum([len(c.windows) for c in checked])[:-1])
    seconds = [np.array([w.speech_seconds for w in c.windows], dtype=np.float32) for c in checked]

    verdicts: list[Verdict | None] = [None] * len(checked)
    if policy.check_consistency and len(checked) >= 2:
        scorer = scorer if scorer is not None else default_scorer(embedder.model_id, policy)
        found = consistency_verdicts(per_recording, seconds, scorer)
        odd = odd_one_out(found)
        if odd is not None:
            raise _inconsistent([c.name for c in checked], found, odd)
        verdicts = list(found)

    reports = tuple(
        RecordingReport(
            name=c.name,
            net_speech_seconds=c.net_speech_seconds,
            windows=len(c.windows),
            level_dbfs=float(c.level.active_dbfs),
            snr_db=float(c.snr.snr_db),
            clipped_fraction=float(c.level.clipped_fraction),
            consistency=None if v is None else float(v.score),
            consistency_threshold=None if v is None else float(v.threshold),
        )
        for c, v in zip(checked, verdicts, strict=True)
    )
    return Enrolment(
        vector=embedded.embedding.astype(np.float32),
        net_speech_seconds=float(embedded.net_speech_seconds),
        windows=embedded.windows,
        model_id=embedder.model_id,
        recordings=reports,
        min_sample_rate=min(r.sample_rate for r in recordings),
        narrowband_fill_dbfs=(
            vad.narrowband_fill_dbfs if any(is_narrowband(r.sample_rate) for r in recordings) else None
        ),
    )
