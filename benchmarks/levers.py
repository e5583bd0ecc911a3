"""Two cost levers of issue 8 (throughput), each measured on speed and on dev-set accuracy: a verification
cadence for calls already verified with confidence, and a GE2E → CAM++ cascade.

    python benchmarks/levers.py             both splits, every variant (about 9 min on 2 busy cores)
    python benchmarks/levers.py --quick     a smoke run (fewer voiceprints, calls and trials)

The calls, voiceprints, windows and metrics are ``takeover.py``'s (imported, not copied): simulated calls
from the telephone dev voices run through the gateway's code path (μ-law 20 ms chunks →
``verifier.stream.AgentAudio`` with the live VAD → windows → ``Embedder.embed_batch`` → ``CallDecision``)
with the default policy, on the tuning split (dev-set seed 0) and the held-out one (seed 1). Each window
is embedded once per model; every variant then replays the calls' decisions from those embeddings.

* **Baseline**: CAM++ (float) embeds every window, as the gateway does.
* **Cadence k**: a call verified with confidence embeds one window in k; the windows between are neither
  embedded nor scored (``CallDecision`` never sees them, as a window the gateway sheds). "With
  confidence" is the gateway's own shedding condition (``streamer/embedding.py: may_shed``): state
  VERIFIED, the last verdict's evidence LLR ≥ match_llr + ``CONFIDENT_LLR_MARGIN`` and no impostor
  evidence. *Guarded*: never two windows skipped in a row after a window whose own LLR was below 0.
  The per-window score is CAM++'s own, so the 3 s EER is the baseline's by definition.
* **Cascade t / m**: GE2E (its own voiceprints, packaged calibration and centring) screens every window;
  CAM++ embeds the window too when GE2E's calibrated window LLR is below ``t``, and at least one window
  in ``m`` anyway. Each model's ``CallDecision`` sees the windows it embedded; the call's CUSUM gets the
  window LLR of CAM++ where CAM++ ran, else GE2E's, and its evidence LLR (VERIFIED, recovery) likewise
  the evidence of the model that scored the window (the two models' embeddings cannot be averaged
  together). *When confident*: GE2E replaces CAM++ only while the call is verified with confidence (the
  cadence's condition); otherwise every window goes to CAM++ and GE2E does not run. A deployment pays
  for this with a second voiceprint per agent: every agent enrolled with both models (here: GE2E
  voiceprints from the very recordings of the CAM++ ones; GE2E's consistency check is left out, as
  CAM++'s already passed on them).
* **3 s EER of the cascade's score**: the dev set's trials (``verifier.trials.score_trials``: enrolment
  whole, test side cut to 3 s, centred on the other speakers' enrolments), each model's calibrated LLR;
  the cascade's score is CAM++'s LLR where its rule runs CAM++ (GE2E's LLR below ``t``, or every m-th
  trial in file order), else GE2E's. The "when confident" variants score windows of confident calls by
  the same rule (and every other window by CAM++), so their figure is the rule's.
* **Cost**: ``Embedder.embed_batch`` timed in this run for CAM++ float, CAM++ INT8 and GE2E on the same
  windows (a sample of the calls' windows, cut to 0.5, 1, … 3 s), in batches of the pool's 16, the models
  taking turns on each batch; one onnxruntime thread as the pool runs, OpenBLAS on one thread; the
  fastest of a few rounds; the calling thread's CPU time, so other load on the machine counts less. A
  window's cost is interpolated by its length. A variant's model cost per second of call is the sum
  over the windows each model embedded, divided by the call time; the ratio is to the baseline (float
  CAM++ on every window), and also with CAM++ INT8 in place of float (ratio to INT8 on every window;
  the accuracy figures are float's). Decode, resample, VAD and the decision cost the same in every
  variant and are not counted.
* **Verdict**: a variant is accepted only if, on the held-out split, takeovers caught and caught within
  6 s of impostor speech each drop by at most 0.3 points, its 3 s EER on the held-out trials (seed 1)
  rises by at most 0.3 points, and false alerts do not rise on either split (issue 8). With 136
  takeovers one call is 0.74 points: "within 0.3 points" means no takeover caught later than 6 s that
  the baseline caught in time, net.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS (as embed_speed.py)

import numpy as np
from rich.table import Table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from accuracy import load_trials  # noqa: E402
from common import environment  # noqa: E402
from devset import devset_dir  # noqa: E402
from takeover import (  # noqa: E402
    CHUNK_BYTES,
    DEFAULT,
    ENROLMENTS,
    GENUINE_CALLS,
    QUICK,
    RATE,
    TAKEOVER_CALLS,
    AudioPass,
    SimCall,
    Split,
    Voiceprint,
    clean,
    console,
    evaluate,
    gated,
    kept,
    synthesise,
    window_llrs,
    with_means,
)

from streamer.embedding import CONFIDENT_LLR_MARGIN, verified_with_confidence  # noqa: E402
from verifier.audio import encode_mulaw  # noqa: E402
from verifier.calibration import Calibration, packaged_calibration  # noqa: E402
from verifier.decision import CallDecision, State, WindowVerdict  # noqa: E402
from verifier.embedder import Embedder  # noqa: E402
from verifier.enrolment import DEFAULT_POLICY as ENROLMENT_POLICY  # noqa: E402
from verifier.enrolment import Recording, enrol  # noqa: E402
from verifier.metrics import detection_errors  # noqa: E402
from verifier.pipeline import VadConfig  # noqa: E402
from verifier.stream import AgentAudio  # noqa: E402
from verifier.trials import score_trials, speaker_folder  # noqa: E402
from verifier.vad import SpeechWindow  # noqa: E402

FULL_MODEL, INT8_MODEL, SCREEN_MODEL = "campplus", "campplus-int8", "ge2e"
OUTPUT = BENCH / "results" / "levers.json"
POLICY = DEFAULT.policy
VAD = DEFAULT.vad  # the live VAD: mode 1, 3 s windows, windows under 4 dB SNR skipped
EER_SECONDS = 3.0
MARGIN = 0.003  # 0.3 points, as fractions
POOL_BATCH = 16  # the embedding pool's max_batch
TIMING_WINDOWS, TIMING_ROUNDS = 128, 3
QUICK_TIMING_WINDOWS, QUICK_TIMING_ROUNDS = 16, 2
COST_LENGTHS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # window seconds timed (the live VAD's windows: 0.5-3 s)
SETTLE_SECONDS = 0.02  # pause before each timed call (as embed_speed.py: other threads stop spinning)


# --- variants ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    every: int = 1  # cadence: a confident call embeds one window in this many
    guarded: bool = False  # cadence: at most one window skipped after a window whose own LLR was below 0
    screen_below: float | None = None  # cascade: CAM++ too when GE2E's window LLR is below this
    full_every: int | None = None  # cascade: CAM++ on at least one window in this many
    screen_when_confident: bool = False  # cascade: GE2E instead of CAM++ only while the call is confident

    @property
    def cascade(self) -> bool:
        return self.screen_below is not None

    @property
    def lever(self) -> str:
        return "cascade" if self.cascade else ("cadence" if self.every > 1 else "baseline")


BASELINE = Variant("baseline")
SCREEN_THRESHOLDS = (1.0, 2.0, 3.0)  # GE2E window LLR; its genuine 3 s windows sit around 1-3 (printed)
VARIANTS = (
    BASELINE,
    *(Variant(f"cadence {k}", every=k) for k in (2, 3, 4)),
    *(Variant(f"cadence {k} guarded", every=k, guarded=True) for k in (3, 4)),
    *(Variant(f"cascade t {t:g}", screen_below=t) for t in SCREEN_THRESHOLDS),
    *(Variant(f"cascade t {t:g} m 3", screen_below=t, full_every=3) for t in SCREEN_THRESHOLDS[:2]),
    *(
        Variant(f"cascade t {t:g} when confident", screen_below=t, screen_when_confident=True)
        for t in SCREEN_THRESHOLDS
    ),
)


# --- a model's view of the calls -----------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    embedder: Embedder
    calibration: Calibration
    voiceprints: dict[str, Voiceprint]  # by voiceprint id (the CAM++ voiceprint's)

    def decision(self, voiceprint_id: str) -> CallDecision:
        vp = self.voiceprints[voiceprint_id]
        return CallDecision(vp.vector, self.calibration, self.embedder.model_id, POLICY, vp.mean)


def load_model(name: str, threads: int) -> tuple[Embedder, Calibration]:
    embedder = Embedder.load(name, threads=threads)
    calibration = packaged_calibration(embedder.model_id)
    if calibration is None or calibration.centred is None:
        raise SystemExit(f"{embedder.model_id} has no packaged calibration for centred scores")
    return embedder, calibration


def screen_voiceprints(split: Split, embedder: Embedder) -> dict[str, Voiceprint]:
    """The screen model's voiceprint for each of the split's voiceprints, enrolled from the same recordings,
    centred on the other speakers' as the CAM++ ones are."""
    by_path = {u.path: u for utts in split.utterances.values() for u in utts}
    unchecked = replace(ENROLMENT_POLICY, check_consistency=False)  # CAM++'s check passed on them
    enrolled = []
    for vp in split.voiceprints:
        recordings = [Recording(p.name, by_path[p].samples, RATE) for p in sorted(vp.enrolled)]
        enrolment = enrol(embedder, recordings, unchecked, vad=VadConfig())
        enrolled.append(replace(vp, vector=enrolment.vector, mean=None))
    return {vp.id: vp for vp in with_means(enrolled)}


def screen_embeddings(split: Split, embedder: Embedder) -> list[np.ndarray]:
    """The screen model's embedding of every window of the split's calls (the same windows: a second audio
    pass over the same plans, checked window by window)."""
    ungated = replace(VAD, min_window_snr_db=None)
    calls = AudioPass(embedder).run(split.plans, (ungated,))[ungated]
    out = []
    for mine, theirs in zip(calls, split.calls[VAD], strict=True):
        mine = gated(mine, VAD.min_window_snr_db)
        if not (np.array_equal(mine.start, theirs.start) and np.array_equal(mine.end, theirs.end)):
            raise SystemExit(f"the second audio pass found other windows in {theirs.plan.id}")
        out.append(mine.embeddings)
    return out


def window_llr_percentiles(split: Split, embeddings: list[np.ndarray], screen: Model) -> dict[str, Any]:
    """Where each model's window LLRs lie, on genuine and on impostor windows (to read ``t`` against)."""
    calls = split.calls[VAD]
    as_screen = [
        replace(c, plan=replace(c.plan, voiceprint=screen.voiceprints[c.plan.voiceprint.id]), embeddings=e)
        for c, e in zip(calls, embeddings, strict=True)
    ]
    genuine = np.concatenate([c.impostor == 0 for c in calls])
    out = {}
    for model, llrs in (
        ("campplus", window_llrs(calls, split.calibration)),
        ("ge2e", window_llrs(as_screen, screen.calibration)),
    ):
        values = np.concatenate(llrs)
        out[model] = {
            kind: [round(float(np.percentile(values[mask], q)), 2) for q in (10, 25, 50, 75, 90)]
            for kind, mask in (("genuine", genuine), ("impostor", ~genuine))
        }
    return out


# --- one call under one variant ------------------------------------------------------------------------
def confident(state: State, verdict: WindowVerdict | None, impostor_evidence: float) -> bool:
    """``streamer.embedding.may_shed``'s test on the call's state after its last scored window."""
    return verified_with_confidence(state is State.VERIFIED, verdict, impostor_evidence, POLICY)


@dataclass
class CallRun:
    scored: np.ndarray  # bool per window: the call's decision saw it
    full: np.ndarray  # bool: CAM++ embedded it
    screen: np.ndarray  # bool: GE2E embedded it
    llrs: list[float]  # evidence LLR after each scored window
    window_llrs: list[float]  # the window LLR the CUSUM took


def run_call(
    call: SimCall, screen_embeddings: np.ndarray | None, variant: Variant, full: Model, screen: Model | None
) -> CallRun:
    """The windows of one call, in order, as the gateway would take them under ``variant``. The call's
    state comes from a ``CallDecision`` fed the chosen LLRs through its own transition (``_step``, as
    ``takeover.replay`` does); with CAM++ alone it is checked against CAM++'s own ``observe``."""
    vp_id = call.plan.voiceprint.id
    n = len(call.start)
    run = CallRun(np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), [], [])
    full_decision = full.decision(vp_id)
    screen_decision = screen.decision(vp_id) if variant.cascade and screen is not None else None
    state = full.decision(vp_id)  # the call's state machine
    last: WindowVerdict | None = None
    skipped = 0  # windows skipped in a row (cadence)
    since_full = 0  # windows since CAM++ last ran (cascade)
    for i in range(n):
        window = (float(call.speech[i]), float(call.start[i]), float(call.end[i]))
        sure = confident(state.state, last, state.impostor_evidence)
        if variant.every > 1 and sure:
            allowed = 1 if variant.guarded and last is not None and last.window_llr < 0 else variant.every - 1
            if skipped < allowed:
                skipped += 1
                continue
        skipped = 0
        verdict = None
        run_full = True
        screening = screen_decision is not None and screen_embeddings is not None
        if screening and (sure or not variant.screen_when_confident):
            verdict, _ = screen_decision.observe(screen_embeddings[i], *window)
            run.screen[i] = True
            every = variant.full_every is not None and since_full + 1 >= variant.full_every
            run_full = verdict.window_llr < (variant.screen_below or 0.0) or every
        if run_full:
            verdict, _ = full_decision.observe(call.embeddings[i], *window)
            run.full[i] = True
            since_full = 0
        else:
            since_full += 1
        assert verdict is not None
        state._speech_total += window[0]
        state._step(verdict.llr, verdict.window_llr, window[1])
        if not variant.cascade and state.state is not verdict.state:
            raise SystemExit(f"the call's state differs from CallDecision.observe in {call.plan.id}")
        run.scored[i] = True
        run.llrs.append(verdict.llr)
        run.window_llrs.append(verdict.window_llr)
        last = verdict
    return run


# --- costs ---------------------------------------------------------------------------------------------
def timing_windows(split: Split, count: int, seed: int = 0) -> list[SpeechWindow]:
    """A random sample of the windows the live VAD passes in the split's calls (every 4th call)."""
    windows: list[SpeechWindow] = []
    for plan in split.plans[::4]:
        payload = encode_mulaw(synthesise(plan)[0])
        stream = AgentAudio("mulaw", RATE, vad=VAD)
        for offset in range(0, len(payload), CHUNK_BYTES):
            windows += stream.feed(payload[offset : offset + CHUNK_BYTES])
        windows += stream.flush()
    picked = np.random.default_rng(seed).choice(len(windows), min(count, len(windows)), replace=False)
    return [windows[i] for i in sorted(picked)]


@dataclass(frozen=True)
class Cost:
    """CPU seconds of ``embed_batch`` per window at each of ``COST_LENGTHS`` seconds, in between linear."""

    model_id: str
    cpu_per_window: tuple[float, ...]
    wall_per_window: tuple[float, ...]
    windows: tuple[int, ...]  # timed at each length

    def of(self, seconds: np.ndarray) -> float:
        return float(np.sum(np.interp(seconds, COST_LENGTHS, self.cpu_per_window)))


def measure_costs(embedders: list[Embedder], windows: list[SpeechWindow], rounds: int) -> list[Cost]:
    """Each model's ``embed_batch`` on the sampled windows cut to each of ``COST_LENGTHS`` (those long
    enough), in batches of the pool's size; the models take turns on each batch in a rotating order, after
    a pause for other threads to settle; per batch and model the fastest of ``rounds``. CPU time is the
    calling thread's: with one onnxruntime thread and OpenBLAS pinned to one, all the work is there."""
    cpu = np.zeros((len(embedders), len(COST_LENGTHS)))
    wall = np.zeros((len(embedders), len(COST_LENGTHS)))
    counts = []
    for e in embedders:
        e.embed_batch([windows[0].samples])  # warm up
    for j, length in enumerate(COST_LENGTHS):
        n = round(length * 16000)
        cut = [w.samples[:n] for w in windows if len(w.samples) >= n]
        counts.append(len(cut))
        for start in range(0, len(cut), POOL_BATCH):
            batch = cut[start : start + POOL_BATCH]
            best_cpu = np.full(len(embedders), np.inf)
            best_wall = np.full(len(embedders), np.inf)
            for r in range(rounds):
                for k in range(len(embedders)):
                    m = (k + r + start) % len(embedders)
                    time.sleep(SETTLE_SECONDS)
                    began, cpu_began = time.perf_counter(), time.thread_time()
                    embedders[m].embed_batch(batch)
                    best_cpu[m] = min(best_cpu[m], time.thread_time() - cpu_began)
                    best_wall[m] = min(best_wall[m], time.perf_counter() - began)
            cpu[:, j] += best_cpu
            wall[:, j] += best_wall
    counts_array = np.array(counts, dtype=np.float64)
    return [
        Cost(e.model_id, tuple(cpu[m] / counts_array), tuple(wall[m] / counts_array), tuple(counts))
        for m, e in enumerate(embedders)
    ]


# --- 3 s EER of the cascade's score --------------------------------------------------------------------
def trial_llrs(model: Model, seed: int, quick: bool) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated (centred) LLRs of the dev set's trials, test side cut to 3 s, and their labels."""
    trials = load_trials(devset_dir("telephone", seed), quick)
    (scored,) = score_trials(model.embedder, trials, [EER_SECONDS], speaker_of=speaker_folder)
    assert scored.centred_scores is not None
    return model.calibration.centred.llr(scored.centred_scores, scored.seconds), scored.labels


def eer_of(variant: Variant, full: np.ndarray, screen: np.ndarray, labels: np.ndarray) -> float:
    if not variant.cascade:
        return detection_errors(full, labels).eer
    runs_full = screen < (variant.screen_below or 0.0)
    if variant.full_every is not None:
        runs_full |= np.arange(len(full)) % variant.full_every == 0
    return detection_errors(np.where(runs_full, full, screen), labels).eer


# --- report --------------------------------------------------------------------------------------------
def split_rows(
    split: Split, screen_emb: list[np.ndarray], full: Model, screen: Model, costs: dict[str, Cost]
) -> dict[str, dict[str, Any]]:
    calls = split.calls[VAD]
    seconds = [c.end - c.start for c in calls]
    call_seconds = sum(c.seconds for c in calls)
    base_float = sum(costs[FULL_MODEL].of(s) for s in seconds)
    base_int8 = sum(costs[INT8_MODEL].of(s) for s in seconds)
    windows = sum(len(s) for s in seconds)
    out = {}
    for variant in VARIANTS:
        runs = [run_call(c, e, variant, full, screen) for c, e in zip(calls, screen_emb, strict=True)]
        scored_calls = [kept(c, r.scored) for c, r in zip(calls, runs, strict=True)]
        result = evaluate(
            scored_calls,
            [np.array(r.llrs) for r in runs],
            [np.array(r.window_llrs) for r in runs],
            POLICY,
            full.calibration,
        )
        screen_cost = sum(costs[SCREEN_MODEL].of(s[r.screen]) for s, r in zip(seconds, runs, strict=True))
        float_cost = sum(costs[FULL_MODEL].of(s[r.full]) for s, r in zip(seconds, runs, strict=True))
        int8_cost = sum(costs[INT8_MODEL].of(s[r.full]) for s, r in zip(seconds, runs, strict=True))
        out[variant.name] = {
            **result,
            "windows": windows,
            "full_windows_share": sum(int(r.full.sum()) for r in runs) / windows,
            "screen_windows_share": sum(int(r.screen.sum()) for r in runs) / windows,
            "scored_windows_share": sum(int(r.scored.sum()) for r in runs) / windows,
            "model_cpu_ms_per_call_second": 1000 * (float_cost + screen_cost) / call_seconds,
            "cost_vs_baseline": (float_cost + screen_cost) / base_float,
            "int8_cost_vs_baseline": (int8_cost + screen_cost) / base_float,
            "int8_cost_vs_int8_baseline": (int8_cost + screen_cost) / base_int8,
        }
    return out


def verdict(variant: Variant, rows: dict[str, dict[str, dict[str, Any]]], eer: dict[str, float]) -> str:
    if variant == BASELINE:
        return "baseline"
    held, base = rows["held_out"][variant.name], rows["held_out"][BASELINE.name]
    problems = []
    for key, label in (("caught", "caught"), ("caught_within_aim", "caught ≤6 s")):
        drop = base[key] - held[key]
        if drop > MARGIN + 1e-9:
            problems.append(f"{label} −{100 * drop:.1f} pt")
    rise = eer[variant.name] - eer[BASELINE.name]
    if rise > MARGIN + 1e-9:
        problems.append(f"EER +{100 * rise:.1f} pt")
    for split, r in rows.items():
        more = r[variant.name]["false_alerts"] - r[BASELINE.name]["false_alerts"]
        if more > 0:
            problems.append(f"+{more} false alert{'s' * (more > 1)} ({split.replace('_', '-')})")
    if held["cost_vs_baseline"] >= 1:
        problems.append("no saving")
    return "accepted" if not problems else "rejected: " + ", ".join(problems)


def print_table(rows: dict[str, dict[str, dict[str, Any]]], eers: dict[str, dict[str, float]]) -> None:
    table = Table(
        title="Cost levers (issue 8): default policy, live VAD; tuning split (seed 0) | held-out split "
        "(seed 1). "
        "Caught % / ≤6 s % / ≤10 s % of impostor speech, false alerts; windows as a share of the "
        "baseline's; model CPU relative to CAM++ float on every window (INT8: CAM++ INT8 in its place, "
        "vs INT8 on every window); 3 s EER of the per-window score (held-out trials, tuning in brackets)",
        padding=(0, 1),
    )
    columns = (
        "variant",
        "CAM++ win %",
        "GE2E win %",
        "cost",
        "cost INT8",
        "tuning caught/≤6/≤10 %",
        "FA",
        "held-out caught/≤6/≤10 %",
        "FA (h)",
        "3 s EER %",
        "verdict",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("variant", "verdict") else "right")
    for variant in VARIANTS:
        t, h = rows["tuning"][variant.name], rows["held_out"][variant.name]
        table.add_row(
            variant.name,
            f"{100 * h['full_windows_share']:.0f}",
            f"{100 * h['screen_windows_share']:.0f}",
            f"{h['cost_vs_baseline']:.2f}",
            f"{h['int8_cost_vs_int8_baseline']:.2f}",
            "/".join(f"{100 * t[k]:.1f}" for k in ("caught", "caught_within_aim", "caught_within_10s")),
            str(t["false_alerts"]),
            "/".join(f"{100 * h[k]:.1f}" for k in ("caught", "caught_within_aim", "caught_within_10s")),
            f"{h['false_alerts']} ({h['genuine_speech_hours']:.2f})",
            f"{100 * eers['held_out'][variant.name]:.2f} ({100 * eers['tuning'][variant.name]:.2f})",
            h["verdict"],
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer voiceprints, calls and trials")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads for the audio passes")
    parser.add_argument("--output", "-o", type=Path, default=OUTPUT, help="where to write the JSON results")
    args = parser.parse_args()
    sizes = (
        QUICK
        if args.quick
        else {"enrolments": ENROLMENTS, "genuine_calls": GENUINE_CALLS, "takeover_calls": TAKEOVER_CALLS}
    )
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(),
        "settings": clean(
            {
                "quick": args.quick,
                "sizes": sizes,
                "vad": asdict(VAD),
                "policy": asdict(POLICY),
                "confident_llr_margin": CONFIDENT_LLR_MARGIN,
                "variants": [asdict(v) for v in VARIANTS],
                "margin_points": 100 * MARGIN,
            }
        ),
        "method": __doc__,
    }
    full_embedder, full_calibration = load_model(FULL_MODEL, args.threads)
    screen_embedder, screen_calibration = load_model(SCREEN_MODEL, args.threads)

    splits = {"tuning": 0, "held_out": 1}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    described: dict[str, Any] = {}
    screen_llrs: dict[str, Any] = {}
    timing: list[SpeechWindow] = []
    per_split: dict[str, tuple[Split, list[np.ndarray], Model, Model]] = {}
    for name, seed in splits.items():
        section = time.perf_counter()
        split = Split(name, seed, full_embedder, sizes, full_calibration)
        split.add_windows((VAD,))
        full = Model(full_embedder, full_calibration, {vp.id: vp for vp in split.voiceprints})
        screen = Model(screen_embedder, screen_calibration, screen_voiceprints(split, screen_embedder))
        embeddings = screen_embeddings(split, screen_embedder)
        per_split[name] = (split, embeddings, full, screen)
        if not timing:
            timing = timing_windows(split, QUICK_TIMING_WINDOWS if args.quick else TIMING_WINDOWS)
        screen_llrs[name] = window_llr_percentiles(split, embeddings, screen)
        described[name] = {
            **{k: v for k, v in split.describe().items() if k != "by_vad"},
            "seconds": round(time.perf_counter() - section, 1),
        }
        console.print(
            f"{name}: {described[name]['calls']} calls, "
            f"{sum(len(c.start) for c in split.calls[VAD])} windows "
            f"({described[name]['seconds']:.0f} s); window LLR p10/25/50/75/90 {screen_llrs[name]}"
        )

    section = time.perf_counter()
    int8_embedder = Embedder.load(INT8_MODEL, threads=1)
    timed = [Embedder.load(FULL_MODEL, threads=1), int8_embedder, Embedder.load(SCREEN_MODEL, threads=1)]
    cost_list = measure_costs(timed, timing, QUICK_TIMING_ROUNDS if args.quick else TIMING_ROUNDS)
    costs = dict(zip((FULL_MODEL, INT8_MODEL, SCREEN_MODEL), cost_list, strict=True))
    timing_seconds = round(time.perf_counter() - section, 1)

    for name, (split, embeddings, full, screen) in per_split.items():
        rows[name] = split_rows(split, embeddings, full, screen, costs)

    section = time.perf_counter()
    eers: dict[str, dict[str, float]] = {}
    for name, seed in splits.items():
        full_llr, labels = trial_llrs(per_split[name][2], seed, args.quick)
        screen_llr, screen_labels = trial_llrs(per_split[name][3], seed, args.quick)
        if not np.array_equal(labels, screen_labels):
            raise SystemExit("the two models' trial lists differ")
        eers[name] = {v.name: eer_of(v, full_llr, screen_llr, labels) for v in VARIANTS}
        eers[name]["ge2e alone"] = detection_errors(screen_llr, labels).eer
    eer_seconds = round(time.perf_counter() - section, 1)

    for variant in VARIANTS:
        rows["held_out"][variant.name]["verdict"] = verdict(variant, rows, eers["held_out"])
    print_table(rows, eers)
    for c in cost_list:
        per_window = " / ".join(f"{1000 * v:.1f}" for v in c.cpu_per_window)
        console.print(
            f"{c.model_id}: CPU ms per window of {' / '.join(f'{x:g}' for x in COST_LENGTHS)} s: "
            f"{per_window} (wall at 3 s: {1000 * c.wall_per_window[-1]:.1f} ms; "
            f"{c.windows[-1]} windows of 3 s timed)"
        )
    console.print(
        f"GE2E alone, 3 s EER: {100 * eers['held_out']['ge2e alone']:.2f} % held-out, "
        f"{100 * eers['tuning']['ge2e alone']:.2f} % tuning. Cadence variants score fewer windows with CAM++ "
        "itself: their per-window EER is the baseline's by definition."
    )

    report["splits"] = clean(described)
    report["window_llr_percentiles_10_25_50_75_90"] = clean(screen_llrs)
    report["costs"] = {
        "windows_timed": len(timing),
        "rounds": QUICK_TIMING_ROUNDS if args.quick else TIMING_ROUNDS,
        "window_seconds": COST_LENGTHS,
        "openblas_num_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "models": [clean(asdict(c)) for c in cost_list],
        "seconds": timing_seconds,
    }
    report["eer_3s"] = {**clean(eers), "seconds": eer_seconds}
    report["variants"] = {
        v.name: {
            "variant": asdict(v),
            "lever": v.lever,
            "tuning": clean(rows["tuning"][v.name]),
            "held_out": clean(rows["held_out"][v.name]),
            "eer_3s_tuning": clean(eers["tuning"][v.name]),
            "eer_3s_held_out": clean(eers["held_out"][v.name]),
            "verdict": rows["held_out"][v.name]["verdict"],
        }
        for v in VARIANTS
    }
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"took {report['elapsed_seconds']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
