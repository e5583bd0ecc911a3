"""``vpmon demo``: the whole live monitor on one machine, from real parts, in about a minute.

It starts its own embedded Redis (a throw-away directory, a free port) and the gateway (uvicorn in a
thread of this process, so nothing outlives the demo), creates an admin and a monitor key, enrols two
agents from the dev voices through the HTTP API, then streams one call over the native websocket
protocol: agent A speaks (verified), then agent B takes over (the takeover alert). A live table shows
every verdict the gateway pushes back. Then it prints the supervisor page's URL and the monitor key
and keeps serving until Ctrl-C (``--exit``: stop after the scripted part), stopping the server and
Redis on the way out.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import numpy as np
import typer
from rich.live import Live
from rich.table import Table

from streamer.auth import KeyStore, Role
from streamer.cli_common import out, user_errors
from streamer.logs import log_config
from streamer.redis_server import RedisServer
from streamer.settings import Settings
from streamer.stream_client import CallAudio, ClientEvent, Pushed, StreamOptions, is_notice, stream_call
from verifier.audio import read_audio, resample
from verifier.errors import VpmonError
from verifier.models import provision
from verifier.models.registry import get_spec

if TYPE_CHECKING:
    import uvicorn

demo_app = typer.Typer()

TENANT = "demo"
# Two clearly different voices of the telephone dev set (the gateway tests use the same pair).
AGENT_A = ("agent-a", "tuxpaint_ca")
AGENT_B = ("agent-b", "tuxpaint_ro")
ENROL_UTTERANCES = 6  # each agent's first six recordings enrol them (the quality gates want >= 10 s)
CALL_UTTERANCES = 4  # the call uses recordings the enrolment never heard
CALL_RATE = 8000
PAUSE_SECONDS = 0.7  # between utterances: the customer's turn (the agent's channel is quiet)
SERVER_START_TIMEOUT_S = 120.0


class DemoError(VpmonError):
    """The demo could not run: no dev voices, a port in use, a server that did not start."""


# --- the call -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoCall:
    audio: CallAudio
    takeover_at: float  # media seconds at which agent B's voice starts


def speaker_files(devset: Path, speaker: str) -> list[Path]:
    files = sorted((devset / "wav" / speaker).glob("*.wav"))
    if len(files) < ENROL_UTTERANCES + CALL_UTTERANCES:
        raise DemoError(
            f"{devset / 'wav' / speaker} has {len(files)} recordings, the demo needs "
            f"{ENROL_UTTERANCES + CALL_UTTERANCES}: build the dev voices with "
            "`python benchmarks/devset.py telephone` and pass that folder with --devset"
        )
    return files


def agent_turns(files: list[Path]) -> np.ndarray:
    """The recordings one after another at 8 kHz, each followed by a pause."""
    parts = []
    for path in files:
        audio = read_audio(path)
        parts += [resample(audio.samples, audio.sample_rate, CALL_RATE)]
        parts += [np.zeros(int(PAUSE_SECONDS * CALL_RATE), np.float32)]
    return np.concatenate(parts)


def build_call(devset: Path) -> DemoCall:
    unseen = slice(ENROL_UTTERANCES, ENROL_UTTERANCES + CALL_UTTERANCES)
    first = agent_turns(speaker_files(devset, AGENT_A[1])[unseen])
    second = agent_turns(speaker_files(devset, AGENT_B[1])[unseen])
    samples = np.concatenate([first, second])
    return DemoCall(CallAudio.from_samples(samples, CALL_RATE, "demo call"), len(first) / CALL_RATE)


# --- the parts: Redis and the gateway ------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_port_free(port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(f"port {port} is in use: pass another with --port (0: any free port)") from None


@contextmanager
def running_gateway(settings: Settings, log_file: Path) -> Iterator[uvicorn.Server]:
    """``vpmon serve``'s app on uvicorn in a thread; its JSON log lines go to ``log_file``, not the
    terminal the table is drawn on. Stopped (and joined) on the way out, whatever happened."""
    import uvicorn

    from streamer.app import create_app  # imports FastAPI and onnxruntime: only when the demo runs
    from streamer.ws_protocol import DirectReceiveProtocol

    logging_config = log_config("info")
    logging_config["handlers"]["json"] = {
        "class": "logging.FileHandler",
        "formatter": "json",
        "filename": str(log_file),
    }
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws=DirectReceiveProtocol,  # websockets-sansio, plus streamer/ws_protocol.py's extension
        log_config=logging_config,
        server_header=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="vpmon-gateway", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise DemoError(f"the gateway did not start; its log is {log_file}")
            time.sleep(0.05)
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C does: through the ``finally`` blocks that stop Redis."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the live table -------------------------------------------------------------------------------
def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


STATE_STYLES = {"verified": "green", "suspect": "yellow", "mismatch": "bold red", "warming_up": "dim"}


@dataclass
class VerdictTable:
    """Every verdict of the call as a row; the alert, when it comes, under the table."""

    takeover_at: float
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    notices: list[dict[str, Any]] = field(default_factory=list)

    def add(self, event: ClientEvent) -> None:
        if not isinstance(event, Pushed):
            return
        if event.kind == "verdict":
            self.verdicts.append(dict(event.data))
        elif is_notice(event.data):
            self.notices.append(dict(event.data))
        else:
            self.alerts.append(dict(event.data))

    def speaker_of(self, verdict: dict[str, Any]) -> str:
        """Who really spoke in the verdict's newest window: the demo knows, the gateway does not."""
        return "B" if verdict.get("media_end", 0.0) > self.takeover_at + 0.5 else "A"

    def render(self) -> Table:
        # Narrow enough for an 80-column terminal: the verdict's media time is its newest window's end.
        table = Table(title="live verdicts of the call of agent-a", title_justify="left")
        for column in ("at s", "voice", "state", "score", "threshold", "LLR", "impostor", "speech s"):
            table.add_column(column, justify="left" if column == "state" else "right", no_wrap=True)
        for v in self.verdicts:
            state = str(v.get("state", "?"))
            style = STATE_STYLES.get(state, "")
            table.add_row(
                _number(v.get("media_end"), ".1f"),
                self.speaker_of(v),
                f"[{style}]{state}[/]" if style else state,
                _number(v.get("score"), ".3f"),
                _number(v.get("threshold"), ".3f"),
                _number(v.get("llr"), "+.2f"),
                _number(v.get("impostor_evidence"), ".1f"),
                _number(v.get("net_speech_seconds"), ".1f"),
            )
        return table


def alert_line(alert: dict[str, Any]) -> str:
    return (
        f"[bold red]ALERT[/] takeover of {alert.get('agent_id')} at {alert.get('media_end', 0):.1f} s: "
        f"score {alert.get('score', 0):.3f} < {alert.get('threshold', 0):.3f}, LLR "
        f"{alert.get('llr', 0):+.2f}, impostor evidence {alert.get('impostor_evidence', 0):.1f}"
    )


# --- the command ----------------------------------------------------------------------------------
def _step(text: str) -> None:
    out.print(f"[bold]\\[demo][/] {text}", highlight=False)


def enrol(client: httpx.Client, agent_id: str, files: list[Path]) -> dict[str, Any]:
    uploads = [("files", (path.name, path.read_bytes(), "audio/wav")) for path in files]
    response = client.post("/v1/voiceprints", data={"speaker_id": agent_id}, files=uploads)
    if response.status_code != 201:
        raise DemoError(f"enrolling {agent_id} failed: HTTP {response.status_code} {response.text}")
    return response.json()["voiceprint"]


def default_devset() -> Path:
    return provision.default_home() / "devset" / "telephone"


@demo_app.command()
@user_errors
def demo(
    devset: Annotated[
        Path | None,
        typer.Option(help="The telephone dev voices (default: $VPMON_HOME/devset/telephone)."),
    ] = None,
    port: Annotated[int, typer.Option(help="The gateway's port on 127.0.0.1 (0: any free one).")] = 8080,
    speed: Annotated[
        float, typer.Option(min=0, help="1 = the call in real time, 4 = four times faster, 0 = at once.")
    ] = 1.0,
    exit_after: Annotated[
        bool, typer.Option("--exit", help="Stop after the scripted part instead of serving until Ctrl-C.")
    ] = False,
) -> None:
    """Live demo: Redis and the gateway, two agents enrolled, a call where agent B takes over from A."""
    began = time.monotonic()
    devset = devset or default_devset()
    call = build_call(devset)  # checks the dev voices first: the cheapest thing to get wrong
    port = port or free_port()
    check_port_free(port)
    spec = get_spec(Settings().model)
    _step(f"model {spec.id}: {provision.ensure_model(spec)}")

    workdir = Path(tempfile.mkdtemp(prefix="vpmon-demo-"))
    redis_server = RedisServer(workdir / "redis", port=free_port(), with_search=False)
    scripted_part_done = False
    try:
        with stop_on_sigterm():
            redis_server.start()
            _step(f"embedded Redis {redis_server.status().version} on 127.0.0.1:{redis_server.port}")
            settings = Settings(redis_url=redis_server.url, host="127.0.0.1", port=port)
            with running_gateway(settings, workdir / "gateway.log"):
                url = f"http://127.0.0.1:{port}"
                _step(f"gateway on {url} (its JSON log: {workdir / 'gateway.log'})")
                scripted(url, redis_server, devset, call, speed, began)
                scripted_part_done = True
                if not exit_after:
                    _step("serving until Ctrl-C")
                    _wait_for_ctrl_c()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how the demo ends: stop everything below
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    _step("stopped the gateway and Redis")
    if not scripted_part_done:
        raise typer.Exit(130)  # the shell's status for "ended by Ctrl-C"


def scripted(
    url: str, redis_server: RedisServer, devset: Path, call: DemoCall, speed: float, began: float
) -> None:
    keys = KeyStore(redis_server.client())
    admin = keys.create(TENANT, Role.ADMIN, "demo admin").token
    monitor = keys.create(TENANT, Role.MONITOR, "demo supervisor").token
    _step(f"tenant {TENANT!r}: an admin key and a monitor key")

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=120) as client:
        for agent_id, speaker in (AGENT_A, AGENT_B):
            files = speaker_files(devset, speaker)[:ENROL_UTTERANCES]
            voiceprint = enrol(client, agent_id, files)
            _step(
                f"enrolled {agent_id} ({speaker}): {voiceprint['net_speech_seconds']:.1f} s of speech "
                f"from {len(files)} recordings"
            )

    pace = "at once" if speed == 0 else ("in real time" if speed == 1 else f"at {speed:g}x real time")
    _step(
        f"streaming a {call.audio.duration:.0f} s call of agent-a over the native websocket {pace}: "
        f"agent A speaks, agent B takes over at {call.takeover_at:.1f} s"
    )
    options = StreamOptions(
        protocol="native", url=url, key=monitor, agent_id=AGENT_A[0], call_id="demo-call", speed=speed
    )
    table = VerdictTable(call.takeover_at)
    with Live(table.render(), console=out, refresh_per_second=4) as live:

        def show(event: ClientEvent) -> None:
            table.add(event)
            if isinstance(event, Pushed) and event.kind == "alert":
                # Above the table in a terminal; in a log, in the order it came.
                text = alert_line(event.data) if not is_notice(event.data) else event.data["message"]
                live.console.print(text, highlight=False)
            live.update(table.render())

        result = asyncio.run(stream_call(call.audio, options, on_event=show))
    if not out.is_terminal:
        out.line()  # Live leaves its last line open when it is not drawing on a terminal
    if result.error:
        raise DemoError(f"the call did not end cleanly: {result.error}")
    if table.alerts:
        delay = table.alerts[0]["media_end"] - call.takeover_at
        _step(f"takeover alert {delay:.1f} s after agent B started speaking")
    else:
        _step("[yellow]no takeover alert in this call[/]")
    _step(f"scripted part done in {time.monotonic() - began:.0f} s")
    out.print(f"\nsupervisor page: {url}/supervisor/", highlight=False)
    out.print(f"monitor key:     {monitor}", highlight=False)


def _wait_for_ctrl_c() -> None:
    stop = threading.Event()
    while not stop.wait(0.5):  # a timed wait, so the main thread notices SIGINT at once
        pass
