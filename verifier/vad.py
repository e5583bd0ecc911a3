"""Streaming speech segmentation: cuts a 16 kHz stream into speech windows for the embedder.

webrtcvad labels each 10/20/30 ms frame voiced or not. A window is a run of voiced frames in which pauses
of up to ``hangover_ms`` are bridged. Runs longer than ``max_window`` are cut into ``max_window`` pieces
as they grow, so a long monologue yields a window every ``max_window`` seconds instead of at its end.
Every window begins and ends on a voiced frame; a pause in progress when a piece fills up is left out.

Short pieces are dropped, not merged: a piece below ``min_window`` (a short utterance, or the tail of a
cut run) is too weak a witness on its own, and merging it into the previous piece would either exceed
``max_window`` or hold that piece back until the run ends, which costs live latency.

All decisions are made per whole frame, and partial frames wait in a buffer, so feeding a stream in
chunks of any size gives exactly the windows that segmenting the whole recording gives.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import webrtcvad

from verifier.audio import TARGET_RATE, to_pcm16


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays make field-wise == ambiguous
class SpeechWindow:
    """A span of speech: its audio (pauses included), where it lies in the stream, and its net speech."""

    samples: np.ndarray  # float32 at 16 kHz, as fed in
    start: float  # seconds from the start of the stream
    end: float
    speech_seconds: float  # voiced frames inside the span
    # Speech level over the line's noise floor (live calls: ``verifier.stream``); None when unknown.
    snr_db: float | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


class VadSegmenter:
    """Feed 16 kHz float32 audio in chunks of any size; get ``SpeechWindow``s as soon as they are complete."""

    def __init__(
        self,
        sample_rate: int = TARGET_RATE,
        frame_ms: int = 30,
        aggressiveness: int = 2,
        min_window: float = 0.5,
        max_window: float = 3.0,
        hangover_ms: int = 300,
        min_speech_ratio: float = 0.6,
        min_frame_dbfs: float | None = None,
    ) -> None:
        if sample_rate != TARGET_RATE:
            raise ValueError(
                f"VadSegmenter works on {TARGET_RATE} Hz audio, got {sample_rate} Hz: "
                "resample first with verifier.audio.resample"
            )
        if frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30 (webrtcvad frame sizes), got {frame_ms}")
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0, 1, 2 or 3, got {aggressiveness}")
        if not 0 < min_window <= max_window:
            raise ValueError(f"need 0 < min_window <= max_window, got {min_window} and {max_window}")
        if max_window * 1000 < frame_ms:
            raise ValueError(f"max_window {max_window} s is shorter than one {frame_ms} ms frame")
        if hangover_ms < 0:
            raise ValueError(f"hangover_ms must be >= 0, got {hangover_ms}")
        if not 0 <= min_speech_ratio <= 1:
            raise ValueError(f"min_speech_ratio must be within [0, 1], got {min_speech_ratio}")

        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.min_speech_ratio = min_speech_ratio
        self._frame_length = sample_rate * frame_ms // 1000
        # The epsilons keep e.g. 3.0 s / 30 ms at exactly 100 frames despite float rounding.
        self._max_frames = int(max_window * 1000 / frame_ms + 1e-9)
        # Window lengths are whole frames; never let rounding make min exceed max (nothing would pass).
        self._min_frames = min(math.ceil(min_window * 1000 / frame_ms - 1e-9), self._max_frames)
        self._hangover_frames = hangover_ms // frame_ms
        self.aggressiveness = aggressiveness
        # A level gate: a frame quieter than this is never speech, whatever webrtcvad says. webrtcvad
        # adapts to its input's level and calls steady line noise speech; on level-normalised audio
        # (speech at -26 dBFS) a gate far below speech removes those windows without touching speech.
        self._min_frame_power = None if min_frame_dbfs is None else 10 ** (min_frame_dbfs / 10)
        self._reset()

    def _reset(self) -> None:
        self._vad = webrtcvad.Vad(self.aggressiveness)  # fresh too: it adapts to the stream's noise
        self._pending = np.zeros(0, dtype=np.float32)  # a partial frame waiting for more samples
        self._frame_index = 0  # index of the next whole frame
        self._piece_start: int | None = None  # first frame of the open piece; None when outside speech
        self._piece_frames: list[np.ndarray] = []  # audio of the open piece, frame by frame
        self._last_voiced = 0
        self._voiced_in_piece = 0

    def feed(self, samples: np.ndarray) -> list[SpeechWindow]:
        """Add audio; returns the windows completed by it (often none)."""
        samples = np.asarray(samples)
        if samples.dtype.kind != "f":  # np.issubdtype(dtype, np.floating), at a tenth of its cost
            raise ValueError(f"feed float samples in [-1, 1], got {samples.dtype} (decode PCM first)")
        samples = samples.astype(np.float32, copy=False)
        if samples.ndim != 1:
            raise ValueError(f"feed mono samples (a 1-D array), got shape {samples.shape}")
        buffered = np.concatenate((self._pending, samples))
        whole = len(buffered) // self._frame_length * self._frame_length
        self._pending = buffered[whole:]
        if not whole:  # less than one frame so far
            return []
        frames = buffered[:whole].reshape(-1, self._frame_length)
        pcm = to_pcm16(frames)
        windows: list[SpeechWindow] = []
        loud = (
            np.ones(len(frames), dtype=bool)
            if self._min_frame_power is None
            else np.mean(frames.astype(np.float64) ** 2, axis=1) >= self._min_frame_power
        )
        for frame, frame_pcm, loud_enough in zip(frames, pcm, loud, strict=True):
            voiced = bool(loud_enough) and self._vad.is_speech(frame_pcm.tobytes(), self.sample_rate)
            window = self._step(frame, voiced)
            if window is not None:
                windows.append(window)
        return windows

    def skip_silence(self, samples: int) -> list[SpeechWindow]:
        """Move the stream on by ``samples`` (whole frames) of digital silence without running the VAD on
        them: a long gap in a live call. An open window is first let close on silence, as feeding the
        silence would; the windows after the gap start where they would have."""
        if samples < 0 or samples % self._frame_length:
            raise ValueError(f"skip a whole number of {self.frame_ms} ms frames, got {samples} samples")
        windows: list[SpeechWindow] = []
        if self._piece_start is not None:  # a pause longer than the hangover ends it
            frames = min(samples // self._frame_length, self._hangover_frames + 1)
            windows = self.feed(np.zeros(frames * self._frame_length, dtype=np.float32))
            samples -= frames * self._frame_length
        self._frame_index += samples // self._frame_length
        return windows

    def flush(self) -> list[SpeechWindow]:
        """End of stream: returns the open window if it qualifies, and resets for a new stream.

        A trailing partial frame (under ``frame_ms``) is too short for the VAD and is left out.
        """
        window = None if self._piece_start is None else self._close_piece()
        self._reset()
        return [] if window is None else [window]

    def _step(self, frame: np.ndarray, voiced: bool) -> SpeechWindow | None:
        """Advance the segmentation by one frame; returns a window if this frame completed one."""
        index = self._frame_index
        self._frame_index += 1
        if self._piece_start is None:
            if not voiced:
                return None
            self._piece_start = index
        self._piece_frames.append(frame)
        if voiced:
            self._last_voiced = index
            self._voiced_in_piece += 1
        elif index - self._last_voiced > self._hangover_frames:
            return self._close_piece()  # the pause ended the run
        if index + 1 - self._piece_start == self._max_frames:
            # The run goes on but the piece is full: it ends on its last voiced frame (a pause in
            # progress is not part of it) and the next voiced frame opens the next piece.
            return self._close_piece()
        return None

    def _close_piece(self) -> SpeechWindow | None:
        """Close the open piece after its last voiced frame; returns it if long and voiced enough."""
        start_frame = self._piece_start
        assert start_frame is not None
        end_frame = self._last_voiced + 1
        frames = self._piece_frames[: end_frame - start_frame]
        voiced = self._voiced_in_piece
        self._piece_start = None
        self._piece_frames = []
        self._voiced_in_piece = 0
        if len(frames) < self._min_frames or voiced < self.min_speech_ratio * len(frames):
            return None
        return SpeechWindow(
            samples=np.concatenate(frames),
            start=self._frames_to_seconds(start_frame),
            end=self._frames_to_seconds(end_frame),
            speech_seconds=self._frames_to_seconds(voiced),
        )

    def _frames_to_seconds(self, frames: int) -> float:
        return frames * self._frame_length / self.sample_rate  # exact for whole milliseconds


def segment(samples: np.ndarray, sample_rate: int = TARGET_RATE, **options: Any) -> list[SpeechWindow]:
    """Segment a whole recording (``options`` as for ``VadSegmenter``): the same windows as streaming it."""
    segmenter = VadSegmenter(sample_rate, **options)
    return segmenter.feed(samples) + segmenter.flush()
