"""The ``vpmon`` command line. Every command is a thin wrapper around ``verifier``.

Errors a user can act on (``VpmonError``) print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from streamer.cli_common import JsonOption, err, out, progress_bar, user_errors
from streamer.cli_demo import demo_app
from streamer.cli_service import config_app, keys_app, redis_app, service_app, voiceprints_app
from streamer.cli_stream import stream_app
from verifier.calibration import fit_calibration
from verifier.embedder import Embedder
from verifier.errors import ModelError
from verifier.metrics import detection_errors
from verifier.models import provision
from verifier.models.registry import BUILTIN, DEFAULT_MODEL, get_spec
from verifier.models.spec import ModelSpec
from verifier.pipeline import SpeechEmbedding, embed_file
from verifier.score_norm import MIN_OTHER_VOICEPRINTS
from verifier.scoring import Scorer
from verifier.trials import duration_label, parse_durations, read_trials, score_trials, speaker_folder

app = typer.Typer(
    name="vpmon",
    help="Real-time voiceprint monitor for call centres.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List, fetch and inspect speaker models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(voiceprints_app, name="voiceprints")
app.add_typer(keys_app, name="keys")
app.add_typer(redis_app, name="redis")
app.add_typer(config_app, name="config")

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Model id, alias (campplus, ge2e) or .toml spec.")
]
ThreadsOption = Annotated[int, typer.Option(help="onnxruntime threads.", min=1)]


def model_progress(spec: ModelSpec) -> provision.Progress:
    """Progress for fetching a model: a bar in a terminal, one line per step otherwise."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), console=err, transient=True)
    task = None

    def report(step: str, fraction: float) -> None:
        nonlocal task
        if step == "cached":
            return
        if not err.is_terminal:
            err.print(f"{spec.id}: {step}", highlight=False)
            return
        if task is None:
            bar.start()
            task = bar.add_task(step, total=1.0)
        bar.update(task, description=f"{spec.id}: {step}", completed=fraction)
        if fraction >= 1.0:
            bar.stop()

    return report


def load_embedder(model: str, threads: int = 1) -> Embedder:
    spec = get_spec(model)
    return Embedder.load(model, progress=model_progress(spec), threads=threads)


def scorer_for(spec: ModelSpec, threshold: float | None, min_speech: float) -> Scorer:
    calibration = provision.run_time_calibration(spec)
    return Scorer(spec.id, calibration, fixed_threshold=threshold, min_net_speech=min_speech)


# --- compare / embed -----------------------------------------------------------------------------
@app.command()
@user_errors
def compare(
    first: Annotated[Path, typer.Argument(help="A recording (WAV, FLAC, OGG).")],
    second: Annotated[Path, typer.Argument(help="Another recording.")],
    model: ModelOption = DEFAULT_MODEL,
    threshold: Annotated[
        float | None, typer.Option(help="Fixed cosine threshold instead of calibration.")
    ] = None,
    min_speech: Annotated[float, typer.Option(help="Net speech (s) each side needs for a verdict.")] = 1.0,
    threads: ThreadsOption = 1,
    as_json: JsonOption = False,
) -> None:
    """Are these two recordings the same speaker? (1:1 verification)"""
    embedder = load_embedder(model, threads)
    sides = [embed_file(embedder, path) for path in (first, second)]
    scorer = scorer_for(embedder.spec, threshold, min_speech)
    speech = min(side.net_speech_seconds for side in sides)
    verdict = scorer.verdict(sides[0].embedding, sides[1].embedding, speech)
    if as_json:
        result = {
            **verdict.to_dict(),
            "sides": [_side_dict(path, side) for path, side in zip((first, second), sides, strict=True)],
        }
        out.print_json(json.dumps(result))
    else:
        for path, side in zip((first, second), sides, strict=True):
            out.print(
                f"{path}: {side.net_speech_seconds:.1f} s of speech in {side.windows} windows",
                highlight=False,
            )
        llr = f", LLR {verdict.llr:+.2f}" if verdict.llr is not None else ""
        out.print(
            f"score {verdict.score:.3f}, threshold {verdict.threshold:.3f} at {speech:.1f} s of speech{llr}",
            highlight=False,
        )
        colour = {"MATCH": "green", "MISMATCH": "red"}.get(verdict.decision.value, "yellow")
        meaning = {"MATCH": "same speaker", "MISMATCH": "different speakers"}.get(
            verdict.decision.value, verdict.reason
        )
        out.print(f"[bold {colour}]{verdict.decision.value}[/]: {meaning} ({verdict.model_id})")


def _side_dict(path: Path, side: SpeechEmbedding) -> dict[str, Any]:
    return {
        "path": str(path),
        "net_speech_seconds": round(side.net_speech_seconds, 2),
        "windows": side.windows,
    }


@app.command()
@user_errors
def embed(
    files: Annotated[list[Path], typer.Argument(help="Recordings to embed.")],
    model: ModelOption = DEFAULT_MODEL,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write a .npz (embeddings + names).")
    ] = None,
    threads: ThreadsOption = 1,
) -> None:
    """Speaker embeddings of recordings, as JSON lines or an .npz file."""
    embedder = load_embedder(model, threads)
    results = []
    with progress_bar("embedding", len(files)) as advance:
        for path in files:
            results.append((path, embed_file(embedder, path)))
            advance(1)
    if output is not None:
        np.savez(
            output,
            embeddings=np.stack([r.embedding for _, r in results]),
            paths=np.array([str(p) for p, _ in results]),
            net_speech_seconds=np.array([r.net_speech_seconds for _, r in results]),
            model_id=embedder.model_id,
        )
        err.print(f"wrote {len(results)} embeddings to {output}")
        return
    for path, side in results:
        line = {
            **_side_dict(path, side),
            "model_id": side.model_id,
            "embedding": side.embedding.round(6).tolist(),
        }
        sys.stdout.write(json.dumps(line) + "\n")


# --- score / calibrate ---------------------------------------------------------------------------
DurationsOption = Annotated[
    str, typer.Option(help="Test-side net speech: seconds or 'full', comma-separated.")
]


def _score(trials_file: Path, model: str, durations: str, threads: int, speaker_folders: bool = False):
    embedder = load_embedder(model, threads)
    trials = read_trials(trials_file)
    wanted = parse_durations(durations)
    files = len({t.enrol for t in trials}) + len({t.test for t in trials})
    speaker_of = speaker_folder if speaker_folders else str
    with progress_bar(f"scoring {len(trials)} trials", files) as advance:
        return embedder, score_trials(embedder, trials, wanted, advance=advance, speaker_of=speaker_of)


@app.command()
@user_errors
def score(
    trials_file: Annotated[Path, typer.Argument(metavar="TRIALS", help="Trials list ('1|0 ENROL TEST').")],
    model: ModelOption = DEFAULT_MODEL,
    durations: DurationsOption = "full,3,1,0.5",
    p_target: Annotated[float, typer.Option(help="Target prior for minDCF.")] = 0.01,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the JSON to a file.")
    ] = None,
    threads: ThreadsOption = 1,
    as_json: JsonOption = False,
) -> None:
    """EER and minDCF of a trials list, at several test durations."""
    embedder, scored = _score(trials_file, model, durations, threads)
    rows = []
    for result in scored:
        errors = detection_errors(result.scores, result.labels, p_target=p_target)
        rows.append({"duration": duration_label(result.duration), **asdict(errors)})
    report = json.dumps(
        {"model_id": embedder.model_id, "trials": str(trials_file), "results": rows}, indent=2
    )
    if output is not None:
        output.write_text(report + "\n")
    if as_json:
        out.print_json(report)
        return
    table = Table(title=f"{embedder.model_id} on {trials_file}")
    for column in (
        "test side",
        "EER %",
        f"minDCF(p={p_target:g})",
        "EER threshold",
        "targets",
        "non-targets",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        cells = [f"{100 * row['eer']:.2f}", f"{row['min_dcf']:.3f}", f"{row['eer_threshold']:.3f}"]
        table.add_row(row["duration"], *cells, str(row["targets"]), str(row["nontargets"]))
    out.print(table)


@app.command()
@user_errors
def calibrate(
    trials_file: Annotated[Path, typer.Argument(metavar="TRIALS", help="Trials list ('1|0 ENROL TEST').")],
    model: ModelOption = DEFAULT_MODEL,
    durations: DurationsOption = "full,5,3,2,1,0.5",
    save: Annotated[bool, typer.Option(help="Store the calibration in the model card.")] = True,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write it to a JSON file.")
    ] = None,
    threads: ThreadsOption = 1,
    speaker_folders: Annotated[
        bool,
        typer.Option(
            help="Enrolment recordings in one folder are one speaker's (SPEAKER/REC.wav): the fit for "
            "centred scores centres each on the other speakers' mean, as the server centres an agent on "
            "the other agents' voiceprints. Without it, each recording counts as a speaker of its own."
        ),
    ] = False,
) -> None:
    """Fit the duration-aware score calibration on a trials list and store it in the model card: one fit
    for raw cosines, and one for cosines centred on the other speakers' enrolments' mean (when there are
    enough of them: verifier/score_norm.py)."""
    embedder, scored = _score(trials_file, model, durations, threads, speaker_folders)
    scores = np.concatenate([r.scores for r in scored])
    seconds = np.concatenate([r.seconds for r in scored])
    labels = np.concatenate([r.labels for r in scored])
    trained_on = f"{trials_file.parent.name}/{trials_file.name} at test durations {durations}"
    calibration = fit_calibration(scores, seconds, labels, trained_on=trained_on)
    if all(r.centred_scores is not None for r in scored):
        centred = np.concatenate([r.centred_scores for r in scored])
        others = "other speakers'" if speaker_folders else "other enrolment recordings'"
        centred_on = f"{trained_on}, centred on the {others} mean"
        calibration = replace(
            calibration, centred=fit_calibration(centred, seconds, labels, trained_on=centred_on)
        )
    else:
        kind = "speakers" if speaker_folders else "recordings"
        err.print(
            f"fewer than {MIN_OTHER_VOICEPRINTS + 1} enrolment {kind}: no fit for scores centred on the "
            "tenant's voiceprints (the server then scores raw cosines)"
        )
    out.print_json(json.dumps(calibration.to_dict()))
    for duration in (0.5, 1, 3, 10):
        out.print(
            f"threshold at {duration:g} s of speech: {calibration.threshold(duration):.3f}", highlight=False
        )
    if output is not None:
        output.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
        err.print(f"wrote {output}")
    if save:
        path = provision.write_calibration(embedder.spec, calibration)
        err.print(f"saved in {path}")


# --- models --------------------------------------------------------------------------------------
@models_app.command("list")
@user_errors
def models_list() -> None:
    """The built-in models and whether they are fetched."""
    table = Table()
    for column in ("id", "name", "dim", "licence", "fetched"):
        table.add_column(column)
    for spec in BUILTIN.values():
        card = provision.read_card(spec)
        fetched = "yes" if card else "no"
        default = " (default)" if spec.id == DEFAULT_MODEL else ""
        table.add_row(spec.id + default, spec.name, str(spec.embedding_dim), spec.licence, fetched)
    out.print(table)
    out.print(f"cache: {provision.default_home() / 'models'}", highlight=False)


@models_app.command("fetch")
@user_errors
def models_fetch(
    models: Annotated[
        list[str] | None, typer.Argument(help="Model ids or aliases; default: all built-ins.")
    ] = None,
) -> None:
    """Download, check and convert models to ONNX (no torch, no model hub)."""
    for name in models or list(BUILTIN):
        spec = get_spec(name)
        path = provision.fetch_model(spec, progress=model_progress(spec))
        out.print(f"{spec.id}: {path}", highlight=False)


@models_app.command("info")
@user_errors
def models_info(model: Annotated[str, typer.Argument(help="Model id or alias.")] = DEFAULT_MODEL) -> None:
    """The model card of a fetched model."""
    spec = get_spec(model)
    card = provision.read_card(spec)
    if card is None:
        raise ModelError(f"model {spec.id} is not fetched yet: run `vpmon models fetch {spec.id}`")
    out.print_json(card.to_json())


# The voiceprint service and server commands (streamer/cli_service.py), listed after the ones above.
app.registered_commands += service_app.registered_commands
app.registered_commands += stream_app.registered_commands
app.registered_commands += demo_app.registered_commands

if __name__ == "__main__":
    app()
