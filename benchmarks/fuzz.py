"""Fuzzing at scale (issue 9): every target of ``tests/fuzz_targets.py`` (the sans-I/O adapters and their
upgrade checks, the audio decoders, the live audio chain, the VAD, the model-file loaders, trials files)
on a large budget of generated inputs, with a per-input watchdog for hangs.

    python benchmarks/fuzz.py                      100,000 inputs over all targets (about 6 min)
    python benchmarks/fuzz.py --budget 300000      more
    python benchmarks/fuzz.py --quick              5,000 inputs (a CI-sized run, about 20 s)
    python benchmarks/fuzz.py --targets twilio,model.torch_weights --timeout 5
    python benchmarks/fuzz.py --atheris 120        then coverage-guided fuzzing, 2 min a target (atheris)

The budget is shared among the targets by weight (the live audio chain and the VAD, whose inputs are
seconds of audio, get 0.6 of a share). Each target runs in a child process of its own (forked), where
hypothesis draws inputs from the target's strategy (generation only: no example database, and no
shrinking, as nothing fails from hypothesis' point of view) and the target's check runs on each:

- an exception the check lets through is an **unhandled exception** (counted by type and place, the first
  input kept); an ``AssertionError`` is a **broken property** (an invariant the results must satisfy);
- before each input the child writes the input and the time into shared memory; the parent kills a child
  whose input has run for ``--timeout`` seconds (a **hang**, its input kept) and starts another child for
  the rest of the budget; a child that dies on its own (a signal) is a **crash**;
- children run with their address space capped (``--memory-gb``), so an input that asks for terabytes
  fails with MemoryError instead of waking the machine's OOM killer; their stdout and stderr (libsndfile's
  decoders print there) go to /dev/null.

``--atheris SECONDS`` then runs libFuzzer (atheris, if installed; not a project dependency: a cp311 wheel
is on PyPI) on the byte-level parsers, the .pt loader and the adapters, seeded with valid inputs: coverage
guidance found two loader bugs that 100,000 hypothesis inputs had not.

Results: a table (target, inputs, unhandled exceptions, broken properties, hangs, crashes, seconds,
inputs/s) and ``benchmarks/results/fuzz.json`` with every failure's first input. The exit status is 1 when
anything failed. The per-input ``@example`` regressions of the bugs found live in ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from common import environment  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests import fuzz_targets  # noqa: E402
from tests.fuzz_targets import TARGETS, Target  # noqa: E402

OUTPUT = BENCH / "results" / "fuzz.json"
DEFAULT_BUDGET = 100_000
QUICK_BUDGET = 5_000
INPUT_CHARS = 2_000  # of an input's repr kept for the report
MAX_STOPS = 5  # hangs and crashes after which a target is given up


@dataclass
class Failure:
    kind: str  # "unhandled", "property", "hang", "crash"
    error: str  # exception type, or what stopped the child
    where: str  # file:line where it was raised
    message: str
    input: str
    count: int = 1


@dataclass
class Outcome:
    target: str
    what: str
    budget: int
    inputs: int = 0
    seconds: float = 0.0
    children: int = 0
    exhausted: bool = False  # hypothesis ran out of distinct inputs before the budget
    failures: dict[tuple[str, str, str], Failure] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(f.count for f in self.failures.values() if f.kind == kind)

    def add(self, failure: Failure) -> None:
        key = (failure.kind, failure.error, failure.where)
        if key in self.failures:
            self.failures[key].count += failure.count
        else:
            self.failures[key] = failure


# --------------------------------------------------------------------------------------------- the child


@dataclass
class Shared:
    """What a child tells its parent while it runs, without a message: where it is."""

    started: Any  # mp.Value("d"): monotonic time the current input started, 0 between inputs
    done: Any  # mp.Value("q"): inputs checked
    current: Any  # mp.Array("c"): repr of the current input

    @staticmethod
    def make(context: Any) -> Shared:
        return Shared(
            context.Value("d", 0.0, lock=False),
            context.Value("q", 0, lock=False),
            context.Array("c", INPUT_CHARS + 1, lock=False),
        )


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    inside = [f for f in frames if "/hypothesis/" not in f.filename] or frames
    last = inside[-1]
    name = last.filename.removeprefix(f"{REPO}/")
    return f"{name}:{last.lineno}"


def child(
    name: str, count: int, seed_value: int, shared: Shared, conn: Connection, memory_gb: float, directory: str
) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if memory_gb > 0:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    fuzz_targets.use_scratch(Path(directory))
    target = TARGETS[name]
    reported: set[tuple[str, str, str]] = set()

    def report(kind: str, error: BaseException, text: str) -> None:
        key = (kind, type(error).__name__, _where(error))
        first = key not in reported
        reported.add(key)
        message = str(error)[:500] if first else ""
        conn.send(("failure", kind, *key[1:], message, text if first else ""))

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @seed(seed_value)
    @given(target.strategy)
    def run(case: Any) -> None:
        text = repr(case)[:INPUT_CHARS]
        shared.current.value = text.encode("utf-8", "backslashreplace")[:INPUT_CHARS]
        shared.started.value = time.monotonic()
        try:
            target.check(case)
        except AssertionError as error:
            report("property", error, text)
        except Exception as error:
            report("unhandled", error, text)
        finally:
            shared.started.value = 0.0
            shared.done.value += 1

    try:
        run()
    except Exception:  # the generator itself failed: a bug in tests/fuzz_targets.py, not in the product
        conn.send(("generator", traceback.format_exc()))
        return
    conn.send(("finished", shared.done.value))


# --------------------------------------------------------------------------------------------- the parent


def fuzz_target(
    target: Target, budget: int, args: argparse.Namespace, progress: Callable[[str], None]
) -> Outcome:
    outcome = Outcome(target.name, target.what, budget)
    context = mp.get_context("fork")
    rng = random.Random(f"{args.seed}/{target.name}")
    stops = 0
    started = time.perf_counter()
    while outcome.inputs < budget and stops < MAX_STOPS:
        shared = Shared.make(context)
        receive, send = context.Pipe(duplex=False)
        directory = tempfile.mkdtemp(prefix=f"vpmon-fuzz-{target.name}-")
        process = context.Process(
            target=child,
            args=(
                target.name,
                budget - outcome.inputs,
                rng.getrandbits(64),
                shared,
                send,
                args.memory_gb,
                directory,
            ),
            daemon=True,
        )
        process.start()
        send.close()
        outcome.children += 1
        finished = False
        stopped: str | None = None
        while True:
            process.join(0.1)
            while receive.poll():
                try:
                    message = receive.recv()
                except EOFError:
                    break
                if message[0] == "failure":
                    _, kind, error, where, text, first_input = message
                    outcome.add(Failure(kind, error, where, text, first_input))
                elif message[0] == "generator":
                    raise RuntimeError(f"the strategy of {target.name} failed:\n{message[1]}")
                else:
                    finished = True
            if not process.is_alive():
                break
            began = shared.started.value
            if began and time.monotonic() - began > args.timeout:
                process.kill()
                process.join()
                stopped = "hang"
                break
            progress(f"{target.name}: {outcome.inputs + shared.done.value:,} / {budget:,}")
        done = shared.done.value
        if stopped is None and not finished:
            stopped = "crash"
        if stopped is not None:
            text = shared.current.value.decode("utf-8", "replace")
            if stopped == "hang":
                message = f"an input ran for more than {args.timeout:g} s; the child was killed"
                error = "timeout"
            else:
                message = f"the child died (exit code {process.exitcode})"
                error = f"exit {process.exitcode}"
            outcome.add(Failure(stopped, error, "", message, text))
            done += 1  # the input that hung or crashed
            stops += 1
        outcome.inputs += done
        receive.close()
        shutil.rmtree(directory, ignore_errors=True)
        if finished and outcome.inputs < budget:  # hypothesis found no more distinct inputs
            outcome.exhausted = True
            break
    outcome.seconds = time.perf_counter() - started
    return outcome


def shares(targets: list[Target], budget: int) -> dict[str, int]:
    total = sum(target.weight for target in targets)
    return {target.name: max(1, round(budget * target.weight / total)) for target in targets}


# --------------------------------------------------------------------------------------------- atheris
# Coverage-guided fuzzing (libFuzzer through atheris, when it is installed: ``pip install atheris``, not a
# project dependency) of the byte-level parsers, seeded with valid inputs from the hypothesis strategies.
# It found two loader bugs that 100,000 hypothesis inputs had not (a ZIP64 record is_zipfile() raises on,
# and a memo index that makes the unpickler allocate gigabytes), so it runs after hypothesis when asked.


def _atheris_loader() -> tuple[Callable[[bytes], None], list[bytes]]:
    from verifier.errors import ModelError
    from verifier.models import torch_weights

    path = fuzz_targets.scratch() / "atheris.pt"

    def one(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(ModelError):
            torch_weights.load_state_dict(path)

    return one, _seeds(fuzz_targets.checkpoints(), lambda c: c.data if c.attack == "none" else None)


def _atheris_adapters() -> tuple[Callable[[bytes], None], list[bytes]]:
    """The input split into frames at 0xFF bytes: binary if it starts with 0x00, else UTF-8 text."""
    from streamer.protocols import audiohook, native, twilio

    def one(data: bytes) -> None:
        adapters = (
            audiohook.AudioHookSession(fuzz_targets.AH_SESSION, None),
            twilio.TwilioMediaStream(),
            native.NativeStream(),
        )
        for adapter in adapters:
            for frame in data.split(b"\xff"):
                if frame[:1] == b"\x00":
                    adapter.receive_bytes(frame[1:])
                else:
                    adapter.receive_text(frame.decode("utf-8", "replace"))
                adapter.events_received()
                adapter.data_to_send()
            adapter.connection_lost()
            adapter.events_received()

    def frames(session: Any) -> bytes:  # server actions (verdict pushes) are left out
        wire = [f for f in session.frames if isinstance(f, str | bytes)]
        return b"\xff".join(f.encode("utf-8", "replace") if isinstance(f, str) else b"\x00" + f for f in wire)

    return one, _seeds(fuzz_targets.twilio_sessions(), frames) + _seeds(
        fuzz_targets.native_sessions(), frames
    )


ATHERIS_TARGETS: dict[str, Callable[[], tuple[Callable[[bytes], None], list[bytes]]]] = {
    "model.torch_weights": _atheris_loader,
    "adapters": _atheris_adapters,
}


def _seeds(strategy: Any, to_bytes: Callable[[Any], bytes | None], count: int = 100) -> list[bytes]:
    found: list[bytes] = []

    @settings(
        max_examples=count, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
    )
    @seed(0)
    @given(strategy)
    def collect(case: Any) -> None:
        data = to_bytes(case)
        if data is not None and len(data) < 20_000:
            found.append(data)

    collect()
    return found


def atheris_child(name: str, libfuzzer_args: list[str]) -> None:
    import atheris

    one, seeds = ATHERIS_TARGETS[name]()
    corpus = Path(libfuzzer_args[-1])
    for index, data in enumerate(seeds):
        (corpus / f"seed-{index}").write_bytes(data)
    atheris.instrument_all()  # the product's modules (and zipfile, pickletools, json…) report coverage
    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


def run_atheris(name: str, seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    """One libFuzzer run of ``seconds``; it stops at its first finding (an exception, a timeout, an OOM)."""
    import subprocess

    work = Path(tempfile.mkdtemp(prefix=f"vpmon-atheris-{name}-"))
    (work / "corpus").mkdir()
    command = [
        sys.executable,
        __file__,
        "--atheris-child",
        name,
        f"-max_total_time={int(seconds)}",
        f"-timeout={int(args.timeout)}",
        f"-rss_limit_mb={int(args.memory_gb * 1024) if args.memory_gb > 0 else 0}",
        f"-malloc_limit_mb={int(args.memory_gb * 1024) if args.memory_gb > 0 else 0}",
        f"-artifact_prefix={work}/",
        str(work / "corpus"),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", check=False)
    log = result.stderr
    runs = [line for line in log.splitlines() if line.startswith("Done ")]
    finding = None
    for marker in ("Uncaught Python exception", "ERROR: libFuzzer"):
        if marker in log:
            finding = log[log.index(marker) :][:1500]
            break
    artifacts = sorted(p.name for p in work.iterdir() if p.is_file())
    outcome = {
        "target": name,
        "seconds": round(time.perf_counter() - started, 1),
        "executions": int(runs[-1].split()[1]) if runs else None,
        "exit_code": result.returncode,
        "finding": finding,
        "artifacts": [str(work / a) for a in artifacts],
        "corpus_files": len(list((work / "corpus").iterdir())),
        "coverage": next(
            (line.split("cov:")[1].split()[0] for line in reversed(log.splitlines()) if "cov:" in line), None
        ),
    }
    if finding is None:
        shutil.rmtree(work, ignore_errors=True)
    return outcome


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--atheris-child":
        atheris_child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget", type=int, default=None, help=f"inputs in all (default {DEFAULT_BUDGET:,})"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_BUDGET:,} inputs: a CI-sized run")
    parser.add_argument("--targets", help=f"comma-separated, of: {', '.join(TARGETS)}")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one input may run (default 10)")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address space of a child (0: no cap)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every target's generator (default 0)")
    parser.add_argument(
        "--atheris",
        type=float,
        default=0,
        metavar="SECONDS",
        help=f"then coverage-guided fuzzing of {', '.join(ATHERIS_TARGETS)} for SECONDS each (needs atheris)",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    budget = args.budget if args.budget is not None else QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    names = args.targets.split(",") if args.targets else list(TARGETS)
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}: choose among {', '.join(TARGETS)}")
    targets = [TARGETS[name] for name in names]
    console = Console(width=max(110, shutil.get_terminal_size().columns))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(
            ("vpmon", "numpy", "soundfile", "soxr", "webrtcvad-wheels", "aiortc", "hypothesis", "atheris")
        ),
        "settings": {
            "budget": budget,
            "targets": names,
            "timeout_seconds": args.timeout,
            "memory_gb": args.memory_gb,
            "seed": args.seed,
        },
    }
    outcomes = []
    with console.status("fuzzing") as status:
        for target in targets:
            outcome = fuzz_target(target, shares(targets, budget)[target.name], args, status.update)
            outcomes.append(outcome)
            console.log(
                f"{target.name}: {outcome.inputs:,} inputs in {outcome.seconds:.1f} s, "
                f"{sum(f.count for f in outcome.failures.values())} failure(s)"
            )

    table = Table(
        title=f"Fuzzing: {sum(o.inputs for o in outcomes):,} generated inputs, {args.timeout:g} s per input"
    )
    for column in ("target", "inputs", "unhandled", "properties", "hangs", "crashes", "seconds", "inputs/s"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for outcome in outcomes:
        table.add_row(
            outcome.target,
            f"{outcome.inputs:,}" + ("*" if outcome.exhausted else ""),
            str(outcome.count("unhandled")),
            str(outcome.count("property")),
            str(outcome.count("hang")),
            str(outcome.count("crash")),
            f"{outcome.seconds:.1f}",
            f"{outcome.inputs / outcome.seconds:,.0f}",
        )
    totals = {
        kind: sum(o.count(kind) for o in outcomes) for kind in ("unhandled", "property", "hang", "crash")
    }
    total_inputs = sum(o.inputs for o in outcomes)
    total_seconds = sum(o.seconds for o in outcomes)
    table.add_row(
        "all",
        f"{total_inputs:,}",
        *(str(totals[kind]) for kind in ("unhandled", "property", "hang", "crash")),
        f"{total_seconds:.1f}",
        f"{total_inputs / total_seconds:,.0f}",
        style="bold",
    )
    console.print(table)
    if any(o.exhausted for o in outcomes):
        console.print("* hypothesis ran out of distinct inputs before the target's share of the budget")
    for outcome in outcomes:
        for failure in outcome.failures.values():
            head = f"[red]{outcome.target}[/red] {failure.kind} ×{failure.count}: {failure.error}"
            console.print(
                f"{head} at {failure.where}: {failure.message}\n    input: {failure.input[:300]}",
                highlight=False,
            )

    report["targets"] = [
        {
            "target": o.target,
            "what": o.what,
            "budget": o.budget,
            "inputs": o.inputs,
            "unhandled_exceptions": o.count("unhandled"),
            "broken_properties": o.count("property"),
            "hangs": o.count("hang"),
            "crashes": o.count("crash"),
            "seconds": round(o.seconds, 2),
            "inputs_per_second": round(o.inputs / o.seconds, 1),
            "children": o.children,
            "exhausted": o.exhausted,
            "failures": [vars(f) for f in o.failures.values()],
        }
        for o in outcomes
    ]
    report["totals"] = {"inputs": total_inputs, **totals}
    if args.atheris > 0:
        try:
            import atheris  # noqa: F401
        except ImportError:
            console.print("atheris is not installed (pip install atheris): no coverage-guided run")
        else:
            report["atheris"] = []
            for name in ATHERIS_TARGETS:
                with console.status(f"atheris: {name} for {args.atheris:g} s"):
                    outcome = run_atheris(name, args.atheris, args)
                report["atheris"].append(outcome)
                runs = f"{outcome['executions']:,}" if outcome["executions"] is not None else "?"
                found = (
                    "nothing found" if outcome["finding"] is None else f"FOUND: {outcome['finding'][:400]}"
                )
                console.print(
                    f"atheris {name}: {runs} executions in {outcome['seconds']:.0f} s, "
                    f"coverage {outcome['coverage']} edges: {found}",
                    highlight=False,
                )
                totals["atheris_findings"] = totals.get("atheris_findings", 0) + (
                    outcome["finding"] is not None
                )
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"took {report['elapsed_seconds']:.0f} s; wrote {args.output}")
    sys.exit(1 if any(totals.values()) else 0)


if __name__ == "__main__":
    main()
