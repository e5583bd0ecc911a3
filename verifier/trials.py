"""Trial lists and scoring them: the offline evaluation that `vpmon score`, `vpmon calibrate` and the
accuracy benchmark share.

A trials file has one trial per line, paths relative to the file:
``1 enrol.wav test.wav`` / ``0 a.wav b.wav`` (label first), or Kaldi's ``enrol.wav test.wav target``.
The enrolment side is always used whole; the test side may be cut to a given amount of net speech.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verifier.embedder import Embedder, l2_normalise
from verifier.errors import AudioError, CalibrationError
from verifier.pipeline import (
    Combine,
    SpeechEmbedding,
    VadConfig,
    embed_windows,
    load_windows,
    truncate_speech,
)
from verifier.score_norm import VoiceprintMean, centre
from verifier.scoring import cosine

FULL = None  # a duration of None means "the whole test recording"
Advance = Callable[[int], None]
SpeakerOf = Callable[[str], str]


def speaker_folder(path: str) -> str:
    """The speaker of ``…/<speaker>/<recording>.wav`` (the dev set's and VoxCeleb's layout)."""
    return Path(path).parent.name


@dataclass(frozen=True)
class Trial:
    target: bool
    enrol: Path
    test: Path


@dataclass(frozen=True)
class ScoredTrials:
    duration: float | None
    scores: np.ndarray
    labels: np.ndarray
    seconds: np.ndarray  # net speech of the test side
    # Cosines centred on the mean of the other speakers' enrolment recordings (verifier/score_norm.py),
    # as the live monitor centres on the tenant's other voiceprints; None with too few of them.
    centred_scores: np.ndarray | None = None


def read_trials(path: Path) -> list[Trial]:
    labels = {"1": True, "0": False, "target": True, "nontarget": False}
    trials = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CalibrationError(f"cannot read trials file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"trials file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from None
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts or line.lstrip().startswith("#"):
            continue
        if len(parts) == 3 and parts[0] in ("0", "1"):
            label, enrol, test = parts
        elif len(parts) == 3 and parts[2] in ("target", "nontarget"):
            enrol, test, label = parts
        else:
            raise CalibrationError(
                f"{path}:{number}: expected '1|0 ENROL TEST' or 'ENROL TEST target|nontarget', got {line!r}"
            )
        trials.append(Trial(labels[label], path.parent / enrol, path.parent / test))
    if not trials:
        raise CalibrationError(f"{path} holds no trials")
    return trials


def parse_durations(text: str) -> list[float | None]:
    """``"full,3,1,0.5"`` → ``[None, 3.0, 1.0, 0.5]``."""
    durations: list[float | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item == "full":
            durations.append(FULL)
            continue
        try:
            value = float(item.removesuffix("s"))
        except ValueError:
            raise CalibrationError(
                f"durations are seconds or 'full', comma-separated; got {item!r}"
            ) from None
        if not 0 < value < math.inf:  # NaN fails this too
            raise CalibrationError(f"durations must be positive and finite, got {item!r}")
        durations.append(value)
    return durations


def duration_label(duration: float | None) -> str:
    return "full" if duration is None else f"{duration:g} s"


def embed_recordings(
    embedder: Embedder,
    paths: Iterable[Path],
    durations: list[float | None],
    *,
    vad: VadConfig = VadConfig(),
    combine: Combine = "average",
    advance: Advance | None = None,
) -> dict[tuple[Path, float | None], SpeechEmbedding]:
    """Every recording at every duration, reading and segmenting each file once."""
    out: dict[tuple[Path, float | None], SpeechEmbedding] = {}
    for path in paths:
        windows = load_windows(path, vad)
        for duration in durations:
            cut = windows if duration is None else truncate_speech(windows, duration, vad.min_window)
            if not cut:
                raise AudioError(f"no speech found in {path}")
            out[path, duration] = embed_windows(embedder, cut, combine)
        if advance:
            advance(1)
    return out


def score_trials(
    embedder: Embedder,
    trials: list[Trial],
    durations: list[float | None],
    *,
    vad: VadConfig = VadConfig(),
    combine: Combine = "average",
    advance: Advance | None = None,
    speaker_of: SpeakerOf = str,
) -> list[ScoredTrials]:
    """Cosine scores of every trial at every test duration (enrolment always whole). ``speaker_of``
    names an enrolment recording's speaker, so that centring leaves all of them out (by default each
    recording is a speaker of its own)."""
    enrol_paths = sorted({t.enrol for t in trials})
    test_paths = sorted({t.test for t in trials})
    enrolled = embed_recordings(embedder, enrol_paths, [FULL], vad=vad, combine=combine, advance=advance)
    tested = embed_recordings(embedder, test_paths, durations, vad=vad, combine=combine, advance=advance)
    enrolments = {str(p): l2_normalise(enrolled[p, FULL].embedding) for p in enrol_paths}
    means = centring_means(embedder.model_id, enrolments, speaker_of)
    can_centre = all(mean is not None for mean in means.values())
    centred_enrolments = {p: centre(v, means[p]) for p, v in enrolments.items()} if can_centre else {}
    results = []
    labels = np.array([t.target for t in trials], dtype=np.int64)
    for duration in durations:
        scores = np.array(
            [cosine(enrolled[t.enrol, FULL].embedding, tested[t.test, duration].embedding) for t in trials]
        )
        centred = None
        if can_centre:
            centred = np.array(
                [
                    cosine(
                        centred_enrolments[str(t.enrol)],
                        centre(l2_normalise(tested[t.test, duration].embedding), means[str(t.enrol)]),
                    )
                    for t in trials
                ]
            )
        seconds = np.array([tested[t.test, duration].net_speech_seconds for t in trials])
        results.append(ScoredTrials(duration, scores, labels, seconds, centred))
    return results


def centring_means(
    model_id: str, enrolments: dict[str, np.ndarray], speaker_of: SpeakerOf = str
) -> dict[str, np.ndarray | None]:
    """For each enrolment recording, the mean of the other speakers' enrolments to centre its trials
    on, as the server centres an agent on the tenant's other voiceprints (None: too few of them)."""
    speakers: dict[str, dict[str, np.ndarray]] = {}
    for path, vector in enrolments.items():
        speakers.setdefault(speaker_of(path), {})[path] = vector
    means = {}
    for speaker, own in speakers.items():
        others = {p: v for p, v in enrolments.items() if p not in own}
        mean = VoiceprintMean.of(model_id, others).for_speaker(speaker, next(iter(own.values())))
        means.update(dict.fromkeys(own, mean))
    return means
