"""uvicorn's websockets (sans-I/O) protocol with one ASGI extension: ``vpmon.direct_receive``.

Through ASGI, every websocket message is a dict put on the connection's queue, then a task wake-up and a
walk back up the app's coroutines (``receive`` → Starlette → uvicorn → ``asyncio.Queue.get``): for a 20 ms
audio frame, a large share of the event loop's work (README, "Live calls under load"). With the extension,
the app may register a synchronous receiver for the connection; each complete message is offered to it as it
is parsed (in ``data_received``), while nothing is waiting in the queue ahead of it. The receiver handles
the message and returns None, or returns a message for the app's ``receive`` to take as usual (the same
message, if it cannot take it now, or one of its own). Messages stay in order: a message is offered only
while the queue is empty, and the receiver itself declines while the app is busy with an earlier one.

``streamer/gateway.py`` registers a receiver for a live call's audio frames. Servers without the
extension (another ASGI server, uvicorn's own protocol classes) serve the same app without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

EXTENSION = "vpmon.direct_receive"

Message = dict[str, Any]
Receiver = Callable[[Message], Message | None]


class _OfferingQueue(asyncio.Queue[Message]):
    """The connection's ASGI receive queue: a received message is first offered to the receiver."""

    def __init__(self) -> None:
        super().__init__()
        self.receiver: Receiver | None = None

    def set_receiver(self, receiver: Receiver | None) -> None:
        self.receiver = receiver

    def put_nowait(self, item: Message) -> None:
        if self.receiver is not None and item["type"] == "websocket.receive" and self.empty():
            remaining = self.receiver(item)
            if remaining is None:
                return
            item = remaining
        super().put_nowait(item)


class DirectReceiveProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _OfferingQueue()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            scope["extensions"][EXTENSION] = self.queue.set_receiver

    def send_receive_event_to_app(self) -> None:
        super().send_receive_event_to_app()
        # uvicorn stops reading until the app takes the message it queued; a message the receiver
        # took leaves nothing to take, so reading goes on at once.
        if self.read_paused and self.queue.empty() and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()
