"""The embedded Redis, started for real: lifecycle, password, loopback, and surviving a SIGKILL."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from streamer import redis_server as rs
from streamer.redis_server import RedisServer
from streamer.store import open_store
from tests.redis_fixtures import HAS_SEARCH, free_port, start_server
from tests.test_store_contract import MODEL, make, voice_space
from verifier.errors import StoreError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_server(tmp_path / "redis", with_search=HAS_SEARCH)
    try:
        yield server
    finally:
        if server.pid() is not None:
            server.stop()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for a state of the server (not a timing assertion: the deadline only stops a hung test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_start_status_stop(server: RedisServer) -> None:
    status = server.status()
    assert status.running and status.version == "8.2.3" and status.aof_enabled
    assert status.pid == server.pid() and status.port == server.port
    assert "vectorset" in status.modules
    assert ("search" in status.modules) == HAS_SEARCH
    assert "running" in status.describe() and server.password not in status.describe()
    pid = server.pid()
    server.start()  # already running: nothing happens
    assert server.pid() == pid
    assert server.client().ping()
    assert server.stop() is True
    assert not server.is_running() and server.pid() is None
    assert not server.pid_file.exists()  # a clean shutdown
    assert server.stop() is False
    assert not server.status().running


def test_password_required(server: RedisServer) -> None:
    for password in (None, "guess"):
        client = redis.Redis(host="127.0.0.1", port=server.port, password=password, protocol=2, retry=None)
        with pytest.raises(redis.AuthenticationError):
            client.ping()
    assert redis.Redis.from_url(server.url, protocol=2).ping()
    assert len(server.password) >= 40  # 32 random bytes


def test_secrets_are_private(server: RedisServer) -> None:
    for path in (server.password_file, server.conf_file):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert server.dir.stat().st_mode & 0o777 == 0o700
    assert server.password_file.read_text().strip() == server.password
    # The password is in the 0600 config file, never on the command line that `ps` shows to everyone.
    cmdline = Path(f"/proc/{server.pid()}/cmdline").read_bytes()
    assert server.password.encode() not in cmdline


def _listeners(port: int) -> list[tuple[str, str]]:
    """(table, local address in hex) of every socket listening on ``port``, from /proc/net."""
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append((table, address))
    return found


def test_listens_on_loopback_only(server: RedisServer) -> None:
    # 0100007F is 127.0.0.1 in /proc/net/tcp's byte order; nothing on IPv6 or on other addresses.
    assert _listeners(server.port) == [("tcp", "0100007F")]


def test_a_taken_port_fails_with_the_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = RedisServer(tmp_path / "redis", port=port, with_search=False)
        with pytest.raises(StoreError, match=r"(?s)exited with status.*Address already in use.*--port"):
            server.start()
    assert server.pid() is None


def test_status_and_stop_from_another_process(server: RedisServer) -> None:
    script = (
        "import sys; from pathlib import Path; from streamer.redis_server import RedisServer\n"
        "s = RedisServer(Path(sys.argv[1])); print(s.status().running, s.port, s.pid()); print(s.stop())"
    )
    pid = server.pid()
    done = subprocess.run(
        [sys.executable, "-c", script, str(server.dir)], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["True", str(server.port), str(pid), "True"]
    assert not server.is_running() and server.pid() is None


def test_embedded_url_starts_the_server_of_the_vpmon_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VPMON_HOME", str(tmp_path))
    monkeypatch.setenv(rs.PORT_ENV, str(free_port()))
    url = rs.embedded_url()
    try:
        assert url == rs.embedded().url and (tmp_path / "redis" / "data").is_dir()
        assert redis.Redis.from_url(url, protocol=2).ping()
        assert rs.embedded_url() == url  # running: reused
    finally:
        assert rs.embedded().stop() is True


def test_sigkill_then_restart_keeps_every_voiceprint(server: RedisServer) -> None:
    """A crash of redis-server (SIGKILL) loses no acknowledged voiceprint with the configuration we ship
    (AOF, ``appendfsync everysec``), once the AOF buffer has reached the kernel, which Redis does before
    replying unless a slow disk postpones it (then up to 2 s later). What ``everysec`` gives up is the last
    second of writes on a power cut or kernel crash, which a test cannot produce."""
    client = server.client()
    backends = ["vset", "ft"] if HAS_SEARCH else ["vset"]
    stores = {backend: open_store(client, backend) for backend in backends}
    vectors = voice_space(160, seed=11)
    for backend, store in stores.items():
        store.put_many(make(f"crash-{backend}", i, v) for i, v in enumerate(vectors[:100]))
    # Rewrite the AOF (its base becomes an RDB snapshot), then write more after it: both parts must load.
    client.bgrewriteaof()
    wait_for(lambda: not _persistence(client)["aof_rewrite_in_progress"], "the AOF rewrite")
    for backend, store in stores.items():
        tenant = f"crash-{backend}"
        store.put_many(make(tenant, i, v) for i, v in enumerate(vectors[100:], start=100))
        store.put(make(tenant, 5, vectors[150], site="moved", display_name="Replaced"))
        assert store.delete(tenant, "spk006")
    before = {backend: store.list(f"crash-{backend}", limit=1000) for backend, store in stores.items()}
    wait_for(lambda: _persistence(client)["aof_buffer_length"] == 0, "the AOF buffer to be written")

    server.kill()
    assert not server.is_running() and server.pid() is None
    server.start()
    client = server.client()
    stores = {backend: open_store(client, backend) for backend in backends}
    wait_for(lambda: all(store.ready() for store in stores.values()), "the store to be ready")

    for backend, store in stores.items():
        tenant = f"crash-{backend}"
        after = store.list(tenant, limit=1000)
        assert len(after) == len(before[backend]) == 159 and store.count(tenant) == 159
        assert after == before[backend]  # every attribute
        for old, new in zip(before[backend], after, strict=True):
            assert np.array_equal(old.vector, new.vector)  # bit for bit
        assert store.get(tenant, "spk005").display_name == "Replaced"
        assert store.get(tenant, "spk006") is None
        hits = store.search(tenant, vectors[42], model_id=MODEL, k=3)
        assert hits[0].speaker_id == "spk042" and hits[0].score == pytest.approx(1.0, abs=1e-5)


def _persistence(client: redis.Redis) -> dict:
    return client.info("persistence")
