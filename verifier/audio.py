"""Audio in, float32 out: file reading, PCM16 and G.711 decoding, channel handling, resampling, levels.

Everything downstream works on float32 mono samples in [-1, 1]; this module is where audio gets there.
Conversions between float and 16-bit use the full-scale convention ``int16 = float * 32768``.
"""

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from verifier.errors import AudioError, UnsupportedAudioError

PCM16_SCALE = 32768.0
TARGET_RATE = 16000
# Level reported for digital silence, so results stay finite (JSON has no -inf).
SILENCE_DBFS = -120.0
# G.711 decoders top out below int16 full scale (μ-law at 32124, A-law at 32256, ≈ -0.17 dBFS), so a
# clipped telephone signal never reaches 1.0; this threshold catches both codecs' largest code.
CLIP_THRESHOLD = 0.98


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays make field-wise == ambiguous
class Audio:
    """Mono audio: float32 samples in [-1, 1] and their sample rate in Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class LevelStats:
    """Level figures for quality gates, all in dB relative to full scale."""

    peak_dbfs: float
    rms_dbfs: float
    active_dbfs: float  # level of the active (speech) frames only, see active_level_dbfs
    clipped_fraction: float  # share of samples at or above CLIP_THRESHOLD in magnitude


# ---------------------------------------------------------------------------------------------- files


def read_audio(path: str | Path, channel: int | None = None) -> Audio:
    """Read a WAV/FLAC/OGG file as float32 mono; ``channel`` picks one channel, None mixes them down."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path} (check the path)")
    if path.stat().st_size == 0:
        raise AudioError(f"{path} is empty (0 bytes): record or export it again")
    return _decode(path, str(path), channel)


def read_audio_bytes(data: bytes, name: str = "upload", channel: int | None = None) -> Audio:
    """``read_audio`` for a file's contents in memory (an upload); ``name`` is used in messages."""
    if not data:
        raise AudioError(f"{name} is empty (0 bytes): record or export it again")
    return _decode(io.BytesIO(data), name, channel)


def _decode(source: Path | io.BytesIO, name: str, channel: int | None) -> Audio:
    try:
        frames, sample_rate = sf.read(source, dtype="float32", always_2d=True)
    except sf.SoundFileError as error:
        reason = str(error).removeprefix(f"Error opening {str(source)!r}: ")
        raise UnsupportedAudioError(
            f"cannot decode {name}: {reason} (use WAV, FLAC or OGG, e.g. convert with sox or ffmpeg)"
        ) from None
    except (TypeError, ValueError, RuntimeError):
        # soundfile asks for a sample rate when the extension says headerless audio (.raw, .pcm)
        raise UnsupportedAudioError(
            f"cannot decode {name}: headerless audio has no sample rate; wrap it in a WAV header "
            "(e.g. sox -t raw -r 8000 -e signed -b 16 -c 1 in.raw out.wav)"
        ) from None
    if frames.shape[0] == 0:
        raise AudioError(f"{name} contains no audio samples (record or export it again)")
    if not np.isfinite(frames).all():
        raise AudioError(f"{name} contains NaN or infinite samples (re-export it as 16-bit PCM)")
    samples = select_channel(frames, channel)
    # Float files may exceed full scale; clip as an integer format would have, so [-1, 1] holds.
    return Audio(samples=np.clip(samples, -1.0, 1.0), sample_rate=int(sample_rate))


def encode_flac(audio: Audio) -> bytes:
    """Lossless 16-bit FLAC of mono audio: how retained enrolment audio is kept (about half of PCM)."""
    buffer = io.BytesIO()
    sf.write(buffer, to_pcm16(audio.samples), audio.sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def select_channel(frames: np.ndarray, channel: int | None) -> np.ndarray:
    """From (n, channels) frames take one channel, or the mean of all channels when ``channel`` is None."""
    if frames.ndim == 1:
        frames = frames[:, np.newaxis]
    channels = frames.shape[1]
    if channel is None:
        return frames.mean(axis=1, dtype=np.float32) if channels > 1 else frames[:, 0].copy()
    if not 0 <= channel < channels:
        raise AudioError(
            f"channel {channel} does not exist: the audio has {channels} channel(s), "
            f"choose 0..{channels - 1} or none to mix down"
        )
    return frames[:, channel].copy()


def deinterleave(samples: np.ndarray, channels: int) -> np.ndarray:
    """Split interleaved samples (L R L R ...) into an array of shape (channels, n)."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    samples = np.asarray(samples).reshape(-1)
    if len(samples) % channels:
        raise AudioError(
            f"{len(samples)} samples do not divide into {channels} channels (is the channel count right?)"
        )
    return samples.reshape(-1, channels).T


# ---------------------------------------------------------------------------------------------- PCM16


def decode_pcm16(data: bytes, channels: int = 1) -> np.ndarray:
    """Little-endian signed 16-bit PCM → float32, shape (n,) for mono or (n, channels) interleaved."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise AudioError(
            f"PCM16 payload of {len(data)} bytes is not a whole number of {channels}-channel 16-bit "
            f"frames ({frame_bytes} bytes each); check the encoding and channel count"
        )
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM16_SCALE
    return samples if channels == 1 else samples.reshape(-1, channels)


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] → int16, rounded to nearest and clipped to the int16 range."""
    scaled = np.rint(np.asarray(samples, dtype=np.float64) * PCM16_SCALE)
    # np.clip's values by its ufuncs, in place: its Python wrapper costs more than 20 ms of audio does
    np.minimum(np.maximum(scaled, -32768.0, out=scaled), 32767.0, out=scaled)
    return scaled.astype(np.int16)


def _as_pcm16(samples: np.ndarray) -> np.ndarray:
    """int16 arrays pass through unchanged (exact codec tests need that); floats are converted."""
    samples = np.asarray(samples)
    return samples.reshape(-1) if samples.dtype == np.int16 else to_pcm16(samples).reshape(-1)


# ---------------------------------------------------------------------------------------------- G.711
# ITU-T G.711 in its usual 16-bit form (as in the ITU-T G.191 reference code). Each 8-bit code is
# sign | 3-bit segment (exponent) | 4-bit step (mantissa); the decoded value is the middle of the
# code's decision interval. The decoders are 256-entry tables built once here from those definitions.

_MULAW_BIAS = 0x84  # 132: shifts every segment so its interval starts on a power of two
_MULAW_CLIP = 32635  # largest magnitude that still fits the top segment after adding the bias


def _mulaw_code_to_pcm16(code: int) -> int:
    inverted = ~code & 0xFF  # μ-law transmits every bit inverted
    exponent = (inverted >> 4) & 0x07
    mantissa = inverted & 0x0F
    magnitude = (((mantissa << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return -magnitude if inverted & 0x80 else magnitude


def _alaw_code_to_pcm16(code: int) -> int:
    toggled = code ^ 0x55  # A-law transmits the even bits inverted
    exponent = (toggled >> 4) & 0x07
    mantissa = toggled & 0x0F
    magnitude = (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    return magnitude if toggled & 0x80 else -magnitude  # A-law's sign bit is set for positive values


MULAW_TO_PCM16 = np.array([_mulaw_code_to_pcm16(code) for code in range(256)], dtype=np.int16)
ALAW_TO_PCM16 = np.array([_alaw_code_to_pcm16(code) for code in range(256)], dtype=np.int16)
_MULAW_TO_FLOAT = MULAW_TO_PCM16.astype(np.float32) / PCM16_SCALE
_ALAW_TO_FLOAT = ALAW_TO_PCM16.astype(np.float32) / PCM16_SCALE


def decode_mulaw(data: bytes) -> np.ndarray:
    """G.711 μ-law bytes → float32 samples."""
    return _MULAW_TO_FLOAT[np.frombuffer(data, dtype=np.uint8)]


def decode_alaw(data: bytes) -> np.ndarray:
    """G.711 A-law bytes → float32 samples."""
    return _ALAW_TO_FLOAT[np.frombuffer(data, dtype=np.uint8)]


def _highest_bit(values: np.ndarray) -> np.ndarray:
    """Index of the highest set bit of positive integers (frexp is exact for these)."""
    return np.frexp(values.astype(np.float64))[1] - 1


def encode_mulaw(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] (or int16) → G.711 μ-law bytes."""
    pcm = _as_pcm16(samples).astype(np.int32)
    sign = np.where(pcm < 0, 0x80, 0)
    biased = np.minimum(np.abs(pcm), _MULAW_CLIP) + _MULAW_BIAS  # 132 .. 32767
    exponent = _highest_bit(biased) - 7
    mantissa = (biased >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def encode_alaw(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] (or int16) → G.711 A-law bytes."""
    pcm = _as_pcm16(samples).astype(np.int32)
    # A-law has no zero level: intervals are [0, 16) → +8 and [-16, 0) → -8, so a negative value is
    # measured by its one's complement (-x - 1), which keeps the quantiser symmetric around -0.5.
    sign = np.where(pcm >= 0, 0x80, 0)
    magnitude = np.where(pcm >= 0, pcm, -pcm - 1) >> 3  # 13-bit magnitude, 0 .. 4095
    exponent = np.maximum(_highest_bit(np.maximum(magnitude, 1)) - 4, 0)
    mantissa = (magnitude >> np.maximum(exponent, 1)) & 0x0F  # segments 0 and 1 share a step size
    return ((sign | (exponent << 4) | mantissa) ^ 0x55).astype(np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------- resampling


def _check_rates(from_rate: int, to_rate: int) -> None:
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} → {to_rate}")


def resample(samples: np.ndarray, from_rate: int, to_rate: int = TARGET_RATE) -> np.ndarray:
    """Resample mono float32 audio with soxr's high-quality filter; equal rates return the input."""
    _check_rates(from_rate, to_rate)
    samples = np.asarray(samples, dtype=np.float32)
    if from_rate == to_rate:
        return samples
    return soxr.resample(samples, from_rate, to_rate, quality="HQ")


class StreamResampler:
    """Resample a stream chunk by chunk; the concatenated output equals ``resample`` on the whole."""

    def __init__(self, from_rate: int, to_rate: int = TARGET_RATE) -> None:
        _check_rates(from_rate, to_rate)
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._stream = (
            None if from_rate == to_rate else soxr.ResampleStream(from_rate, to_rate, 1, quality="HQ")
        )

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Feed a chunk of any size; returns the output available so far (the filter holds some back)."""
        samples = np.asarray(samples, dtype=np.float32)
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples)

    def flush(self) -> np.ndarray:
        """End of stream: returns the samples the filter still held."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


# ---------------------------------------------------------------------------------------------- levels

_LEVEL_FRAME_SECONDS = 0.02
# ITU-T P.56 counts as active the signal no more than 15.9 dB below the active level itself.
_ACTIVITY_MARGIN_DB = 15.9
_SILENCE_FLOOR_DBFS = -70.0  # frames quieter than this are never speech


def _to_dbfs(power: float) -> float:
    return 10.0 * np.log10(power) if power > 0 else SILENCE_DBFS


def _frame_powers(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    frame = min(max(1, round(_LEVEL_FRAME_SECONDS * sample_rate)), len(samples))
    usable = len(samples) // frame * frame  # a partial last frame is left out
    frames = np.asarray(samples[:usable], dtype=np.float64).reshape(-1, frame)
    return np.mean(frames**2, axis=1)


def active_level_dbfs(samples: np.ndarray, sample_rate: int = TARGET_RATE) -> float:
    """Speech level over active frames only, in the spirit of ITU-T P.56, so silence does not lower it.

    The level L is the mean power of the 20 ms frames within 15.9 dB of L; found by fixed-point
    iteration from the 95th-percentile frame (each step moves the threshold one way only, so it ends).
    """
    if len(samples) == 0:
        return SILENCE_DBFS
    powers = _frame_powers(samples, sample_rate)
    powers = powers[powers > 10 ** (_SILENCE_FLOOR_DBFS / 10)]
    if len(powers) == 0:
        return SILENCE_DBFS
    margin = 10 ** (_ACTIVITY_MARGIN_DB / 10)
    level = float(np.percentile(powers, 95))
    for _ in range(len(powers) + 1):
        new_level = float(powers[powers >= level / margin].mean())
        if new_level == level:
            break
        level = new_level
    return _to_dbfs(level)


def normalise_level(
    samples: np.ndarray,
    target_dbfs: float = -26.0,
    max_gain_db: float = 30.0,
    sample_rate: int = TARGET_RATE,
) -> np.ndarray:
    """Scale audio so its active speech level is ``target_dbfs``, gaining at most ``max_gain_db``.

    Never clips: if the gain would push the peak over full scale, the gain is lowered to fit.
    Silent audio (no active frames) is returned unchanged.
    """
    samples = np.asarray(samples, dtype=np.float32)
    level = active_level_dbfs(samples, sample_rate)
    if level <= SILENCE_DBFS:
        return samples
    gain = 10 ** (min(target_dbfs - level, max_gain_db) / 20)
    peak = float(np.max(np.abs(samples)))
    gain = min(gain, 1.0 / peak)
    return (samples * np.float32(gain)).astype(np.float32)


def describe_level(samples: np.ndarray, sample_rate: int = TARGET_RATE) -> LevelStats:
    """Peak, RMS and active level in dBFS, and the share of clipped samples."""
    samples = np.asarray(samples, dtype=np.float32)
    if len(samples) == 0:
        raise AudioError("no audio samples to measure (the input is empty)")
    magnitude = np.abs(samples)
    return LevelStats(
        peak_dbfs=_to_dbfs(float(magnitude.max()) ** 2),
        rms_dbfs=_to_dbfs(float(np.mean(np.square(samples, dtype=np.float64)))),
        active_dbfs=active_level_dbfs(samples, sample_rate),
        clipped_fraction=float(np.mean(magnitude >= CLIP_THRESHOLD)),
    )
