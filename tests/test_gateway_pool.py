"""Many calls at once through a small Redis connection pool: the gateway's commands wait for a free
connection instead of failing the call (the pool used to raise MaxConnectionsError when ~200 calls
started together, and the websocket then got no close at all)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.auth import Role
from streamer.redis_server import RedisServer
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, native_call, speech

POOL = 2
CALLS = 40


@pytest.fixture(scope="module")
def small_pool_server(
    tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer
) -> Iterator[RunningServer]:
    server = start_vpmon(tmp_path_factory.mktemp("vpmon-pool"), api_redis, redis_max_connections=POOL)
    try:
        yield server
    finally:
        stop_vpmon(server)


def test_calls_beyond_the_redis_pool_wait_instead_of_failing(
    small_pool_server: RunningServer, telephone_devset: Path
) -> None:
    server = small_pool_server
    with server.client(server.key("pool")) as client:
        paths = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        response = client.post("/v1/voiceprints", data={"speaker_id": "agent-ca"}, files=files)
        assert response.status_code == 201, response.text
    monitor = server.key("pool", Role.MONITOR)
    audio = speech(telephone_devset, "tuxpaint_ca", ENROL, ENROL + 2)

    async def all_at_once() -> list:
        return await asyncio.gather(*(native_call(server, monitor, f"pool-{i}", audio) for i in range(CALLS)))

    results = asyncio.run(all_at_once())
    closes = [close.code if close is not None else None for _, close in results]
    assert closes == [1000] * CALLS, server.log_tail()
    for frames, _ in results:
        assert frames[0]["type"] == "started"
        assert any(f["type"] == "verdict" and f["state"] != "warming_up" for f in frames)
    assert "Redis unavailable" not in server.log.read_text()
