"""A real Redis for the tests: the embedded redis-server (with RediSearch where the wheel exists), started
once per test session on a free loopback port in a temporary directory, and stopped at the end.

Load it with ``pytest_plugins = ["tests.redis_fixtures"]`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamer.redis_server import RedisServer, search_module_path
from verifier.errors import StoreError


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(directory: Path, with_search: bool | None = None) -> RedisServer:
    """Start a server on a free port; another process may take the port between our check and redis'
    bind, so try a few ports before giving up."""
    error: StoreError | None = None
    for _ in range(3):
        server = RedisServer(directory, port=free_port(), with_search=with_search)
        try:
            server.start()
            return server
        except StoreError as exc:
            error = exc
    raise AssertionError(f"could not start the test Redis: {error}")


HAS_SEARCH = search_module_path() is not None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_server(tmp_path_factory.mktemp("redis"), with_search=HAS_SEARCH)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A RESP2 client on an empty database (flushed before each test, search indexes included)."""
    client = redis_server.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_to_kill(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own: the test may kill and restart it, so no other test shares it."""
    server = start_server(tmp_path / "redis", with_search=False)
    try:
        yield server
    finally:
        if server.pid() is not None:
            server.stop()
