"""A real vpmon server for the API tests: ``vpmon serve`` in a subprocess on a free port, against its own
real Redis (tests/redis_fixtures.py), with keys created in that Redis; torn down at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from streamer.auth import KeyStore, Role
from streamer.redis_server import RedisServer
from tests.redis_fixtures import free_port, start_server

STARTUP_TIMEOUT_S = 90.0


@dataclass
class RunningServer:
    url: str
    redis: RedisServer
    process: subprocess.Popen[bytes]
    log: Path
    keys: KeyStore = field(init=False)

    def __post_init__(self) -> None:
        self.keys = KeyStore(self.redis.client())

    def key(self, tenant: str, role: Role | str = Role.ADMIN) -> str:
        return self.keys.create(tenant, role, "test").token

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def start_vpmon(
    tmp: Path, redis_server: RedisServer, port: int | None = None, **settings: object
) -> RunningServer:
    """``port``: a given one, e.g. to restart a server where its clients expect it; else a free one."""
    port = port or free_port()
    env = {
        **os.environ,
        "VPMON_REDIS_URL": redis_server.url,
        "VPMON_HOST": "127.0.0.1",
        "VPMON_PORT": str(port),
        "VPMON_CONFIG": str(tmp / "absent.toml"),
        **{f"VPMON_{name.upper()}": str(value) for name, value in settings.items()},
    }
    log = tmp / f"vpmon-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "serve"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )
    server = RunningServer(f"http://127.0.0.1:{port}", redis_server, process, log)
    probe = server.client(server.key("probe", Role.READ))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"vpmon serve exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if probe.get("/healthz").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_vpmon(server)
            raise AssertionError(
                f"vpmon serve did not answer within {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}"
            )
        time.sleep(0.2)


def stop_vpmon(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def api_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_server(tmp_path_factory.mktemp("api-redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vpmon_server(tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer) -> Iterator[RunningServer]:
    # Small limits, so the limit tests need small files only.
    server = start_vpmon(
        tmp_path_factory.mktemp("vpmon"), api_redis, max_upload_bytes=3_000_000, max_audio_seconds=60
    )
    try:
        yield server
    finally:
        stop_vpmon(server)
