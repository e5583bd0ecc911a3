"""A real webhook receiver for the tests: a stdlib HTTP server on a loopback port, in a thread, that
verifies each delivery's signature with ``streamer.webhook_verify`` (as a customer's receiver would),
keeps every request, and fails some deliveries on purpose.

Paths decide the behaviour:

- ``/hooks``: the n-th distinct webhook id to arrive fails its first request with ``first_failures[n]``
  (``500``, ``timeout``: answer only after the sender has given up, ``drop``: close the connection
  without an answer); every other request is answered 204;
- ``/always-fail``: 500, always; ``/gone``: 410, always;
- ``/hang``: the first request of each id is held until ``release_hang`` is set (to stop a gateway
  mid-delivery), then answered 204 to nobody; later requests 204.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from streamer.webhook_verify import WebhookVerificationError, verify


@dataclass(frozen=True)
class Request:
    path: str
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    verified: str  # "ok", or why the signature check failed
    answer: str  # what the receiver did: an HTTP status, "timeout" or "drop"


@dataclass
class Receiver:
    first_failures: list[str] = field(default_factory=list)
    slow_seconds: float = 3.0  # for "timeout": longer than the sender's timeout
    secrets: dict[str, str] = field(default_factory=dict)  # path → the endpoint's signing secret
    requests: list[Request] = field(default_factory=list)
    hanging: threading.Event = field(default_factory=threading.Event)
    release_hang: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def ids(self, path: str) -> set[str]:
        return {r.webhook_id for r in self.on(path)}

    def answered_2xx(self, path: str) -> set[str]:
        """The ids whose delivery was answered in time with a 2xx (as the sender saw it)."""
        return {r.webhook_id for r in self.on(path) if r.answer == "204"}

    def _answer(self, path: str, webhook_id: str) -> str:
        with self.lock:
            earlier = [r for r in self.requests if r.path == path]
            order = list(dict.fromkeys(r.webhook_id for r in earlier))
        first = webhook_id not in order
        if path == "/hooks":
            n = len(order)
            return self.first_failures[n] if first and n < len(self.first_failures) else "204"
        if path == "/always-fail":
            return "500"
        if path == "/gone":
            return "410"
        if path == "/hang":
            return "hang" if first else "204"
        return "404"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {name.lower(): value for name, value in self.headers.items()}
                webhook_id = headers.get("webhook-id", "")
                answer = receiver._answer(self.path, webhook_id)
                try:
                    verify(receiver.secrets.get(self.path, "whsec_AA=="), headers, body)
                    verified = "ok"
                except (WebhookVerificationError, ValueError) as exc:
                    verified = str(exc)
                with receiver.lock:
                    receiver.requests.append(Request(self.path, webhook_id, headers, body, verified, answer))
                if answer == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if answer == "timeout":
                    threading.Event().wait(receiver.slow_seconds)
                if answer == "hang":
                    receiver.hanging.set()
                    receiver.release_hang.wait(120)
                status = 204 if answer in ("timeout", "hang") else int(answer)
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up already

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def finish(self) -> None:
                with contextlib.suppress(OSError):  # after a dropped connection
                    super().finish()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.release_hang.set()
            self.server.shutdown()
            self.server.server_close()
