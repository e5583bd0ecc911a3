"""The `vpmon` command as a user runs it: a real process, real recordings, real exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from devset import demo_pair

from verifier.calibration import Calibration

VPMON = Path(sys.executable).parent / "vpmon"


def vpmon(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VPMON, *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def pair(telephone_devset: Path) -> tuple[Path, Path, Path]:
    same_a, same_b, other = demo_pair("telephone")
    return telephone_devset / same_a, telephone_devset / same_b, telephone_devset / other


def test_compare_same_speaker_is_a_match(pair) -> None:
    result = vpmon("compare", pair[0], pair[1], "--json")
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["decision"] == "MATCH"
    assert verdict["score"] >= verdict["threshold"]
    assert verdict["model_id"] == "campplus-zh-en-16k"
    assert all(side["net_speech_seconds"] > 1.0 for side in verdict["sides"])


def test_compare_two_speakers_is_a_mismatch(pair) -> None:
    result = vpmon("compare", pair[0], pair[2])
    assert result.returncode == 0, result.stderr
    assert "MISMATCH" in result.stdout and "different speakers" in result.stdout
    assert "threshold" in result.stdout and "s of speech" in result.stdout


def test_compare_with_ge2e(pair) -> None:
    same = json.loads(vpmon("compare", pair[0], pair[1], "--model", "ge2e", "--json").stdout)
    other = json.loads(vpmon("compare", pair[0], pair[2], "--model", "ge2e", "--json").stdout)
    assert same["model_id"] == other["model_id"] == "ge2e-resemblyzer"
    assert same["score"] > other["score"]


def _write_bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    text = folder / "notes.wav"
    text.write_text("this is not audio\n")
    empty = folder / "empty.wav"
    empty.write_bytes(b"")
    silent = folder / "silent.wav"
    sf.write(silent, np.zeros(32000, np.float32), 16000)
    short = folder / "short.wav"
    tone = 0.3 * np.sin(2 * np.pi * 200 * np.arange(3200) / 16000)
    sf.write(short, tone.astype(np.float32), 16000)
    raw = folder / "audio.raw"
    raw.write_bytes(np.zeros(16000, np.int16).tobytes())
    return {
        "missing": (folder / "nope.wav", "not found"),
        "unreadable": (text, "cannot decode"),
        "empty": (empty, "empty"),
        "silent": (silent, "no speech"),
        "too short": (short, "no speech"),
        "wrong format": (raw, "cannot decode"),
        "a folder": (folder, "not found"),
    }


def test_bad_input_gets_one_line_and_exit_2(pair, tmp_path: Path) -> None:
    for case, (path, message) in _write_bad_inputs(tmp_path).items():
        result = vpmon("compare", path, pair[0])
        assert result.returncode == 2, case
        assert "Traceback" not in result.stderr, case
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (case, result.stderr)
        assert message in lines[0], (case, lines[0])


def test_unknown_model_and_bad_trials_are_user_errors(pair, tmp_path: Path) -> None:
    result = vpmon("compare", pair[0], pair[1], "--model", "whisper")
    assert result.returncode == 2 and "unknown model 'whisper'" in result.stderr
    trials = tmp_path / "trials.txt"
    trials.write_text("maybe a.wav b.wav\n")
    result = vpmon("score", trials)
    assert result.returncode == 2 and "trials.txt:1" in result.stderr


def test_score_and_calibrate_a_small_trials_list(telephone_devset: Path, tmp_path: Path) -> None:
    lines = (telephone_devset / "trials.txt").read_text().splitlines()
    targets = [line for line in lines if line.startswith("1 ")][:12]
    nontargets = [line for line in lines if line.startswith("0 ")][:24]
    trials = telephone_devset / "trials-small-test.txt"  # relative paths resolve against its folder
    trials.write_text("\n".join(targets + nontargets) + "\n")
    try:
        written = tmp_path / "score.json"
        result = vpmon("score", trials, "--durations", "full,1", "--json", "--output", written)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert json.loads(written.read_text()) == report
        assert [row["duration"] for row in report["results"]] == ["full", "1 s"]
        for row in report["results"]:
            assert row["targets"] == 12 and row["nontargets"] == 24
            assert 0.0 <= row["eer"] < 0.3
        output = tmp_path / "calibration.json"
        result = vpmon("calibrate", trials, "--durations", "full,1", "--no-save", "--output", output)
        assert result.returncode == 0, result.stderr
        fitted = json.loads(output.read_text())
        assert fitted["scale"] > 0 and fitted["min_seconds"] <= 1.01
        # 33 enrolment recordings: scores centred on the others' mean get a fit of their own.
        assert fitted["centred"]["scale"] > 0 and "centred" in fitted["centred"]["trained_on"]
        assert Calibration.from_dict(fitted).centred is not None

        # Three enrolment recordings are too few to centre on: the raw fit only, and a message says so.
        enrols = sorted({line.split()[1] for line in lines})[:3]
        few = [line for line in lines if line.split()[1] in enrols]
        trials.write_text("\n".join(few) + "\n")
        result = vpmon("calibrate", trials, "--durations", "full", "--no-save", "--output", output)
        assert result.returncode == 0, result.stderr
        assert "no fit for scores centred" in result.stderr
        assert "centred" not in json.loads(output.read_text())
    finally:
        trials.unlink()


def test_embed_writes_npz(pair, tmp_path: Path) -> None:
    output = tmp_path / "embeddings.npz"
    result = vpmon("embed", pair[0], pair[2], "--output", output)
    assert result.returncode == 0, result.stderr
    data = np.load(output)
    assert data["embeddings"].shape == (2, 192)
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, rtol=1e-5)
    assert str(data["model_id"]) == "campplus-zh-en-16k"


def test_models_list_and_info() -> None:
    listing = vpmon("models", "list")
    assert listing.returncode == 0 and "campplus-zh-en-16k" in listing.stdout and "ge2e" in listing.stdout
    card = json.loads(vpmon("models", "info", "campplus").stdout)
    assert card["embedding_dim"] == 192 and card["sample_rate"] == 16000
    assert card["frontend"]["kind"] == "kaldi_fbank" and card["licence"] == "Apache-2.0"
    assert card["weights_sha256"].startswith("92f29b94")
