"""Fuzzing (issue 9): every sans-I/O adapter, the audio decoders, the live audio chain, the VAD segmenter and
the model-file loaders on generated inputs, with a CI-sized budget (``VPMON_FUZZ_EXAMPLES`` inputs per
target, 700 by default: about 25 s for the file on a 2-core machine). The targets, their input strategies
and their properties live in ``tests/fuzz_targets.py``; ``benchmarks/fuzz.py`` runs the same targets with
100,000 inputs or more and a per-input watchdog for hangs.

Each ``@example`` is an input that once broke the product (an unhandled exception, a hang, a crash or a
broken invariant), kept as a regression.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings

from tests import fuzz_targets as ft
from verifier.audio import encode_mulaw
from verifier.models import torch_weights
from verifier.stream import AgentAudio

EXAMPLES = int(os.environ.get("VPMON_FUZZ_EXAMPLES", "700"))


def budget(share: float = 1.0) -> settings:
    return settings(
        max_examples=max(1, round(EXAMPLES * share)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# ------------------------------------------------------------------------------------------------ adapters


def _twilio_oversized() -> ft.Session:
    """A Twilio session whose media payload is 8001 bytes: base64 of it is as long as that of 8000, so the
    length check let one (or two) bytes over the limit through."""
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": "MZ" + "0" * 32,
        "start": {
            "streamSid": "MZ" + "0" * 32,
            "callSid": "CA" + "0" * 32,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    media = {
        "event": "media",
        "sequenceNumber": "2",
        "streamSid": "MZ" + "0" * 32,
        "media": {"track": "outbound", "payload": ft.b64(bytes(8001))},
    }
    return ft.Session(
        (json.dumps(start), json.dumps(media)), "oversize", (1, 1009), {"agent_track": "outbound"}
    )


@budget()
@given(ft.twilio_sessions())
@example(_twilio_oversized())
def test_twilio_media_streams(session: ft.Session) -> None:
    ft.check_twilio(session)


@budget()
@given(ft.twilio_upgrades())
# A Host header with a stray bracket made urlsplit raise ValueError out of validate_twilio_signature.
@example(ft.TwilioUpgrade("token", "wss://[/twilio", {}, "x", signed=False))
@example(
    ft.TwilioUpgrade(
        "token", "http://]/a b", {}, ft.twilio.twilio_signature("token", "http://]/a b"), signed=True
    )
)
def test_twilio_signature(case: ft.TwilioUpgrade) -> None:
    ft.check_twilio_upgrade(case)


@budget()
@given(ft.native_sessions())
def test_native_protocol(session: ft.Session) -> None:
    ft.check_native(session)


@budget()
@given(ft.audiohook_sessions())
def test_audiohook(case: ft.AudioHookInput) -> None:
    ft.check_audiohook(case)


@budget()
@given(ft.audiohook_upgrades())
def test_audiohook_upgrade_headers(case: ft.Upgrade) -> None:
    ft.check_audiohook_upgrade(case)


_NO_SETUP = "\r\n".join(line for line in ft.OPUS_OFFER.split("\r\n") if not line.startswith("a=setup"))


@budget()
@given(ft.whip_requests())
# An offer without a=setup: aiortc leaves the section's DTLS parameters None, and check_offer raised
# AttributeError instead of refusing it with a 400.
@example(ft.WhipRequest(_NO_SETUP, "application/sdp", {}, {}))
def test_whip_request(request: ft.WhipRequest) -> None:
    ft.check_whip_request(request)


@budget()
@given(ft.whip_calls())
def test_whip_call(case: ft.WhipFrames) -> None:
    ft.check_whip_call(case)


# ------------------------------------------------------------------------------------------------ audio


@budget()
@given(ft.CODEC_INPUTS)
def test_g711_and_pcm16_decoders(case: ft.Codec) -> None:
    ft.check_codecs(case)


# libsndfile asks soundfile's virtual file to seek before the start of a damaged file; the ValueError that
# BytesIO raises is swallowed by cffi (the read then fails as it should), but pytest reports it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@budget()
@given(ft.audio_files())
def test_uploaded_audio_files(case: ft.AudioFile) -> None:
    ft.check_audio_file(case)


@budget(0.5)
@given(ft.agent_streams())
# A gap of 104 days (the longest AudioHook duration, in one discarded message) allocated 268 GiB of zeros
# (MemoryError); a day took 36 s of CPU on the event loop.
@example(
    ft.AgentStream("mulaw", 8000, 1, None, (("feed", bytes(range(256)) * 8), ("silence", 9007199.254740991)))
)
@example(ft.AgentStream("pcm16", 16000, 2, 1, (("silence", 86400.0), ("feed", bytes(640)), ("flush",))))
def test_live_agent_audio(case: ft.AgentStream) -> None:
    ft.check_agent_stream(case)


def test_a_long_gap_gives_the_windows_its_silence_gives_at_once() -> None:
    """``feed_silence`` jumps over most of a long gap; the windows on both sides stay those that feeding
    every sample of silence gives (the resampler's own rounding aside), and 104 days cost milliseconds."""
    rng = np.random.default_rng(0)
    t = np.arange(8000 * 6) / 8000
    syllables = np.sin(2 * np.pi * 220 * t) * ((t * 3) % 1 < 0.6) * 0.3 + rng.standard_normal(len(t)) * 0.01
    payload = encode_mulaw(syllables.astype(np.float32))

    def windows(gap: float, *, skip: bool) -> tuple[list[Any], float]:
        audio = AgentAudio("mulaw", 8000)
        found = audio.feed(payload)
        if skip:
            found += audio.feed_silence(gap)
        else:  # what feed_silence did before: every sample of the gap through the whole chain
            audio.seconds_received += gap
            found += audio._segment(audio._resampler.process(np.zeros(round(gap * 8000), np.float32)))
        found += audio.feed(payload) + audio.flush()
        return found, audio.seconds_received

    for gap in (0.5, 12.5, 17.3, 45.0, 301.7):
        skipped, received = windows(gap, skip=True)
        fed, received_fed = windows(gap, skip=False)
        assert received == received_fed
        assert [(w.start, w.end, w.speech_seconds) for w in skipped] == [
            (w.start, w.end, w.speech_seconds) for w in fed
        ]
        assert skipped[-1].end > gap + 6  # the speech after the gap is on the call's clock
        for a, b in zip(skipped, fed, strict=True):
            np.testing.assert_allclose(a.samples, b.samples, atol=1e-6)
    audio = AgentAudio("mulaw", 8000)
    started = time.perf_counter()
    audio.feed_silence(9007199.254740991)
    after = audio.feed(payload) + audio.flush()
    assert time.perf_counter() - started < 2.0
    assert after and after[0].start > 9007199


@budget(0.5)
@given(ft.vad_inputs())
def test_vad_segmenter(case: ft.VadInput) -> None:
    ft.check_vad(case)


# ------------------------------------------------------------------------------------------------ model files


def _crafted(*entries: bytes, layout: str = "zip", valid: bool = True, **zip_options: Any) -> ft.Checkpoint:
    """A checkpoint of the given crafted entries, then (``valid``) one 4-element tensor "w"; storage "0"."""
    tensor = ft.Tensor("w", "FloatStorage", "0", 4, 0, (4,), (1,))
    valid_entry = ft._p_str("w") + ft._p_tensor(tensor, False) if valid else b""
    data_pkl = b"\x80\x02}(" + b"".join(entries) + valid_entry + b"u."
    storage = np.arange(4, dtype="<f4").tobytes()
    if layout == "legacy":
        data = ft._legacy(None, "crafted", data_pkl, {"0": storage}, {"0": ("FloatStorage", 4)})  # type: ignore[arg-type]
        return ft.Checkpoint("legacy", data, None, "crafted")
    buffer = io.BytesIO()
    with zipfile.ZipFile(
        buffer, "w", compression=zip_options.get("compression", zipfile.ZIP_STORED)
    ) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", zip_options.get("byteorder", b"little"))
        archive.writestr("archive/data/0", storage)
    data = bytearray(buffer.getvalue())
    if "method" in zip_options:  # every member says it is compressed with this method
        data = data.replace(
            b"\x14\x00\x00\x00\x08\x00", b"\x14\x00\x00\x00" + zip_options["method"].to_bytes(2, "little")
        )
    if "needs" in zip_options:  # the central directory says extracting needs this zip version
        data = data.replace(
            b"PK\x01\x02\x14\x03\x14\x00", b"PK\x01\x02\x14\x03" + bytes([zip_options["needs"], 0])
        )
    if "corrupt" in zip_options:  # the member's deflate stream starts with a block of the reserved type
        data[data.index(zip_options["corrupt"].encode()) + len(zip_options["corrupt"])] = 0xFF
    return ft.Checkpoint("zip", bytes(data), None, "crafted")


_STORAGE_PID = ft._pid(ft.Tensor("w", "FloatStorage", "0", 4, 0, (4,), (1,)))
_REBUILD = ft._p_global("torch._utils", "_rebuild_tensor_v2")
_FLOAT_STORAGE = ft._p_global("torch", "FloatStorage")
_EMPTY_TENSOR = ft.Tensor("e", "FloatStorage", "0", 4, 0, (0, 3), (3, 1))


@budget()
@given(ft.checkpoints())
# os.system in a pickle: refused by name, and nothing runs (the brief's crafted GLOBAL).
@example(
    ft.Checkpoint(
        "zip",
        _crafted(
            ft._p_str("evil") + ft._p_call(ft._p_global("os", "system"), ft._p_str("touch /tmp/x"))
        ).data,
        None,
        "forbidden",
        forbidden="os.system",
    )
)
# BUILD on an allow-listed global changed it for every file read afterwards: FloatStorage's dtype became "O"
# (later real checkpoints failed), _rebuild_tensor_v2 lost its defaults.
@example(_crafted(ft._p_str("x") + _FLOAT_STORAGE + b"}" + ft._p_str("dtype") + ft._p_str("O") + b"sb"))
@example(_crafted(ft._p_str("x") + _REBUILD + b"N}" + ft._p_str("__defaults__") + b")s\x86b"))
# BUILD on a tensor or a storage after its checks: a string shape raised TypeError; a "U1" dtype (the
# same 4 bytes an element) gave an array of text.
@example(
    _crafted(
        ft._p_str("t")
        + ft._p_tensor(ft.Tensor("t", "FloatStorage", "0", 4, 0, (4,), (1,)), False)
        + b"}"
        + ft._p_str("shape")
        + ft._p_str("a")
        + b"sb"
    )
)
@example(
    _crafted(
        ft._p_str("t")
        + ft._p_call(
            _REBUILD,
            _STORAGE_PID + b"}" + ft._p_str("dtype") + ft._p_str("U1") + b"sb",
            ft._p_int(0),
            ft._p_tuple(ft._p_int(4)),
            ft._p_tuple(ft._p_int(1)),
        ),
        valid=False,
    )
)
# Shared tuples (memo, DUP), 2**40 nodes in a few hundred bytes: hashing the key or printing the argument
# in an error message never ended.
@example(_crafted(ft._bomb(40, b")") + ft._p_int(1)))
@example(
    _crafted(
        ft._p_str("b") + ft._p_call(_REBUILD, _STORAGE_PID, ft._bomb(40, b")"), ft._p_tuple(), ft._p_tuple())
    )
)
@example(_crafted(b")" + b"2\x86" * 40 + ft._p_int(1)))
# A tuple a million levels deep as a key: hashing it overflowed the C stack (segmentation fault).
@example(_crafted(b"(" * 1_000_000 + b")" + b"t" * 1_000_000 + ft._p_int(1)))
# An integer key of 6,000 digits: str() of it raised ValueError (the 4,300-digit limit).
@example(
    _crafted(ft._p_int(2**20000) + ft._p_tensor(ft.Tensor("k", "FloatStorage", "0", 4, 0, (4,), (1,)), False))
)
# Stride 0 and a huge shape: np.array tried to allocate 3.6 TiB (MemoryError), or OverflowError.
@example(
    _crafted(ft._p_str("h") + ft._p_tensor(ft.Tensor("h", "FloatStorage", "0", 4, 0, (10**12,), (0,)), False))
)
@example(
    _crafted(ft._p_str("h") + ft._p_tensor(ft.Tensor("h", "FloatStorage", "0", 4, 0, (2**70,), (0,)), False))
)
# zipfile's own failures escaped: NotImplementedError (compression method 99; zip version 8.4, found by
# the 100,000-input benchmark run from one bit flip), zlib.error (bad deflate).
@example(_crafted(compression=zipfile.ZIP_DEFLATED, method=99))
# Found by atheris: is_zipfile() itself raises BadZipFile for a ZIP64 end locator naming another disk.
@example(
    ft.Checkpoint(
        "zip", _crafted().data[:-22] + b"PK\x06\x07\x01" + bytes(15) + _crafted().data[-22:], None, "zip64"
    )
)
# Found by atheris: one LONG_BINPUT with a 4-byte index made the C unpickler allocate and zero a memo
# table that size (2.7 GB for index 171,079,263 in a 470-byte file; up to 32 GB).
@example(_crafted(ft._p_str("m") + ft._p_int(1) + b"r" + (171_079_263).to_bytes(4, "little")))
@example(
    _crafted(ft._p_str("m") + ft._p_int(1) + b"r" + (171_079_263).to_bytes(4, "little"), layout="legacy")
)
@example(_crafted(needs=84))
@example(_crafted(compression=zipfile.ZIP_DEFLATED, corrupt="archive/byteorder"))
@example(_crafted(compression=zipfile.ZIP_DEFLATED, corrupt="archive/data.pkl"))
# A big-endian checkpoint's empty tensor came back in big-endian order (the loader promises native order).
@example(_crafted(ft._p_str("e") + ft._p_tensor(_EMPTY_TENSOR, False), byteorder=b"big"))
@example(_crafted(ft._bomb(40, b")") + ft._p_int(1), layout="legacy"))
def test_torch_checkpoint_loader(case: ft.Checkpoint) -> None:
    ft.check_checkpoint(case)


def test_crafted_files_leave_the_loader_as_it_was() -> None:
    """The BUILD examples above, then a valid checkpoint: it loads as if they had never been read."""
    poison = [
        _crafted(ft._p_str("x") + _FLOAT_STORAGE + b"}" + ft._p_str("dtype") + ft._p_str("O") + b"sb"),
        _crafted(ft._p_str("x") + _REBUILD + b"N}" + ft._p_str("__defaults__") + b")s\x86b"),
    ]
    for case in poison:
        ft.check_checkpoint(case)  # refused, and the allow-listed objects are unchanged
    path = ft.scratch() / "valid.pt"
    path.write_bytes(_crafted().data)
    np.testing.assert_array_equal(torch_weights.load_state_dict(path)["w"], np.arange(4, dtype=np.float32))


def _spec(*lines: str) -> ft.SpecFile:
    return ft.SpecFile("\n".join(lines).encode())


_FBANK = '[frontend]\nkind = "kaldi_fbank"\nnum_bins = 80'


@budget()
@given(ft.spec_files())
@example(ft.SpecFile(b'id = "caf\xe9"\n'))  # not UTF-8: UnicodeDecodeError escaped
# int(inf) raised OverflowError; wrong types were accepted and failed later in the embedder or the CLI.
@example(_spec('id = "m"', 'onnx = "model.onnx"', "embedding_dim = 192", "sample_rate = inf", _FBANK))
@example(_spec('id = "m"', 'onnx = "model.onnx"', "embedding_dim = false", _FBANK))
@example(
    _spec(
        "id = 3",
        "name = false",
        'onnx = "model.onnx"',
        "embedding_dim = 1",
        "[frontend]",
        "kind = []",
        'num_bins = "x"',
    )
)
@example(
    _spec('id = "m"', 'onnx = "model.onnx"', "embedding_dim = 1", _FBANK, "[windows]", 'partial_frames = ""')
)
def test_model_spec_files(case: ft.SpecFile) -> None:
    ft.check_spec(case)


@budget()
@given(ft.trials_files())
@example(ft.TrialsFile(b"\xff\xfe1\x00 \x00a\x00", "full"))  # UTF-16: UnicodeDecodeError escaped
@example(ft.TrialsFile(b"1 a.wav b.wav\n", "inf,nan,1e999"))  # accepted as durations
def test_trials_files(case: ft.TrialsFile) -> None:
    ft.check_trials(case)
