"""A websocket call that goes silent is closed after ``ws_idle_seconds``; one that keeps sending, however
slowly, is not (the gateway re-arms one timer from the last message, streamer/gateway.py IdleWatch).
Real server, real Redis, real websocket clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import connect

from streamer.auth import Role
from streamer.redis_server import RedisServer
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon

IDLE_SECONDS = 3
SILENT_FRAME = bytes(320)  # 20 ms of 8 kHz PCM16


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer) -> Iterator[RunningServer]:
    server = start_vpmon(tmp_path_factory.mktemp("idle"), api_redis, ws_idle_seconds=IDLE_SECONDS)
    try:
        yield server
    finally:
        stop_vpmon(server)


async def call(
    server: RunningServer, key: str, call_id: str, gaps: list[float]
) -> websockets.frames.Close | None:
    """Start a call (no agent yet: it waits for one), then one frame after each gap, then wait for the close
    (the server's, or ours after a normal stop)."""
    url = server.url.replace("http://", "ws://") + "/v1/streams/native"
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        await ws.send(
            json.dumps(
                {"type": "start", "call_id": call_id, "encoding": "pcm16", "sample_rate": 8000, "channels": 1}
            )
        )
        try:
            for gap in gaps:
                await asyncio.sleep(gap)
                await ws.send(SILENT_FRAME)
            if gaps:
                await ws.send(json.dumps({"type": "stop"}))
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass
        return ws.protocol.close_rcvd


def test_a_silent_call_is_closed_and_a_slow_one_is_not(idle_server: RunningServer, tmp_path: Path) -> None:
    key = idle_server.key("idle-tenant", Role.MONITOR)

    async def both() -> tuple[websockets.frames.Close | None, websockets.frames.Close | None]:
        # 14 frames 0.5 s apart: 7 s of call, more than twice the idle limit, never silent for 3 s.
        return await asyncio.gather(
            call(idle_server, key, "silent", []), call(idle_server, key, "slow", [0.5] * 14)
        )

    silent, slow = asyncio.run(both())
    assert silent is not None and silent.code == 1008
    assert silent.reason == f"no message for {IDLE_SECONDS} s"
    assert slow is not None and slow.code == 1000, slow
