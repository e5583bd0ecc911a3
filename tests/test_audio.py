import shutil
import subprocess
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf

from verifier.audio import (
    ALAW_TO_PCM16,
    MULAW_TO_PCM16,
    SILENCE_DBFS,
    Audio,
    StreamResampler,
    active_level_dbfs,
    decode_alaw,
    decode_mulaw,
    decode_pcm16,
    deinterleave,
    describe_level,
    encode_alaw,
    encode_mulaw,
    normalise_level,
    read_audio,
    resample,
    select_channel,
    to_pcm16,
)
from verifier.errors import AudioError

ALL_CODES = bytes(range(256))
ALL_PCM16 = np.arange(-32768, 32768, dtype=np.int16)


def sine(frequency: float, seconds: float, rate: int = 16000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def dbfs(samples: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.square(samples, dtype=np.float64)))


def import_audioop() -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("audioop")  # in the stdlib until Python 3.13


# ---------------------------------------------------------------------------------------------- files


def test_read_audio_returns_float32_mono_and_rate(tmp_path: Path) -> None:
    pcm = np.array([0, 16384, -16384, 32767, -32768], dtype=np.int16)
    sf.write(tmp_path / "a.wav", pcm, 8000, subtype="PCM_16")
    audio = read_audio(tmp_path / "a.wav")
    assert isinstance(audio, Audio)
    assert audio.sample_rate == 8000
    assert audio.samples.dtype == np.float32
    np.testing.assert_array_equal(audio.samples, pcm / 32768.0)
    assert audio.duration == pytest.approx(5 / 8000)


@pytest.mark.parametrize(("suffix", "subtype"), [("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_read_audio_decodes_flac_and_ogg(tmp_path: Path, suffix: str, subtype: str) -> None:
    tone = sine(440, 1.0)
    sf.write(tmp_path / f"tone.{suffix}", tone, 16000, subtype=subtype)
    audio = read_audio(tmp_path / f"tone.{suffix}")
    assert audio.sample_rate == 16000
    assert len(audio.samples) == len(tone)
    assert dbfs(audio.samples) == pytest.approx(dbfs(tone), abs=0.5)  # Vorbis is lossy


def test_read_audio_picks_a_channel_or_mixes_down(tmp_path: Path) -> None:
    left, right = sine(300, 0.5, amplitude=0.4), sine(500, 0.5, amplitude=0.2)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(read_audio(tmp_path / "stereo.wav", channel=1).samples, right)
    np.testing.assert_allclose(read_audio(tmp_path / "stereo.wav").samples, (left + right) / 2, atol=1e-7)
    with pytest.raises(AudioError, match=r"choose 0\.\.1"):
        read_audio(tmp_path / "stereo.wav", channel=2)


def test_read_audio_clips_float_files_beyond_full_scale(tmp_path: Path) -> None:
    sf.write(tmp_path / "hot.wav", np.array([1.5, -2.0, 0.25], dtype=np.float32), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(read_audio(tmp_path / "hot.wav").samples, [1.0, -1.0, 0.25])


def test_read_audio_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"not found.*check the path"):
        read_audio(tmp_path / "missing.wav")

    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"is empty \(0 bytes\)"):
        read_audio(tmp_path / "zero.wav")

    (tmp_path / "text.wav").write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match=r"cannot decode.*use WAV, FLAC or OGG"):
        read_audio(tmp_path / "text.wav")

    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.int16), 16000)
    with pytest.raises(AudioError, match="no audio samples"):
        read_audio(tmp_path / "empty.wav")

    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2], dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        read_audio(tmp_path / "nan.wav")


# -------------------------------------------------------------------------------------- PCM16, channels


def test_decode_pcm16_is_little_endian_and_scaled_to_full_scale() -> None:
    data = np.array([0, 1, -1, 32767, -32768], dtype="<i2").tobytes()
    np.testing.assert_array_equal(decode_pcm16(data), np.array([0, 1, -1, 32767, -32768]) / 32768.0)
    assert decode_pcm16(b"\x00\x80").tolist() == [-1.0]  # 0x8000 little-endian


def test_decode_pcm16_stereo_shape_and_bad_lengths() -> None:
    data = np.array([1, 2, 3, 4, 5, 6], dtype="<i2").tobytes()
    stereo = decode_pcm16(data, channels=2)
    assert stereo.shape == (3, 2)
    np.testing.assert_array_equal(stereo[:, 1] * 32768, [2, 4, 6])
    with pytest.raises(AudioError, match="not a whole number"):
        decode_pcm16(b"\x00\x01\x02")
    with pytest.raises(AudioError, match="2-channel"):
        decode_pcm16(b"\x00" * 6, channels=2)


def test_deinterleave_and_select_channel() -> None:
    interleaved = np.array([1, -1, 2, -2, 3, -3], dtype=np.float32)
    channels = deinterleave(interleaved, 2)
    assert channels.shape == (2, 3)
    np.testing.assert_array_equal(channels[0], [1, 2, 3])
    np.testing.assert_array_equal(channels[1], [-1, -2, -3])
    with pytest.raises(AudioError, match="do not divide"):
        deinterleave(interleaved, 4)
    frames = channels.T
    np.testing.assert_array_equal(select_channel(frames, None), [0, 0, 0])
    np.testing.assert_array_equal(select_channel(frames, 1), [-1, -2, -3])
    np.testing.assert_array_equal(select_channel(interleaved, None), interleaved)


def test_to_pcm16_rounds_and_clips() -> None:
    values = np.array([0.0, 0.4 / 32768, 0.6 / 32768, -0.6 / 32768, 1.0, -1.0, 2.0, -2.0])
    assert to_pcm16(values).tolist() == [0, 0, 1, -1, 32767, -32768, 32767, -32768]


# ---------------------------------------------------------------------------------------------- G.711


def test_g711_known_code_points() -> None:
    # μ-law: bits are inverted on the wire, 0xFF and 0x7F are ±0, 0x80 / 0x00 the largest ±32124.
    assert MULAW_TO_PCM16[[0xFF, 0x7F, 0x80, 0x00, 0xFE, 0xEF]].tolist() == [0, 0, 32124, -32124, 8, 132]
    # A-law: even bits inverted, no zero level: 0xD5 / 0x55 are ±8, 0xAA / 0x2A the largest ±32256.
    assert ALAW_TO_PCM16[[0xD5, 0x55, 0xAA, 0x2A, 0xD4, 0xC5]].tolist() == [8, -8, 32256, -32256, 24, 264]
    assert decode_mulaw(b"\x80\x00\xff").tolist() == [32124 / 32768, -32124 / 32768, 0.0]
    assert decode_alaw(b"\xd5").dtype == np.float32


def test_g711_decoders_agree_with_stdlib_audioop_on_all_codes() -> None:
    audioop = import_audioop()
    np.testing.assert_array_equal(MULAW_TO_PCM16, np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), "<i2"))
    np.testing.assert_array_equal(ALAW_TO_PCM16, np.frombuffer(audioop.alaw2lin(ALL_CODES, 2), "<i2"))


def test_g711_encoders_agree_with_stdlib_audioop() -> None:
    audioop = import_audioop()
    ours_alaw = np.frombuffer(encode_alaw(ALL_PCM16), np.uint8)
    np.testing.assert_array_equal(
        ours_alaw, np.frombuffer(audioop.lin2alaw(ALL_PCM16.tobytes(), 2), np.uint8)
    )
    # audioop drops μ-law's two low bits with an arithmetic shift, which floors negative values (-1 → -1
    # → code for -8); we quantise the magnitude symmetrically (-1 → 0). Both agree wherever the shift is
    # exact: on all non-negative values and all multiples of 4.
    ours_mulaw = np.frombuffer(encode_mulaw(ALL_PCM16), np.uint8)
    theirs_mulaw = np.frombuffer(audioop.lin2ulaw(ALL_PCM16.tobytes(), 2), np.uint8)
    exact_shift = (ALL_PCM16 >= 0) | (ALL_PCM16 % 4 == 0)
    np.testing.assert_array_equal(ours_mulaw[exact_shift], theirs_mulaw[exact_shift])


def test_mulaw_round_trip_error_is_at_most_half_a_step() -> None:
    codes = np.frombuffer(encode_mulaw(ALL_PCM16), np.uint8)
    error = np.abs(MULAW_TO_PCM16[codes].astype(int) - ALL_PCM16)
    exponent = ((~codes) >> 4) & 0x07
    half_step = 4 << exponent.astype(int)  # steps are 8, 16, ... 1024 in 16-bit units
    in_range = np.abs(ALL_PCM16.astype(int)) <= 32635
    assert np.all(error[in_range] <= half_step[in_range])
    # Beyond the top decision level everything maps to the largest code.
    assert set(MULAW_TO_PCM16[codes[~in_range]].tolist()) == {32124, -32124}
    assert error.max() <= 32768 - 32124


def test_alaw_round_trip_error_is_at_most_half_a_step() -> None:
    codes = np.frombuffer(encode_alaw(ALL_PCM16), np.uint8)
    error = np.abs(ALAW_TO_PCM16[codes].astype(int) - ALL_PCM16)
    exponent = ((codes ^ 0x55) >> 4) & 0x07
    half_step = 8 << np.maximum(exponent.astype(int) - 1, 0)  # steps 16, 16, 32, ... 1024
    assert np.all(error <= half_step)


def test_g711_encoding_decoded_values_gives_the_code_back() -> None:
    assert np.frombuffer(encode_alaw(ALAW_TO_PCM16), np.uint8).tolist() == list(range(256))
    mulaw = np.frombuffer(encode_mulaw(MULAW_TO_PCM16), np.uint8).tolist()
    expected = list(range(256))
    expected[0x7F] = 0xFF  # μ-law's negative zero decodes to 0, which encodes as positive zero
    assert mulaw == expected


def test_g711_encoders_take_float_samples_and_keep_snr_over_levels() -> None:
    # Companding keeps the SNR near 35-38 dB from loud to 34 dB quieter; 1013 Hz avoids a tone that
    # repeats on a few sample phases (1000 Hz at 8 kHz does) and so would not exercise many codes.
    for amplitude in (0.5, 0.1, 0.01):
        tone = sine(1013, 1.0, rate=8000, amplitude=amplitude)
        for encode, decode in [(encode_mulaw, decode_mulaw), (encode_alaw, decode_alaw)]:
            data = encode(tone)
            assert len(data) == len(tone)
            noise = decode(data) - tone
            assert dbfs(tone) - dbfs(noise) > 33


# ---------------------------------------------------------------------------------------------- resampling


def test_resample_equal_rates_is_identity() -> None:
    tone = sine(440, 0.1)
    assert resample(tone, 16000, 16000) is tone


def test_resample_keeps_frequency_and_level() -> None:
    tone = sine(1000, 1.0, rate=8000, amplitude=0.5)
    out = resample(tone, 8000)
    assert out.dtype == np.float32
    assert len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    assert np.argmax(spectrum) * 16000 / len(out) == pytest.approx(1000, abs=1)
    assert dbfs(out[1000:-1000]) == pytest.approx(dbfs(tone), abs=0.05)


@pytest.mark.parametrize(("from_rate", "to_rate"), [(8000, 16000), (22050, 16000), (48000, 16000)])
def test_stream_resampler_matches_one_shot(from_rate: int, to_rate: int) -> None:
    rng = np.random.default_rng(7)
    signal = (0.1 * rng.standard_normal(from_rate * 2)).astype(np.float32)
    one_shot = resample(signal, from_rate, to_rate)
    stream = StreamResampler(from_rate, to_rate)
    pieces, position = [], 0
    while position < len(signal):
        size = int(rng.integers(1, 2000))
        pieces.append(stream.process(signal[position : position + size]))
        position += size
    pieces.append(stream.flush())
    streamed = np.concatenate(pieces)
    assert len(streamed) == len(one_shot)
    # soxr 1.1 produces bit-identical output here; the tolerance only allows for other builds.
    np.testing.assert_allclose(streamed, one_shot, atol=1e-6)


def test_stream_resampler_equal_rates_passes_through() -> None:
    stream = StreamResampler(16000, 16000)
    tone = sine(440, 0.01)
    np.testing.assert_array_equal(stream.process(tone), tone)
    assert len(stream.flush()) == 0


def test_resample_rejects_bad_rates() -> None:
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(10, np.float32), 0)


# ---------------------------------------------------------------------------------------------- levels


def bursts(level_dbfs: float, silence_seconds: float) -> np.ndarray:
    """Five 0.4 s tone bursts at a known RMS level, separated and padded by silence."""
    burst = sine(700, 0.4, amplitude=np.sqrt(2) * 10 ** (level_dbfs / 20))
    gap = np.zeros(round(silence_seconds * 16000), dtype=np.float32)
    return np.concatenate([gap] + [np.concatenate([burst, gap]) for _ in range(5)])


def test_active_level_ignores_silence() -> None:
    for silence in (0.1, 1.0, 5.0):
        assert active_level_dbfs(bursts(-35.0, silence)) == pytest.approx(-35.0, abs=0.1)
    assert active_level_dbfs(np.zeros(16000, np.float32)) == SILENCE_DBFS


def test_normalise_level_brings_active_level_to_target() -> None:
    signal = bursts(-40.0, 2.0)
    out = normalise_level(signal, target_dbfs=-26.0)
    assert out.dtype == np.float32
    assert active_level_dbfs(out) == pytest.approx(-26.0, abs=0.1)
    # The whole-file RMS is far lower because of the silence; it must not have driven the gain.
    assert dbfs(out) < -30


def test_normalise_level_gain_is_capped() -> None:
    out = normalise_level(bursts(-65.0, 0.5), target_dbfs=-26.0, max_gain_db=30.0)
    assert active_level_dbfs(out) == pytest.approx(-65.0 + 30.0, abs=0.1)


def test_normalise_level_never_clips() -> None:
    signal = bursts(-40.0, 0.5)
    signal[100] = 0.5  # a click: the gain needed for the bursts would push it far over full scale
    out = normalise_level(signal, target_dbfs=-20.0)
    assert np.max(np.abs(out)) <= 1.0
    assert np.max(np.abs(out)) == pytest.approx(1.0, abs=1e-6)


def test_normalise_level_leaves_silence_alone() -> None:
    silence = np.zeros(8000, np.float32)
    np.testing.assert_array_equal(normalise_level(silence), silence)


def test_describe_level() -> None:
    stats = describe_level(sine(1000, 1.0, amplitude=1.0))
    assert stats.peak_dbfs == pytest.approx(0.0, abs=0.01)
    assert stats.rms_dbfs == pytest.approx(-3.01, abs=0.01)
    assert stats.active_dbfs == pytest.approx(-3.01, abs=0.01)
    assert stats.clipped_fraction > 0  # a full-scale sine spends a little time above 0.98

    clipped = np.clip(sine(1000, 1.0, amplitude=2.0), -1, 1)
    assert describe_level(clipped).clipped_fraction > 0.5
    assert describe_level(sine(1000, 1.0, amplitude=0.5)).clipped_fraction == 0.0
    # A clipped μ-law channel never exceeds ±32124 / 32768 but still counts as clipped.
    telephone = decode_mulaw(encode_mulaw(clipped))
    assert describe_level(telephone).clipped_fraction > 0.5

    silent = describe_level(np.zeros(100, np.float32))
    assert silent.peak_dbfs == silent.rms_dbfs == SILENCE_DBFS
    with pytest.raises(AudioError, match="empty"):
        describe_level(np.zeros(0, np.float32))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_normalise_level_on_speech_does_not_depend_on_padding(tmp_path: Path) -> None:
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), "Thank you for calling"], check=True)
    audio = read_audio(wav)
    speech = resample(audio.samples, audio.sample_rate) * np.float32(0.05)
    padded = np.concatenate([np.zeros(5 * 16000, np.float32), speech, np.zeros(5 * 16000, np.float32)])
    gain_alone = np.max(np.abs(normalise_level(speech))) / np.max(np.abs(speech))
    gain_padded = np.max(np.abs(normalise_level(padded))) / np.max(np.abs(padded))
    assert 20 * np.log10(gain_padded / gain_alone) == pytest.approx(0.0, abs=0.5)
    assert active_level_dbfs(normalise_level(padded)) == pytest.approx(-26.0, abs=0.1)
