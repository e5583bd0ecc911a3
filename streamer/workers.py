"""``vpmon serve --workers N``: N gateway processes on one machine, behind one listening port.

One gateway is one event loop, and an event loop is one core at most: measured with
benchmarks/load.py, one gateway sustains 250 calls and saturates its loop at 275 while the machine still
has idle CPU. N worker processes, each with its own event loop, embedding pool and Redis connections,
are N gateways in the sense of ARCHITECTURE.md's scale-out: each has its own gateway id, spool file and
lease, and they share calls, bindings, alerts and WHIP session ends through Redis only
(streamer/whip.py forwards a DELETE to the worker holding the session). What each counts for itself:
the per-key limits (streamer/limits.py: a key may hold N × ``VPMON_KEY_MAX_CALLS`` calls on the
machine), ``GET /v1/whip`` (the sessions of the worker that answered) and a call id's "already
streaming" check.

The port: each worker listens on it with a socket of its own, all with ``SO_REUSEPORT``, and the kernel
spreads new connections over them by a hash of their addresses: evenly, whatever each worker is doing. (One
listening socket shared by all, as uvicorn's own ``--workers`` does, goes to whichever worker wakes first:
measured here, 37 of 40 calls made one after the other went to the same worker.) A call's websocket stays
on the worker that accepted it; connections still waiting in a worker's backlog when it dies are reset.
The parent holds the port bound (without listening, so it gets no connections): another program cannot
take it while a worker restarts, and a port in use fails at once. Linux lets only processes of the same
user join a port's group (so a second ``vpmon serve --workers`` of the same user on the same port would
share it). The parent itself loads no model and serves nothing: it

- starts the embedded Redis once, before the workers (when ``VPMON_REDIS_URL`` is unset);
- gives the workers a fresh directory for their metrics (``PROMETHEUS_MULTIPROC_DIR``; one given in
  the environment is emptied first), so ``/metrics`` on any worker reports the machine's totals
  (streamer/metrics.py), and removes a dead worker's live gauges from it (``mark_process_dead``);
- on SIGTERM, SIGINT or SIGHUP, passes SIGTERM to every worker, which stops as a lone server does (the
  SSE feeds end, calls get their last verdicts and are closed), and kills any still running after
  ``STOP_TIMEOUT_S``; it exits 0;
- starts a new worker in place of one that ended by itself (a crash, the OOM killer, a SIGKILL), after
  ``RESTART_DELAY_S``, and logs how it ended; its calls' clients reconnect (to the other workers).
  A worker that could not start (exit code 3, uvicorn's: its lifespan failed — Redis unreachable, no
  model) stops the server with that exit code, as a lone ``vpmon serve`` would exit; so does a worker
  that dies ``RESTARTS_MAX`` times within ``RESTART_WINDOW_S`` (exit 1).

A worker whose parent died without stopping it (SIGKILL) notices and stops by itself.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from streamer.settings import Settings
from verifier.errors import VpmonError

log = logging.getLogger("vpmon.workers")

STARTUP_FAILURE = 3  # uvicorn's exit code when the lifespan's startup failed
STOP_TIMEOUT_S = 60.0  # for the workers' graceful stop (calls' last verdicts, SSE feeds' ends)
RESTART_DELAY_S = 1.0
RESTARTS_MAX = 5  # …within RESTART_WINDOW_S: a worker that keeps dying stops the server
RESTART_WINDOW_S = 60.0
POLL_S = 0.2  # how often the parent looks at its signals while no worker ends

_spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or loops inherited


def port_socket(host: str, port: int) -> socket.socket:
    """Bound with SO_REUSEPORT, not listening (it takes no connections yet): the parent's hold on the
    port, or a worker's socket, which uvicorn makes listen once the worker's startup is complete (so no
    connection waits in the backlog of a worker still loading its model)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise VpmonError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def metrics_directory() -> tuple[Path, bool]:
    """The workers' multiprocess metrics directory, empty, and whether it is ours to remove at the end:
    ``PROMETHEUS_MULTIPROC_DIR`` if set (its old files would add to the new counts), else a new one."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):
            old.unlink()
        return path, False
    return Path(tempfile.mkdtemp(prefix="vpmon-metrics-")), True


def worker_main(settings: Settings, number: int) -> None:
    """A worker process: the server of ``vpmon serve`` on a listening socket of its own."""
    # Until uvicorn installs its own handlers (the model loads first), SIGTERM stops the worker at once;
    # uvicorn raises the signal again once it has stopped gracefully, which then ends the process with 0.
    # SIGINT (Ctrl-C reaches the whole process group) is the parent's to act on until then.
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_stop_with_parent, name="parent-watch", daemon=True).start()
    from streamer.app import serve  # the parent never loads the app, its model and its sessions
    from streamer.logs import configure

    configure(settings.log_level)
    log.info("worker %d: pid %d", number, os.getpid())
    try:
        sock = port_socket(settings.host, settings.port)
    except VpmonError as exc:
        log.error("worker %d: %s", number, exc)
        sys.exit(STARTUP_FAILURE)
    serve(settings, sockets=[sock])


def _exit_now(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _stop_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Supervisor:
    settings: Settings
    count: int
    workers: dict[int, BaseProcess] = field(default_factory=dict)  # number → process
    restarts: deque[float] = field(default_factory=deque)
    stop_signal: int | None = None
    exit_code: int = 0

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop_requested)
        for number in range(1, self.count + 1):
            self._start(number)
        due: dict[int, float] = {}  # workers to start again: number → when
        while self.stop_signal is None and self.exit_code == 0:
            sentinels = {p.sentinel: n for n, p in self.workers.items() if n not in due}
            timeout = min([POLL_S, *(max(0.0, t - time.monotonic()) for t in due.values())])
            for sentinel in multiprocessing.connection.wait(list(sentinels), timeout):
                self._ended(sentinels[sentinel], due)  # type: ignore[index]
            for number, at in list(due.items()):
                if at <= time.monotonic() and self.stop_signal is None and self.exit_code == 0:
                    del due[number]
                    self._start(number)
        if self.stop_signal is not None:
            log.info("%s: stopping %d workers", signal.Signals(self.stop_signal).name, len(self.workers))
        self._stop_all()
        return self.exit_code

    def _stop_requested(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def _start(self, number: int) -> None:
        process = _spawn.Process(
            target=worker_main, args=(self.settings, number), name=f"vpmon-worker-{number}"
        )
        process.start()
        self.workers[number] = process
        log.info("started worker %d (pid %d)", number, process.pid)

    def _ended(self, number: int, due: dict[int, float]) -> None:
        process = self.workers[number]
        process.join()
        _forget(process)
        how = _how_it_ended(process.exitcode)
        if process.exitcode == STARTUP_FAILURE:
            log.error(
                "worker %d (pid %d) could not start (%s): stopping the server", number, process.pid, how
            )
            self.exit_code = STARTUP_FAILURE
            return
        now = time.monotonic()
        self.restarts.append(now)
        while self.restarts and self.restarts[0] < now - RESTART_WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) > RESTARTS_MAX:
            log.error(
                "worker %d (pid %d) %s; workers ended %d times within %.0f s: stopping the server",
                number, process.pid, how, len(self.restarts), RESTART_WINDOW_S,
            )  # fmt: skip
            self.exit_code = 1
            return
        log.error("worker %d (pid %d) %s: starting another in its place", number, process.pid, how)
        due[number] = now + RESTART_DELAY_S

    def _stop_all(self) -> None:
        running = [p for p in self.workers.values() if p.exitcode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker pid %d did not stop within %.0f s: killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.join()
            _forget(process)
        log.info("all workers stopped")


def _forget(process: BaseProcess) -> None:
    """A worker has ended: its live gauges leave the machine's totals (its counters stay in them)."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(process.pid)


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with {exitcode}"


def serve_workers(settings: Settings) -> int:
    """Run ``settings.workers`` gateway processes on one port until a signal stops them; the exit code."""
    from streamer.logs import configure
    from streamer.redis_clients import redis_url

    configure(settings.log_level)
    redis_url(settings)  # the embedded Redis, started here once rather than raced for by every worker
    hold = port_socket(settings.host, settings.port)
    directory, ours = metrics_directory()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)  # the workers inherit it when they start
    log.info(
        "serving on %s:%d with %d workers (pid %d), metrics in %s",
        settings.host, settings.port, settings.workers, os.getpid(), directory,
    )  # fmt: skip
    try:
        return Supervisor(settings, settings.workers).run()
    finally:
        hold.close()
        if ours:
            shutil.rmtree(directory, ignore_errors=True)
