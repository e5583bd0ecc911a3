"""streamer/ws_protocol.py on a real uvicorn server and a real websocket client: messages a receiver takes
as they arrive and messages the app's ``receive`` takes stay in one order, and reading never stalls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from websockets.sync.client import connect

from streamer.ws_protocol import EXTENSION, DirectReceiveProtocol
from tests.redis_fixtures import free_port

MESSAGES = 300


class OrderingApp:
    """Takes ``direct:`` messages in the receiver while idle in ``receive``; other messages (and all while
    busy) go through ``receive``, whose handling awaits, as a real handler's does. Records one order."""

    def __init__(self, with_receiver: bool = True) -> None:
        self.with_receiver = with_receiver
        self.seen: list[tuple[str, str]] = []  # (path, text)
        self.idle = False

    def receiver(self, message: dict[str, Any]) -> dict[str, Any] | None:
        if not self.idle or not message.get("text", "").startswith("direct:"):
            return message
        self.seen.append(("receiver", message["text"]))
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        if self.with_receiver:
            scope["extensions"][EXTENSION](self.receiver)
        while True:
            self.idle = True
            message = await receive()
            self.idle = False
            if message["type"] == "websocket.disconnect":
                return
            if message["text"].startswith("queued:"):
                await asyncio.sleep(0.003)  # busy: the messages arriving meanwhile must wait for us
            self.seen.append(("receive", message["text"]))
            if message["text"] == "end":
                await send({"type": "websocket.send", "text": str(len(self.seen))})


@pytest.fixture
def serve() -> Iterator[Any]:
    servers = []

    def start(app: OrderingApp) -> str:
        port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, ws=DirectReceiveProtocol, log_level="warning"
        )
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        servers.append(server)
        return f"ws://127.0.0.1:{port}/"

    yield start
    for server in servers:
        server.should_exit = True


def play(url: str, texts: list[str]) -> int:
    with connect(url) as socket:
        for text in texts:
            socket.send(text)
            time.sleep(0.001)  # a stream, not one burst
        socket.send("end")
        return int(socket.recv(timeout=30))


def test_the_receiver_takes_messages_in_order_with_the_apps_receive(serve: Any) -> None:
    app = OrderingApp()
    # every fifth message goes through receive (the app is then busy for a while), the rest may go direct
    texts = [f"queued:{i}" if i % 5 == 0 else f"direct:{i}" for i in range(MESSAGES)]
    assert play(serve(app), texts) == MESSAGES + 1
    assert [text for _, text in app.seen] == [*texts, "end"]
    paths = {path for path, _ in app.seen}
    assert paths == {"receiver", "receive"}  # both paths were taken
    assert sum(path == "receiver" for path, _ in app.seen) > MESSAGES // 2


def test_reading_goes_on_when_every_message_is_taken_directly(serve: Any) -> None:
    app = OrderingApp()
    texts = [f"direct:{i}" for i in range(MESSAGES)]
    assert play(serve(app), texts) == MESSAGES + 1  # no stall: the answer to "end" came back
    assert [text for _, text in app.seen] == [*texts, "end"]


def test_without_a_receiver_it_is_uvicorns_protocol(serve: Any) -> None:
    app = OrderingApp(with_receiver=False)
    texts = [f"direct:{i}" for i in range(50)]
    assert play(serve(app), texts) == 51
    assert {path for path, _ in app.seen} == {"receive"}
    assert [text for _, text in app.seen] == [*texts, "end"]
