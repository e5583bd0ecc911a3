"""Accuracy of vpmon's speaker models on the dev voices (real recorded speech, see ../shared/DATA.md).

    python benchmarks/accuracy.py                      everything (about 5 min on 2 cores)
    python benchmarks/accuracy.py --quick              a smoke run on a subset of the utterances
    python benchmarks/accuracy.py --models campplus --modes telephone

Sections (all through the same pipeline as ``vpmon score``: level → VAD windows → the front end (the
narrowband fill for 8 kHz audio, ``VadConfig.narrowband_fill_dbfs``; ``--narrowband-fill off``: without)
→ embeddings averaged):

1. **Durations**: EER and minDCF(p=0.01) of the dev set's trial list, enrolment whole, test side cut to
   full / 3 / 1 / 0.5 s of net speech, per model and dev-set mode (seed 0).
2. **Calibration**: the packaged calibration was fitted on the telephone set of seed 0 (the tuning draw);
   here it is applied to the same mode's seed-1 trials (the held-out draw): Cllr (bits; 1 =
   uninformative) and the actual miss / false-alarm rates of the Bayes decision ``llr >= 0``
   (calibration prior 0.5), per duration.
3. **Accumulation** (telephone): does evidence from k consecutive 3 s windows of one talker add up, and is
   averaging the k window embeddings as good as re-embedding the k·3 s span? See ``build_calls``.
4. **VAD** (CAM++, telephone): full / 3 s EER for webrtcvad aggressiveness 0–3, for windows concatenated
   instead of averaged, and for no VAD at all (whole file, or its first 3 s of audio, in one pass).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from common import environment  # noqa: E402
from devset import devset_dir  # noqa: E402

from verifier.audio import read_audio  # noqa: E402
from verifier.calibration import packaged_calibration  # noqa: E402
from verifier.embedder import Embedder, l2_normalise  # noqa: E402
from verifier.metrics import cllr, detection_errors  # noqa: E402
from verifier.models.provision import ensure_model  # noqa: E402
from verifier.narrowband import fill_empty_band, is_narrowband  # noqa: E402
from verifier.pipeline import (  # noqa: E402
    SAMPLE_RATE,
    Combine,
    VadConfig,
    combine_embeddings,
    embed_windows,
    load_speech,
    load_windows,
)
from verifier.trials import (  # noqa: E402
    Trial,
    centring_means,
    duration_label,
    read_trials,
    score_trials,
    speaker_folder,
)
from verifier.vad import SpeechWindow  # noqa: E402

DURATIONS: list[float | None] = [None, 3.0, 1.0, 0.5]
P_TARGET = 0.01
WINDOW_SECONDS = 3.0
KS = (1, 2, 4)
HELD_OUT_SEED = 1  # the packaged calibrations are fitted on seed 0; they are checked on this draw
QUICK_UTTERANCES = 4  # --quick: the first few utterances of every speaker
OUTPUT = BENCH / "results" / "accuracy.json"

console = Console(width=None if sys.stdout.isatty() else 150)


# --- dev set ----------------------------------------------------------------------------------------
def utterances_by_speaker(devdir: Path) -> dict[str, list[Path]]:
    """Speaker → their utterances in file order, from the dev set's ``utts.tsv``."""
    by_speaker: dict[str, list[Path]] = defaultdict(list)
    lines = (devdir / "utts.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    for line in lines[1:]:
        row = dict(zip(header, line.split("\t"), strict=True))
        by_speaker[row["speaker"]].append(devdir / row["path"])
    return {speaker: sorted(paths) for speaker, paths in sorted(by_speaker.items())}


def quick_subset(devdir: Path) -> set[Path]:
    return {p for paths in utterances_by_speaker(devdir).values() for p in paths[:QUICK_UTTERANCES]}


def load_trials(devdir: Path, quick: bool) -> list[Trial]:
    trials = read_trials(devdir / "trials.txt")
    if quick:
        keep = quick_subset(devdir)
        trials = [t for t in trials if t.enrol in keep and t.test in keep]
    return trials


# --- 1 + 2: durations and calibration --------------------------------------------------------------
def duration_rows(
    mode: str, embedder: Embedder, trials: list[Trial], held_out: list[Trial], vad: VadConfig
) -> list[dict[str, Any]]:
    calibration = packaged_calibration(embedder.model_id)
    scored = score_trials(embedder, trials, DURATIONS, vad=vad, speaker_of=speaker_folder)
    checked = score_trials(embedder, held_out, DURATIONS, vad=vad, speaker_of=speaker_folder)
    rows = []
    for result, check in zip(scored, checked, strict=True):
        # Raw cosines, and cosines centred on the mean of the draw's other speakers' enrolments (as the
        # server centres an agent on the tenant's other voiceprints) with the calibration's fit for them.
        variants = [("raw", result.scores, check.scores, calibration)]
        if result.centred_scores is not None and check.centred_scores is not None:
            fit = calibration.centred if calibration is not None else None
            variants.append(("centred", result.centred_scores, check.centred_scores, fit))
        for scoring, scores, check_scores, fit in variants:
            errors = detection_errors(scores, result.labels, p_target=P_TARGET)
            held = detection_errors(check_scores, check.labels, p_target=P_TARGET)
            row: dict[str, Any] = {
                "mode": mode,
                "model_id": embedder.model_id,
                "scores": scoring,
                "duration": duration_label(result.duration),
                "eer": errors.eer,
                "min_dcf": errors.min_dcf,
                "held_out_eer": held.eer,
                "held_out_min_dcf": held.min_dcf,
                "targets": errors.targets,
                "nontargets": errors.nontargets,
                "mean_net_speech_seconds": float(result.seconds.mean()),
            }
            if fit is not None:
                llr = fit.llr(check_scores, check.seconds)
                accept = llr >= 0
                target = check.labels == 1
                row["calibration"] = {
                    "trained_on": fit.trained_on,
                    "checked_on_seed": HELD_OUT_SEED,
                    "cllr": cllr(llr, check.labels),
                    "miss": float(np.mean(~accept[target])),
                    "false_alarm": float(np.mean(accept[~target])),
                }
            rows.append(row)
    return rows


# --- 3: accumulation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """k_max consecutive 3 s windows of one talker, cut from several of their utterances."""

    speaker: str
    used: frozenset[Path]  # utterances whose audio is in the windows: never that call's enrolment
    windows: tuple[np.ndarray, ...]


def build_calls(
    by_speaker: dict[str, list[Path]], speech: dict[Path, list[SpeechWindow]], k_max: int, starts: int | None
) -> list[Call]:
    """One call per utterance j of every speaker: the speaker's other utterances in file order, starting
    after j and wrapping round (j itself is left out), VAD speech windows joined end to end and cut into
    ``k_max`` consecutive 3 s windows (pauses inside VAD windows kept, gaps between them dropped, as
    the live pipeline's windows would). A speaker whose other utterances hold too little speech gives
    no calls. ``starts`` limits the calls per speaker (--quick)."""
    needed = round(k_max * WINDOW_SECONDS * SAMPLE_RATE)
    calls = []
    for speaker, paths in by_speaker.items():
        for j in range(len(paths) if starts is None else min(starts, len(paths))):
            pieces: list[np.ndarray] = []
            used: list[Path] = []
            for path in paths[j + 1 :] + paths[:j]:
                if sum(len(p) for p in pieces) >= needed:
                    break
                pieces += [w.samples for w in speech[path]]
                used.append(path)
            joined = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
            if len(joined) < needed:
                continue
            windows = tuple(np.split(joined[:needed], k_max))
            calls.append(Call(speaker, frozenset(used), windows))
    return calls


def accumulation_rows(model: str, threads: int, devdir: Path, quick: bool, vad: VadConfig) -> dict[str, Any]:
    """EER over k = 1, 2, 4 windows, averaged vs re-embedded, on one fixed set of trials.

    Trials: enrolment = one whole utterance e of speaker s (VAD windows averaged, as in ``vpmon
    score``). Target trials pair e with every call of s that does not contain e; non-target trials pair
    e with every call of every other speaker. Only utterances with at least one target trial enrol, so
    each enrolment is scored against both its own speaker and others, and the trials are the same for
    every k and both ways of combining.
    """
    spec = Embedder.load(model).spec
    # One pass over up to 12 s: lift the model's 10 s piece limit so "re-embed" really is one pass.
    k_max = max(KS)
    long_spec = replace(spec, windows=replace(spec.windows, max_seconds=k_max * WINDOW_SECONDS + 1))
    embedder = Embedder(long_spec, ensure_model(spec), threads=threads)
    by_speaker = utterances_by_speaker(devdir)
    if quick:
        by_speaker = {s: paths[: QUICK_UTTERANCES + 3] for s, paths in by_speaker.items()}
    speech = {p: load_windows(p, vad) for paths in by_speaker.values() for p in paths}
    calls = build_calls(by_speaker, speech, k_max, starts=2 if quick else None)
    speakers = sorted({c.speaker for c in calls})
    enrolments = [
        p
        for s in speakers
        for p in by_speaker[s]
        if any(c.speaker == s and p not in c.used for c in calls) and speech[p]
    ]
    enrol_speaker = np.array([next(s for s in speakers if p in by_speaker[s]) for p in enrolments])
    enrolled = np.stack([embed_windows(embedder, speech[p]).embedding for p in enrolments])
    same = enrol_speaker[:, None] == np.array([c.speaker for c in calls])[None, :]
    contained = np.array([[p in c.used for c in calls] for p in enrolments])
    valid = ~contained  # non-target calls never contain the enrolment; target calls may
    labels = same[valid].astype(np.int64)

    embedded: dict[tuple[Combine, int], list[np.ndarray]] = defaultdict(list)
    for call in calls:
        per_window = embedder.embed_batch(list(call.windows))
        for k in KS:
            seconds = np.full(k, WINDOW_SECONDS, dtype=np.float32)
            embedded["average", k].append(combine_embeddings(per_window[:k], seconds))
            again = per_window[0] if k == 1 else embedder.embed_batch([np.concatenate(call.windows[:k])])[0]
            embedded["concatenate", k].append(again)
    # Centred: each enrolment on the mean of the other speakers' enrolments, as the server centres.
    unit_enrolled = l2_normalise(enrolled)
    by_path = {str(p): v for p, v in zip(enrolments, unit_enrolled, strict=True)}
    means = centring_means(spec.id, by_path, speaker_folder)
    mean_rows = np.stack([means[str(p)] for p in enrolments])
    centred_enrolled = l2_normalise(unit_enrolled - mean_rows)
    rows = []
    for k in KS:
        row: dict[str, Any] = {"model_id": spec.id, "k": k, "seconds": k * WINDOW_SECONDS}
        for combine in ("average", "concatenate"):
            scores = (enrolled @ np.stack(embedded[combine, k]).T)[valid]  # all L2-normalised: cosines
            errors = detection_errors(scores, labels, p_target=P_TARGET)
            row[combine] = {"eer": errors.eer, "min_dcf": errors.min_dcf}
        tests = l2_normalise(np.stack(embedded["average", k]))
        centred_tests = l2_normalise(tests[None, :, :] - mean_rows[:, None, :])  # per enrolment's mean
        centred = np.einsum("ed,ecd->ec", centred_enrolled, centred_tests)
        errors = detection_errors(centred[valid], labels, p_target=P_TARGET)
        row["average, centred"] = {"eer": errors.eer, "min_dcf": errors.min_dcf}
        rows.append(row)
    return {
        "model_id": spec.id,
        "speakers": len(speakers),
        "speakers_left_out": sorted(set(by_speaker) - set(speakers)),
        "calls": len(calls),
        "enrolments": len(enrolments),
        "targets": int(labels.sum()),
        "nontargets": int(len(labels) - labels.sum()),
        "rows": rows,
    }


# --- 4: VAD ---------------------------------------------------------------------------------------
def whole_file(path: Path, vad: VadConfig) -> np.ndarray:
    """A recording level-normalised, with the narrowband fill over all of it if it has one (no VAD)."""
    samples = load_speech(path)
    if vad.narrowband_fill_dbfs is not None and is_narrowband(read_audio(path).sample_rate):
        return fill_empty_band(samples, vad.narrowband_fill_dbfs)
    return samples


def whole_file_scores(embedder: Embedder, trials: list[Trial], vad: VadConfig) -> dict[str, float]:
    """No VAD: every file level-normalised and embedded in one pass (test side also: its first 3 s)."""
    paths = sorted({t.enrol for t in trials} | {t.test for t in trials})
    audio = {p: whole_file(p, vad) for p in paths}
    full = dict(zip(paths, embedder.embed_batch([audio[p] for p in paths]), strict=True))
    first = dict(
        zip(paths, embedder.embed_batch([audio[p][: int(3 * SAMPLE_RATE)] for p in paths]), strict=True)
    )
    labels = np.array([t.target for t in trials], dtype=np.int64)
    out = {}
    for name, test in (("full", full), ("3 s", first)):
        scores = np.array([float(full[t.enrol] @ test[t.test]) for t in trials])
        out[name] = detection_errors(scores, labels, p_target=P_TARGET).eer
    return out


def vad_rows(
    embedder: Embedder, trials: list[Trial], default_rows: list[dict[str, Any]], default: VadConfig
) -> list[dict]:
    rows = []
    for aggressiveness in range(4):
        for combine in ("average", "concatenate"):
            if combine == "concatenate" and aggressiveness != default.aggressiveness:
                continue
            vad = replace(default, aggressiveness=aggressiveness)
            if vad == default and combine == "average":  # already scored in the durations section
                eers = {r["duration"]: r["eer"] for r in default_rows}
            else:
                scored = score_trials(embedder, trials, [None, 3.0], vad=vad, combine=combine)
                eers = {
                    duration_label(r.duration): detection_errors(r.scores, r.labels, p_target=P_TARGET).eer
                    for r in scored
                }
            label = f"webrtcvad {aggressiveness}, windows {'averaged' if combine == 'average' else 'joined'}"
            rows.append({"setting": label, "full": eers["full"], "3 s": eers["3 s"]})
    rows.append({"setting": "no VAD, whole file in one pass (3 s = first 3 s of audio)"})
    rows[-1].update(whole_file_scores(embedder, trials, default))
    return rows


# --- report ---------------------------------------------------------------------------------------
def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def print_durations(rows: list[dict[str, Any]]) -> None:
    table = Table(
        title=f"EER % / minDCF(p={P_TARGET:g}), enrolment full, test side cut to net speech: seed 0 | "
        f"held-out seed {HELD_OUT_SEED}"
    )
    columns = ("mode", "model", "scores", *(duration_label(d) for d in DURATIONS), "targets / non-targets")
    for column in columns:
        table.add_column(column, justify="right")
    for mode, model, scoring in dict.fromkeys((r["mode"], r["model_id"], r["scores"]) for r in rows):
        mine = [r for r in rows if (r["mode"], r["model_id"], r["scores"]) == (mode, model, scoring)]
        cells = [
            f"{percent(r['eer'])} / {r['min_dcf']:.3f} | "
            f"{percent(r['held_out_eer'])} / {r['held_out_min_dcf']:.3f}"
            for r in mine
        ]
        table.add_row(mode, model, scoring, *cells, f"{mine[0]['targets']} / {mine[0]['nontargets']}")
    console.print(table)


def print_calibration(rows: list[dict[str, Any]]) -> None:
    calibrated = [r for r in rows if "calibration" in r]
    if not calibrated:
        return
    table = Table(title=f"Packaged calibrations applied to seed {HELD_OUT_SEED}; decision llr >= 0")
    for column in ("mode", "model", "scores", "test side", "Cllr (bits)", "miss %", "false alarm %"):
        table.add_column(column, justify="right")
    for row in calibrated:
        c = row["calibration"]
        cells = [f"{c['cllr']:.3f}", percent(c["miss"]), percent(c["false_alarm"])]
        table.add_row(row["mode"], row["model_id"], row["scores"], row["duration"], *cells)
    console.print(table)
    for trained in dict.fromkeys(r["calibration"]["trained_on"] for r in calibrated):
        console.print(f"fitted on {trained}")


def print_accumulation(results: list[dict[str, Any]]) -> None:
    for result in results:
        table = Table(
            title=f"Accumulation, {result['model_id']}, telephone: EER % / minDCF over k x 3 s windows "
            f"({result['targets']} target / {result['nontargets']} non-target trials, "
            f"{result['calls']} calls, {result['enrolments']} enrolments, {result['speakers']} speakers)"
        )
        columns = ("(a) average of window embeddings", "(b) re-embed joined audio", "(a), centred")
        for column in ("k", "speech", *columns):
            table.add_column(column, justify="right")
        for row in result["rows"]:
            cells = [
                f"{percent(row[c]['eer'])} / {row[c]['min_dcf']:.3f}"
                for c in ("average", "concatenate", "average, centred")
            ]
            table.add_row(str(row["k"]), f"{row['seconds']:g} s", *cells)
        console.print(table)
        if result["speakers_left_out"]:
            console.print(
                f"  left out (too little speech for {max(KS)} windows): {result['speakers_left_out']}"
            )


def print_vad(rows: list[dict[str, Any]]) -> None:
    table = Table(title="VAD, campplus, telephone: EER % (enrolment full)")
    for column in ("setting", "full", "3 s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["setting"], percent(row["full"]), percent(row["3 s"]))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="campplus,ge2e", help="comma-separated model names")
    parser.add_argument("--modes", default="telephone,clean", help="dev-set modes: telephone, clean")
    parser.add_argument(
        "--quick", action="store_true", help=f"only the first {QUICK_UTTERANCES} utterances per speaker"
    )
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument(
        "--narrowband-fill",
        default="on",
        choices=("on", "off"),
        help="the front end's narrowband fill (VadConfig.narrowband_fill_dbfs) at its default level, or off",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the JSON results")
    args = parser.parse_args()
    vad = VadConfig() if args.narrowband_fill == "on" else VadConfig(narrowband_fill_dbfs=None)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(),
        "settings": {
            "threads": args.threads,
            "quick": args.quick,
            "p_target": P_TARGET,
            "vad": asdict(vad),
            "seed": 0,
            "calibration_checked_on_seed": HELD_OUT_SEED,
        },
        "section_seconds": {},
    }
    embedders = {name: Embedder.load(name, threads=args.threads) for name in models}
    dirs = {mode: devset_dir(mode) for mode in modes}
    held_out_dirs = {mode: devset_dir(mode, HELD_OUT_SEED) for mode in modes}

    def timed(section: str, start: float) -> None:
        report["section_seconds"][section] = round(
            report["section_seconds"].get(section, 0) + time.perf_counter() - start, 1
        )

    durations: list[dict[str, Any]] = []
    for mode in modes:
        trials = load_trials(dirs[mode], args.quick)
        held_out = load_trials(held_out_dirs[mode], args.quick)
        for embedder in embedders.values():
            start = time.perf_counter()
            durations += duration_rows(mode, embedder, trials, held_out, vad)
            timed("durations", start)
    report["durations"] = durations
    print_durations(durations)
    print_calibration(durations)

    if "telephone" in modes:
        start = time.perf_counter()
        accumulation = [
            accumulation_rows(name, args.threads, dirs["telephone"], args.quick, vad) for name in models
        ]
        timed("accumulation", start)
        report["accumulation"] = {
            "trials": accumulation_rows.__doc__,
            "calls": build_calls.__doc__,
            "models": accumulation,
        }
        print_accumulation(accumulation)

        campplus = next((e for e in embedders.values() if e.model_id.startswith("campplus")), None)
        if campplus is not None:
            start = time.perf_counter()
            default_rows = [
                r
                for r in durations
                if r["mode"] == "telephone" and r["model_id"] == campplus.model_id and r["scores"] == "raw"
            ]
            telephone = load_trials(dirs["telephone"], args.quick)
            report["vad"] = vad_rows(campplus, telephone, default_rows, vad)
            timed("vad", start)
            print_vad(report["vad"])

    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"took {report['elapsed_seconds']:.0f} s {report['section_seconds']}; wrote {args.output}")


if __name__ == "__main__":
    main()
