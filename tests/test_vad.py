import itertools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from verifier.audio import active_level_dbfs, read_audio, resample
from verifier.vad import SpeechWindow, VadSegmenter, segment

RATE = 16000
# webrtcvad holds its decision for a few frames after speech stops, so windows end up to ~0.15 s
# after the true end; starts are within a frame or two.
START_TOLERANCE = 0.1
END_TOLERANCE = 0.25

Voices = dict[str, np.ndarray]
Conversation = tuple[np.ndarray, list[tuple[float, float]]]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.float32)


def speak(directory: Path, name: str, voice: str, text: str) -> np.ndarray:
    """espeak-ng speech at 16 kHz, trimmed to where the voice is audible (its true extent)."""
    wav = directory / f"{name}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True)
    audio = read_audio(wav)
    samples = resample(audio.samples, audio.sample_rate, RATE)
    audible = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[audible[0] : audible[-1] + 1]


@pytest.fixture(scope="session")
def voices(tmp_path_factory: pytest.TempPathFactory) -> Voices:
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng for synthetic speech")
    directory = tmp_path_factory.mktemp("espeak")
    return {
        "weather": speak(directory, "weather", "en-us", "The weather is lovely today"),
        "hold": speak(directory, "hold", "en-gb", "Please hold while I check your account"),
        "thanks": speak(directory, "thanks", "en-us+f3", "Thank you for calling support"),
        "yes": speak(directory, "yes", "en-us", "Yes"),
        "long": speak(
            directory,
            "long",
            "en-us",
            "Our customer service team is available around the clock to help you with billing questions "
            "and technical problems and anything else that you might need today",
        ),
    }


@pytest.fixture(scope="session")
def conversation(voices: Voices) -> Conversation:
    """Three sentences, each after 1 s of silence, with their true start and end times."""
    pieces, truth, position = [], [], 0
    for name in ("weather", "hold", "thanks"):
        pieces += [silence(1.0), voices[name]]
        start = position + RATE
        position = start + len(voices[name])
        truth.append((start / RATE, position / RATE))
    pieces.append(silence(1.0))
    return np.concatenate(pieces), truth


def stream(samples: np.ndarray, chunk_sizes: list[int], **options: Any) -> list[SpeechWindow]:
    segmenter = VadSegmenter(**options)
    windows, position = [], 0
    for size in chunk_sizes:
        windows += segmenter.feed(samples[position : position + size])
        position += size
    assert position >= len(samples)
    return windows + segmenter.flush()


def assert_same_windows(actual: list[SpeechWindow], expected: list[SpeechWindow]) -> None:
    assert [(w.start, w.end, w.speech_seconds) for w in actual] == [
        (w.start, w.end, w.speech_seconds) for w in expected
    ]
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a.samples, e.samples)


# ---------------------------------------------------------------------------------------------- alignment


def test_windows_align_with_sentences(conversation: Conversation) -> None:
    samples, truth = conversation
    windows = segment(samples)
    assert len(windows) == len(truth)
    for window, (start, end) in zip(windows, truth, strict=True):
        assert abs(window.start - start) <= START_TOLERANCE
        assert -END_TOLERANCE / 2 <= window.end - end <= END_TOLERANCE
        assert 0 < window.speech_seconds <= window.duration


def test_window_samples_are_the_audio_of_their_span(conversation: Conversation) -> None:
    samples, _ = conversation
    for window in segment(samples):
        first, last = round(window.start * RATE), round(window.end * RATE)
        assert window.samples.dtype == np.float32
        np.testing.assert_array_equal(window.samples, samples[first:last])


def test_long_speech_is_cut_into_pieces_of_at_most_max_window(voices: Voices) -> None:
    long_speech = np.concatenate([silence(0.5), voices["long"], silence(0.5)])
    assert len(voices["long"]) / RATE > 8
    windows = segment(long_speech, max_window=3.0)
    assert len(windows) >= 3
    assert all(0.5 <= w.duration <= 3.0 + 1e-9 for w in windows)
    assert sum(w.duration for w in windows) >= 0.8 * len(voices["long"]) / RATE
    starts = [w.start for w in windows]
    assert starts == sorted(starts)
    assert all(a.end <= b.start for a, b in itertools.pairwise(windows))


def test_max_window_applies_while_streaming(voices: Voices) -> None:
    # A long run must yield its first piece as soon as it is full, not when the speaker stops.
    segmenter = VadSegmenter(max_window=2.0)
    first_four_seconds = np.concatenate([silence(0.5), voices["long"]])[: 4 * RATE]
    windows = segmenter.feed(first_four_seconds)
    assert len(windows) >= 1
    assert windows[0].duration == pytest.approx(2.0, abs=0.1)


# ---------------------------------------------------------------------------------------------- rules


def test_pauses_up_to_hangover_are_bridged(voices: Voices) -> None:
    for gap, expected_windows in [(0.2, 1), (0.6, 2)]:
        samples = np.concatenate([silence(0.5), voices["weather"], silence(gap), voices["yes"], silence(0.5)])
        windows = segment(samples, hangover_ms=300, min_window=0.2, max_window=6.0)
        assert len(windows) == expected_windows, gap
    # The bridged window carries the pause: it is longer than its voiced frames.
    bridged = segment(
        np.concatenate([voices["weather"], silence(0.25), voices["thanks"]]),
        max_window=6.0,
        min_speech_ratio=0.0,
    )
    assert len(bridged) == 1
    assert bridged[0].speech_seconds < bridged[0].duration - 0.05


def test_short_utterances_are_dropped(voices: Voices) -> None:
    samples = np.concatenate([silence(0.5), voices["yes"], silence(0.5)])
    assert len(voices["yes"]) / RATE < 0.5
    assert segment(samples, min_window=0.5) == []
    assert len(segment(samples, min_window=0.2)) == 1


def test_windows_with_too_little_speech_are_dropped(voices: Voices) -> None:
    # Two short words bridged over a pause: a window that is largely pause.
    samples = np.concatenate([silence(0.5), voices["yes"], silence(0.29), voices["yes"], silence(0.5)])
    kept = segment(samples, min_window=0.2, min_speech_ratio=0.0)
    assert len(kept) == 1
    ratio = kept[0].speech_seconds / kept[0].duration
    assert ratio < 0.9
    assert segment(samples, min_window=0.2, min_speech_ratio=ratio + 0.01) == []


def test_silence_and_quiet_noise_give_no_windows() -> None:
    assert segment(silence(5.0)) == []
    noise = 10 ** (-40 / 20) * np.random.default_rng(3).standard_normal(5 * RATE)
    assert segment(noise.astype(np.float32)) == []


def test_level_gate_drops_faint_crosstalk_and_keeps_speech(conversation: Conversation) -> None:
    """The customer's voice bleeding faintly into the agent's channel is speech to webrtcvad, and would
    be judged as another speaker; under the level gate it is no window at all."""
    samples, _ = conversation
    level = active_level_dbfs(samples)
    crosstalk = (samples * 10 ** ((-60 - level) / 20)).astype(np.float32)  # at -60 dBFS
    assert segment(crosstalk) != []  # the problem the gate solves
    assert segment(crosstalk, min_frame_dbfs=-50.0) == []
    # Speech itself keeps its windows (espeak's near-silent word gaps, which webrtcvad calls voiced, go).
    gated = segment(samples, min_frame_dbfs=level - 30.0)
    assert sum(w.speech_seconds for w in gated) >= 0.9 * sum(w.speech_seconds for w in segment(samples))
    assert len(gated) == len(segment(samples))


# ---------------------------------------------------------------------------------------------- streaming


def test_random_chunkings_give_the_whole_file_windows(conversation: Conversation) -> None:
    samples, _ = conversation
    expected = segment(samples)
    rng = np.random.default_rng(2024)
    for largest in (10, 500, 5000, 50000, 500000):
        sizes: list[int] = []
        while sum(sizes) < len(samples):
            sizes.append(int(rng.integers(1, largest + 1)))
        assert_same_windows(stream(samples, sizes), expected)


def test_single_sample_and_huge_chunks_give_the_whole_file_windows(voices: Voices) -> None:
    samples = np.concatenate([silence(0.3), voices["weather"], silence(0.5), voices["thanks"], silence(0.4)])
    expected = segment(samples)
    assert len(expected) == 2
    assert_same_windows(stream(samples, [1] * len(samples)), expected)
    assert_same_windows(stream(samples, [len(samples) * 10]), expected)
    assert_same_windows(stream(samples, [0, 479, 1, 481, len(samples)]), expected)


def test_flush_resets_for_a_new_stream(conversation: Conversation) -> None:
    samples, _ = conversation
    segmenter = VadSegmenter()
    first = segmenter.feed(samples) + segmenter.flush()
    second = segmenter.feed(samples) + segmenter.flush()
    assert_same_windows(second, first)


def test_flush_emits_speech_still_open_at_the_end(voices: Voices) -> None:
    samples = np.concatenate([silence(0.5), voices["weather"]])  # the stream stops mid-speech
    segmenter = VadSegmenter()
    assert segmenter.feed(samples) == []
    [window] = segmenter.flush()
    assert window.end == pytest.approx(len(samples) / RATE, abs=0.05)


@pytest.mark.parametrize("frame_ms", [10, 20])
def test_other_frame_sizes_also_find_the_sentences(conversation: Conversation, frame_ms: int) -> None:
    samples, truth = conversation
    windows = segment(samples, frame_ms=frame_ms)
    assert len(windows) == len(truth)
    assert all(abs(w.start - start) <= START_TOLERANCE for w, (start, _) in zip(windows, truth, strict=True))


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sample_rate": 8000}, "resample first"),
        ({"sample_rate": 48000}, "16000 Hz"),
        ({"frame_ms": 25}, "10, 20 or 30"),
        ({"aggressiveness": 4}, "aggressiveness"),
        ({"min_window": 2.0, "max_window": 1.0}, "min_window <= max_window"),
        ({"min_window": 0.0}, "0 < min_window"),
        ({"min_window": 0.01, "max_window": 0.02}, "shorter than one"),
        ({"hangover_ms": -10}, "hangover_ms"),
        ({"min_speech_ratio": 1.5}, "min_speech_ratio"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VadSegmenter(**options)


def test_feed_refuses_integer_and_multichannel_input() -> None:
    segmenter = VadSegmenter()
    with pytest.raises(ValueError, match="float samples"):
        segmenter.feed(np.zeros(480, dtype=np.int16))
    with pytest.raises(ValueError, match="1-D"):
        segmenter.feed(np.zeros((480, 2), dtype=np.float32))


def test_equal_min_and_max_window_still_yields_windows(voices: Voices) -> None:
    # 0.5 s is not a whole number of 30 ms frames; rounding must not make min exceed max.
    windows = segment(voices["long"], min_window=0.5, max_window=0.5)
    assert len(windows) > 5
    assert {round(w.duration, 6) for w in windows} == {0.48}
