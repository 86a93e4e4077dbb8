"""Forwarding's test support: a webhook receiver (a threaded http.server on loopback that
records every request and answers as the test tells it to), and events as ingest makes them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine, Row
from standardwebhooks.webhooks import Webhook

from app.config import Settings
from app.forwarding import endpoints
from app.forwarding.api import router
from app.forwarding.events import ForwardEvent, enqueue

from .server import free_port


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    started: float   # monotonic, when the request arrived
    finished: float  # monotonic, when the answer was written

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Sink:
    """`answer(request_number, headers, body) -> status`; `hang` makes every request wait
    until the sink stops or `release()` is called."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[Received] = []
        self.answer: Callable[[int, dict[str, str], bytes], int] = lambda n, h, b: 200
        self.delay = 0.0
        self.hang = False
        self.arrived = 0  # requests that reached the handler, answered or not
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                started = time.monotonic()
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with sink._lock:
                    sink.arrived += 1
                if sink.hang:
                    sink._released.wait(60)
                if sink.delay:
                    time.sleep(sink.delay)
                with sink._lock:
                    number = len(sink.received)
                    code = sink.answer(number, headers, body)
                try:
                    self.send_response(code)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    return
                with sink._lock:
                    sink.received.append(Received(headers, body, started, time.monotonic()))

            def log_message(self, *args: object) -> None:
                pass

        self._released.clear()
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def release(self) -> None:
        self.hang = False
        self._released.set()

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(self, count: int, timeout: float = 15.0,
                 where: Callable[[Received], bool] = lambda r: True) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.requests() if where(r)]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.02)


@contextmanager
def running_sink(port: int | None = None) -> Iterator[Sink]:
    sink = Sink(port)
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


def verified(request: Received, secret: str) -> object:
    """The payload, verified with the Standard Webhooks library (raises if it does not)."""
    return Webhook(secret).verify(request.body, request.headers)


def status_event(msg_id: str, status: str, *, sequence: int = 1, ptid: str | None = "camp-1",
                 previous: str | None = "accepted", at: datetime | None = None,
                 ) -> ForwardEvent:
    """A message.status event as the write path builds it."""
    at = at or datetime.now(UTC)
    stamp = at.isoformat().replace("+00:00", "Z")
    return ForwardEvent(
        type="message.status", msg_key=msg_id.lower(), p_transaction_id=ptid, sequence=sequence,
        data={"msg_id": msg_id, "p_transaction_id": ptid, "phone": "380501234567",
              "sender": "Shop", "kind": "text", "status": status, "status_extended": None,
              "sent_at": None, "delivered_at": stamp if status == "delivered" else None,
              "seen_at": None, "created_at": stamp, "updated_at": stamp,
              "previous_status": previous, "sequence": sequence},
        occurred_at=at)


def emit(engine: Engine, events: list[ForwardEvent]) -> int:
    """Commit events the way the write path does (inside its own transaction)."""
    with engine.begin() as conn:
        return enqueue(conn, events)


def add_endpoint(engine: Engine, url: str, **values: Any) -> Row[Any]:
    with engine.begin() as conn:
        return endpoints.create(conn, url=url, **values)


def forward_app(settings: Settings, engine: Engine) -> FastAPI:
    """A bare app with forwarding's routes (the real one includes them beside the rest)."""
    app = FastAPI()
    app.state.settings = settings
    app.state.engine = engine
    app.include_router(router)
    return app
