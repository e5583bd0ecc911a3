"""The live half of the pipeline: one call's encoded agent audio in, speech windows out.

    payload bytes ─▶ decode (μ-law / A-law / PCM16) ─▶ agent channel ─▶ resample to 16 kHz (soxr, streaming)
                  ─▶ level (running active-speech level, as ``audio.normalise_level`` does for files)
                  ─▶ VAD segmenter ─▶ SNR gate ─▶ narrowband fill (≤ 8 kHz lines; ``pipeline.front_end``)
                  ─▶ SpeechWindow (0.5–3 s; start/end on the call's agent-audio clock)

The gateway feeds each ``AudioChunk`` here as it arrives; the windows go to the embedder off the event
loop. Offline tools (``benchmarks/takeover.py``) feed whole files through the same object, so live and
offline windows are the same windows.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import numpy as np

from verifier.audio import (
    StreamResampler,
    active_level_dbfs,
    decode_alaw,
    decode_mulaw,
    decode_pcm16,
)
from verifier.errors import AudioError
from verifier.pipeline import SAMPLE_RATE, VadConfig, front_end
from verifier.vad import SpeechWindow, VadSegmenter

Encoding = Literal["mulaw", "alaw", "pcm16"]

_FRAME_SECONDS = 0.02
_ACTIVITY_MARGIN = 10 ** (15.9 / 10)  # ITU-T P.56, as audio.active_level_dbfs
_SILENCE_FLOOR = 10 ** (-70.0 / 10)
_ABOVE_FLOOR = 10 ** (10.0 / 10)  # a speech frame is at least 10 dB above the noise floor
_MIN_SPEECH_SECONDS = 0.5
# Of a long gap, this much silence (and the VAD's hangover) is processed: more than the level's 10 s memory
# and the resampler's delay, so afterwards every stage holds silence only and the clocks can jump over the
# rest in blocks of whole VAD frames, level frames and gain updates (3 s). A day-long gap then costs what
# 12 s of silence does, not 30 s of CPU and gigabytes of zeros.
_GAP_SETTLE_SECONDS = 12.0
_GAP_BLOCK_SECONDS = 3


def percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (its default linear method, bit for bit) by partial sort: 2 µs
    instead of 23 for the few hundred frame powers the running level looks at, twice a second per call."""
    position = q / 100 * (len(values) - 1)  # numpy's virtual index for the linear method
    below = int(position)
    above = min(below + 1, len(values) - 1)
    parted = np.partition(values, (below, above))
    low, high, fraction = float(parted[below]), float(parted[above]), position - below
    # numpy's lerp: from whichever end is nearer, so that the result is exact at fraction 0 and 1
    if fraction >= 0.5:
        return high - (high - low) * (1 - fraction)
    return low + (high - low) * fraction


class FrameHistory:
    """The last ``size`` frame powers in arrival order, as a numpy view without copying: each value is
    written twice, ``size`` apart, so the newest ``size`` always lie side by side."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values = np.zeros(2 * size)
        self._next = 0  # where the next value goes, in [0, size)
        self._count = 0

    def extend(self, values: np.ndarray) -> None:
        count = len(values)
        if count <= self.size - self._next:  # the usual few values of one chunk: two slices, no wrap
            at = self._next
            self._values[at : at + count] = values
            self._values[at + self.size : at + self.size + count] = values
            self._next = (at + count) % self.size
            self._count = min(self._count + count, self.size)
            return
        for start in range(0, count, self.size):  # more than ``size`` at once: only the last count
            part = values[start : start + self.size]
            places = (self._next + np.arange(len(part))) % self.size
            self._values[places] = part
            self._values[places + self.size] = part
            self._next = (self._next + len(part)) % self.size
            self._count = min(self._count + len(part), self.size)

    def view(self) -> np.ndarray:
        if self._count < self.size:
            return self._values[: self._count]
        return self._values[self._next : self._next + self.size]


class RunningLevel:
    """A streaming version of ``audio.normalise_level``: the gain that brings the active speech level of
    the last ``memory_seconds`` to ``target_dbfs`` (at most ``max_gain_db``).

    The VAD is level-sensitive (quiet phone lines lose speech frames); the embedding is not (fbank with
    mean normalisation). The gain is re-estimated every ``update_seconds`` of audio, at fixed points of
    the stream and from the frames before them only, so the output does not depend on how the audio was
    chunked (a partial 20 ms frame waits for the next chunk).
    """

    def __init__(
        self,
        target_dbfs: float = -26.0,
        max_gain_db: float = 30.0,
        memory_seconds: float = 10.0,
        update_seconds: float = 0.5,
    ) -> None:
        self.target_power = 10 ** (target_dbfs / 10)
        self.max_gain = 10 ** (max_gain_db / 20)
        self._powers = FrameHistory(round(memory_seconds / _FRAME_SECONDS))
        self._leftover = np.zeros(0, dtype=np.float32)
        self._frame = round(_FRAME_SECONDS * SAMPLE_RATE)
        self._update_frames = round(update_seconds / _FRAME_SECONDS)
        self._frame_index = 0
        self._gain = 1.0
        self._floor_power: float | None = None  # of the line's noise, before the gain

    @property
    def noise_floor_dbfs(self) -> float | None:
        """The line's noise floor as it comes out (after the gain); None until there is one."""
        if self._floor_power is None:
            return None
        return 10 * math.log10(self._floor_power * self._gain**2)

    def process(self, samples: np.ndarray) -> np.ndarray:
        buffered = np.concatenate((self._leftover, samples))
        whole = len(buffered) // self._frame * self._frame
        self._leftover = buffered[whole:]
        frames = buffered[:whole].reshape(-1, self._frame)
        out = np.empty_like(frames)
        done = 0
        while done < len(frames):
            if self._frame_index % self._update_frames == 0:
                self._gain = self._estimate()
            block = min(len(frames) - done, self._update_frames - self._frame_index % self._update_frames)
            chunk = frames[done : done + block]
            self._gained(chunk, out[done : done + block])
            self._powers.extend(self._frame_powers(chunk))
            self._frame_index += block
            done += block
        return out.reshape(-1)

    # np.clip and np.mean by their ufuncs (np.mean is add.reduce / n): the same values, without their
    # Python wrappers, which cost more than the arithmetic on one 20 ms frame (tests/test_frame_dsp.py).
    def _gained(self, frames: np.ndarray, out: np.ndarray) -> None:
        """``frames`` × the gain, clipped to [-1, 1], into ``out``."""
        np.multiply(frames, np.float32(self._gain), out=out)
        np.minimum(np.maximum(out, -1.0, out=out), 1.0, out=out)

    @staticmethod
    def _frame_powers(frames: np.ndarray) -> np.ndarray:
        """Mean square of each frame (a row), in float64."""
        squares = frames.astype(np.float64)
        squares *= squares
        return np.add.reduce(squares, axis=1) / squares.shape[1]

    def skip_silence(self, samples: int) -> None:
        """``samples`` (whole gain updates) of digital silence not processed, after enough silence that
        the memory holds nothing else: the memory and the update clock move on as if they had been."""
        frames = samples // self._frame
        self._powers.extend(np.zeros(min(frames, self._powers.size)))
        self._frame_index += frames

    def _estimate(self) -> float:
        powers = self._powers.view()
        powers = powers[powers > _SILENCE_FLOOR]
        # Only frames clearly above the line's noise floor count as speech. Between turns the agent's
        # channel carries line noise for seconds on end; counted as speech it would pull the level down
        # and the gain up, and the VAD would then hear amplified noise as speech (benchmarks/takeover.py
        # found a fifth of genuine windows made of line noise that way).
        if len(powers) == 0:
            return self._gain
        floor = percentile(powers, 10)
        self._floor_power = floor
        speech = powers[powers >= floor * _ABOVE_FLOOR]
        if len(speech) * _FRAME_SECONDS < _MIN_SPEECH_SECONDS:
            return self._gain  # too little speech heard lately to say anything: hold the gain
        level = percentile(speech, 95)
        for _ in range(len(speech) + 1):  # the fixed point of audio.active_level_dbfs
            new_level = float(speech[speech >= level / _ACTIVITY_MARGIN].mean())
            if new_level == level:
                break
            level = new_level
        return min(float(np.sqrt(self.target_power / level)), self.max_gain)


class AgentAudio:
    """One call's agent channel: encoded chunks in, speech windows out, in order."""

    def __init__(
        self,
        encoding: Encoding,
        sample_rate: int,
        channels: int = 1,
        agent_channel: int | None = None,
        vad: VadConfig | None = None,
    ) -> None:
        if encoding not in ("mulaw", "alaw", "pcm16"):
            raise AudioError(f"unsupported encoding {encoding!r}: use mulaw, alaw or pcm16")
        if channels < 1 or (agent_channel is not None and not 0 <= agent_channel < channels):
            raise AudioError(f"agent channel {agent_channel} does not exist in {channels}-channel audio")
        if channels > 1 and agent_channel is None:
            raise AudioError(f"{channels}-channel audio needs an agent channel to listen to")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.channels = channels
        self.agent_channel = agent_channel
        self.vad = vad or VadConfig()
        self._resampler = StreamResampler(sample_rate, SAMPLE_RATE)
        self._level = RunningLevel()
        self._segmenter = VadSegmenter(
            sample_rate=SAMPLE_RATE,
            aggressiveness=self.vad.aggressiveness,
            min_window=self.vad.min_window,
            max_window=self.vad.max_window,
            hangover_ms=self.vad.hangover_ms,
            min_speech_ratio=self.vad.min_speech_ratio,
            min_frame_dbfs=self.vad.min_frame_dbfs,
        )
        self.seconds_received = 0.0  # of agent audio, on the call's clock
        self.windows_too_noisy = 0  # not scored: too little above the line's noise floor

    def decode(self, payload: bytes) -> np.ndarray:
        """Encoded (interleaved) audio → the agent channel as float32 at the input rate."""
        if self.encoding == "pcm16":
            samples = decode_pcm16(payload, self.channels)
        else:
            if len(payload) % self.channels:
                raise AudioError(f"{len(payload)} bytes of G.711 do not divide into {self.channels} channels")
            decoded = decode_mulaw(payload) if self.encoding == "mulaw" else decode_alaw(payload)
            samples = decoded if self.channels == 1 else decoded.reshape(-1, self.channels)
        return samples if self.channels == 1 else np.ascontiguousarray(samples[:, self.agent_channel])

    def feed(self, payload: bytes) -> list[SpeechWindow]:
        samples = self.decode(payload)
        self.seconds_received += len(samples) / self.sample_rate
        return self._segment(self._resampler.process(samples))

    def feed_silence(self, seconds: float) -> list[SpeechWindow]:
        """A gap of ``seconds`` (>= 0) on the media clock (hold, discarded audio): silence keeps window
        times on the clock and closes any open window, without inventing speech. Of a long gap only the
        first ``_GAP_SETTLE_SECONDS`` are processed; the clocks jump over the rest."""
        settle = _GAP_SETTLE_SECONDS + self.vad.hangover_ms / 1000
        blocks = max(0, math.floor((seconds - settle) / _GAP_BLOCK_SECONDS))
        processed = seconds - blocks * _GAP_BLOCK_SECONDS
        samples = np.zeros(round(processed * self.sample_rate), dtype=np.float32)
        self.seconds_received += seconds
        windows = self._segment(self._resampler.process(samples))
        if blocks:  # an integer number of input samples is the same number of 3 s blocks at 16 kHz
            skipped = blocks * _GAP_BLOCK_SECONDS * SAMPLE_RATE
            self._level.skip_silence(skipped)
            windows += self._finish(self._segmenter.skip_silence(skipped))
        return windows

    def flush(self) -> list[SpeechWindow]:
        return self._segment(self._resampler.flush(), final=True)

    def _segment(self, samples16k: np.ndarray, final: bool = False) -> list[SpeechWindow]:
        windows = self._segmenter.feed(self._level.process(samples16k)) if len(samples16k) else []
        if final:
            windows += self._segmenter.flush()
        return self._finish(windows)

    def _finish(self, windows: list[SpeechWindow]) -> list[SpeechWindow]:
        """The VAD's windows → those to embed: measured, gated on SNR, then the front end (the fill comes
        after the gate, which measures the line as it came), at the stream's own sample rate."""
        if not windows:  # most chunks close no window
            return windows
        return front_end(
            [w for w in map(self._measure, windows) if self._clear_enough(w)], self.sample_rate, self.vad
        )

    def _measure(self, window: SpeechWindow) -> SpeechWindow:
        floor = self._level.noise_floor_dbfs
        if floor is None:
            return window
        return replace(window, snr_db=active_level_dbfs(window.samples) - floor)

    def _clear_enough(self, window: SpeechWindow) -> bool:
        gate = self.vad.min_window_snr_db
        if gate is None or window.snr_db is None or window.snr_db >= gate:
            return True
        self.windows_too_noisy += 1
        return False
