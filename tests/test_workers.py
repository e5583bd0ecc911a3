"""``vpmon serve --workers 2`` end to end: a real server of two worker processes behind one port, real
Redis, real websocket calls and a real WebRTC publisher.

What fails here: calls that all land on one worker, a /metrics that does not report the machine's totals
whichever worker answers it, an alert raised twice or not at all, a WHIP DELETE that reaches the worker
not holding the session and does not end it, a SIGTERM that leaves a process behind, a killed worker
that is not replaced, a worker that cannot start and a server that does not say so with its exit code.

Which worker did what is read from the metric files each worker writes (prometheus-client's multiprocess
mode, one file per process: ``counter_<pid>.db``, ``gauge_livesum_<pid>.db``), in the directory the
server's log names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from streamer.auth import Role
from streamer.redis_server import RedisServer
from tests.redis_fixtures import free_port
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, alerts_for, native_call, speech
from tests.test_whip import Publisher

TENANT = "workers"
WORKERS = 2
WAIT_SECONDS = 90.0  # a deadline for what the server does on its own, never a timing assertion
FRAME_BYTES = 320  # native_call's 20 ms of PCM16 at 8 kHz
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Workers:
    server: RunningServer
    metrics_dir: Path

    def pids(self) -> dict[int, int]:
        """Worker number → pid of its newest process, from the parent's log."""
        found: dict[int, int] = {}
        for line in self.server.log.read_text(errors="replace").splitlines():
            match = re.search(r'"message": "worker (\d+): pid (\d+)"', line)
            if match:
                found[int(match.group(1))] = int(match.group(2))
        return found

    def started(self) -> int:
        """Workers whose server finished its startup, restarts included."""
        return self.server.log.read_text(errors="replace").count("Application startup complete.")


def start_workers(tmp: Path, redis_server: RedisServer, **settings: object) -> Workers:
    server = start_vpmon(tmp, redis_server, workers=WORKERS, **settings)
    found = re.search(r"metrics in (\S+?)\"", server.log.read_text(errors="replace"))
    assert found, server.log_tail()
    workers = Workers(server, Path(found.group(1)))
    wait_for(lambda: workers.started() == WORKERS, f"{WORKERS} workers to start", server)
    return workers


def wait_for(condition: object, what: str, server: RunningServer) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"waited {WAIT_SECONDS:.0f} s for {what}:\n{server.log_tail()}"
        time.sleep(0.2)


def per_worker(metrics_dir: Path, kind: str, name: str, **labels: str) -> dict[int, float]:
    """One sample's value in each process' own file: pid → value (kind: counter, gauge_livesum, …)."""
    values: dict[int, float] = {}
    for path in metrics_dir.glob(f"{kind}_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    values[pid] = values.get(pid, 0.0) + sample.value
    return values


def scrape(server: RunningServer, key: str) -> dict[str, float]:
    """/metrics, every sample summed over its labels but ``protocol``: name{protocol} → value."""
    with server.client(key) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            name = sample.name + (f"{{{sample.labels['protocol']}}}" if "protocol" in sample.labels else "")
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer) -> Iterator[Workers]:
    running = start_workers(
        tmp_path_factory.mktemp("vpmon-workers"), api_redis, whip_loopback_candidates="true"
    )
    try:
        yield running
    finally:
        stop_vpmon(running.server)


@pytest.fixture(scope="module")
def keys(workers: Workers, telephone_devset: Path) -> dict[str, str]:
    server = workers.server
    admin = server.key(TENANT)
    with server.client(admin) as client:
        paths = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        response = client.post("/v1/voiceprints", data={"speaker_id": "agent-ca"}, files=files)
        assert response.status_code == 201, response.text
    return {"admin": admin, "monitor": server.key(TENANT, Role.MONITOR)}


@pytest.fixture(scope="module")
def calls(telephone_devset: Path) -> dict[str, np.ndarray]:
    genuine = speech(telephone_devset, "tuxpaint_ca", ENROL, 9)
    return {
        "genuine": genuine,
        "takeover": np.concatenate([genuine, speech(telephone_devset, "tuxpaint_ro", 0, 6)]),
    }


def test_calls_spread_over_the_workers_and_metrics_add_up(workers: Workers, keys: dict, calls: dict) -> None:
    server, monitor = workers.server, keys["monitor"]
    plan = {f"genuine-{i}": calls["genuine"] for i in range(7)} | {"takeover": calls["takeover"]}
    before = scrape(server, monitor)

    async def run_all() -> list[tuple[list[dict], object]]:
        return await asyncio.gather(
            *(native_call(server, monitor, cid, audio) for cid, audio in plan.items())
        )

    results = dict(zip(plan, asyncio.run(run_all()), strict=True))
    for call_id, (_, close) in results.items():
        assert close is not None and close.code == 1000, (call_id, close, server.log_tail())

    # One takeover alert, on the takeover call only: to the peer, and in the alert stream once.
    for call_id, (frames, _) in results.items():
        pushed = [f["kind"] for f in frames if f["type"] == "alert"]
        assert pushed == (["takeover"] if call_id == "takeover" else []), call_id
        stored = [a["kind"] for a in alerts_for(server, monitor, call_id)]
        assert stored == (["takeover"] if call_id == "takeover" else []), call_id

    # Both workers took calls: each one's own file counts frames.
    sent = sum(-(-len(audio) * 2 // FRAME_BYTES) for audio in plan.values())
    by_pid = per_worker(
        workers.metrics_dir, "counter", "vpmon_audio_frames_received_total", protocol="native"
    )
    working = {pid for pid, frames in by_pid.items() if frames > 0}
    assert len(working) == WORKERS and working == set(workers.pids().values()), (by_pid, workers.pids())

    # Whichever worker answers /metrics reports the machine's totals: every frame the calls sent.
    for _ in range(6):  # new connections: the scrapes reach both workers
        after = scrape(server, monitor)
        received = after["vpmon_audio_frames_received_total{native}"]
        assert received - before.get("vpmon_audio_frames_received_total{native}", 0.0) == sent
        assert after["vpmon_alerts_total{native}"] - before.get("vpmon_alerts_total{native}", 0.0) == 1
        assert after["vpmon_calls_active{native}"] == 0
        assert (
            after["vpmon_call_closes_total{native}"] - before.get("vpmon_call_closes_total{native}", 0) == 8
        )
        assert after["vpmon_build_info"] == 1 and after["vpmon_redis_up"] == 1
        assert not any(name.startswith("process_") for name in after)  # they would be one worker's


def test_a_whip_delete_reaching_the_other_worker_ends_the_session(
    workers: Workers, keys: dict, calls: dict
) -> None:
    """The owner of the session is stopped (SIGSTOP); the DELETE goes over a connection the other worker
    has answered on, so it takes it and asks the owner through Redis; the owner, continued, ends the call
    and answers."""
    server, monitor = workers.server, keys["monitor"]
    redis = server.redis.client()
    auth = {"Authorization": f"Bearer {monitor}"}

    def owner_pid() -> int | None:
        live = per_worker(workers.metrics_dir, "gauge_livesum", "vpmon_calls_active", protocol="whip")
        owners = [pid for pid, calls in live.items() if calls == 1]
        return owners[0] if len(owners) == 1 else None

    async def until(condition: object, what: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, (
                f"waited {WAIT_SECONDS:.0f} s for {what}:\n{server.log_tail()}"
            )
            await asyncio.sleep(0.1)

    async def client_of_the_running_worker() -> httpx.AsyncClient:
        """A client with one connection, which the worker still running answered: the kernel spreads
        connections over the workers' sockets by their addresses, and the stopped owner answers none."""
        for _ in range(20):
            http = httpx.AsyncClient(
                base_url=server.url, headers=auth, timeout=60, limits=httpx.Limits(max_connections=1)
            )
            with contextlib.suppress(httpx.TimeoutException):
                if (await http.get("/healthz", timeout=2.0)).status_code == 200:
                    return http
            await http.aclose()  # it went to the owner, which will answer it when continued
        raise AssertionError("20 connections in a row went to the stopped worker")

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        publisher = Publisher(calls["genuine"], data_channel=False, speed=1)
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=60) as http:
            location = await publisher.publish(http, call_id="whip-forwarded", agent_id="agent-ca")
        await until(lambda: owner_pid() is not None, "the WHIP call to be live on one worker")
        owner = owner_pid()
        assert owner is not None
        os.kill(owner, signal.SIGSTOP)
        try:
            http = await client_of_the_running_worker()
            try:
                deleting = asyncio.create_task(http.delete(location))
                await until(
                    lambda: redis.pubsub_channels("vpwhip-reply:*"), "the other worker to ask the owner"
                )
                os.kill(owner, signal.SIGCONT)
                deleted = await deleting
                again = await http.delete(location)
            finally:
                await http.aclose()
        finally:
            os.kill(owner, signal.SIGCONT)
        await publisher.pc.close()
        return deleted, again

    deleted, again = asyncio.run(scenario())
    assert deleted.status_code == 200, deleted.text
    ended = deleted.json()
    assert (ended["call_id"], ended["state"], ended["agent_id"]) == ("whip-forwarded", "ended", "agent-ca")
    assert again.status_code == 404, again.text  # ended: whichever worker answers
    with server.client(monitor) as client:
        call = next(c for c in client.get("/v1/calls").json() if c["call_id"] == "whip-forwarded")
        assert call["state"] == "ended"
        # A session id of a gateway that runs no more (nobody listens on its channel): 404 at once.
        assert client.delete("/v1/whip/0123456789ab-gone").status_code == 404


def test_sigterm_stops_every_process(tmp_path: Path, api_redis: RedisServer) -> None:
    running = start_workers(tmp_path, api_redis)
    server, pids = running.server, running.pids()
    key = server.key("sigterm", Role.MONITOR)
    with (
        server.client(key) as client,
        client.stream("GET", "/v1/alerts/stream", timeout=httpx.Timeout(10.0, read=WAIT_SECONDS)) as feed,
    ):
        assert feed.status_code == 200
        server.process.send_signal(signal.SIGTERM)
        for _ in feed.iter_lines():  # keep-alives until the worker stops: the feed ends by itself
            pass
    assert server.process.wait(timeout=WAIT_SECONDS) == 0, server.log_tail()
    assert not [pid for pid in pids.values() if alive(pid)]
    assert "all workers stopped" in server.log_tail()
    assert not running.metrics_dir.exists()  # the server's own temporary directory


def test_a_killed_worker_is_replaced_and_its_counts_stay(tmp_path: Path, api_redis: RedisServer) -> None:
    running = start_workers(tmp_path, api_redis)
    server = running.server
    key = server.key("killed", Role.MONITOR)
    try:
        # A call for an agent nobody enrolled: closed with 4004, and counted by the worker that took it.
        _, close = asyncio.run(native_call(server, key, "counted", np.zeros(8000), agent_id="nobody"))
        assert close is not None and close.code == 4004
        closes = per_worker(running.metrics_dir, "counter", "vpmon_call_closes_total", protocol="native")
        [victim] = [pid for pid, count in closes.items() if count == 1]
        [number] = [n for n, pid in running.pids().items() if pid == victim]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: running.pids()[number] != victim, f"a new worker {number}", server)
        wait_for(lambda: running.started() == WORKERS + 1, "the new worker to start", server)
        assert "was killed by SIGKILL: starting another in its place" in server.log_tail()
        assert not alive(victim) and server.process.poll() is None
        assert not list(running.metrics_dir.glob(f"gauge_live*_{victim}.db"))  # its live gauges are gone
        for _ in range(4):  # new connections: both workers answer, the new one too
            after = scrape(server, key)
            assert after["vpmon_call_closes_total{native}"] == 1  # the dead worker's count stays
            assert after["vpmon_build_info"] == 1 and after["vpmon_calls_active{native}"] == 0
    finally:
        stop_vpmon(server)
    assert server.process.returncode == 0, server.log_tail()


def test_a_worker_that_cannot_start_stops_the_server_with_exit_code_3(tmp_path: Path) -> None:
    """Redis is not there: each worker's startup fails, and the parent exits as a lone server would."""
    env = {
        **os.environ,
        "VPMON_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "VPMON_PORT": str(free_port()),
        "VPMON_CONFIG": str(tmp_path / "absent.toml"),
        "VPMON_WORKERS": str(WORKERS),
    }
    done = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS * 2,
        cwd=REPO,
    )
    assert done.returncode == 3, done.stderr[-3000:]
    messages = [json.loads(line)["message"] for line in done.stderr.splitlines() if line.startswith("{")]
    assert any("could not start (exited with 3): stopping the server" in m for m in messages), messages
