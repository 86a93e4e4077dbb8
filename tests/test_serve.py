"""The real server, started with `dlr serve` exactly as the README says."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import Engine

from app.config import Settings

from .helpers import UUID_B, events
from .server import running_server


def test_serve_migrates_a_new_sqlite_file_and_answers(tmp_path: Path) -> None:
    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    with running_server(env) as (url, proc):
        r = httpx.get(f"{url}/dlr", params={"type": "delivery", "msg_id": UUID_B.upper(),
                                            "status": "delivered"})
        assert (r.status_code, r.text) == (200, "OK")
        m = httpx.get(f"{url}/api/v1/messages/{UUID_B}").json()
        assert (m["msg_id"], m["status"]) == (UUID_B.upper(), "delivered")
        assert httpx.get(f"{url}/readyz").status_code == 200
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises SIGTERM so supervisors see the cause.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert (tmp_path / "fresh.db").exists()


def test_forwarded_for_is_not_believed_from_loopback(tmp_path: Path) -> None:
    # uvicorn trusts X-Forwarded-For from loopback by default; the service must not.
    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'xff.db'}",
           "DLR_CALLBACK_ALLOWED_IPS": "203.0.113.0/24"}
    with running_server(env) as (url, _):
        r = httpx.get(f"{url}/dlr", params={"type": "seen", "msg_id": "x"},
                      headers={"X-Forwarded-For": "203.0.113.5"})
        assert r.status_code == 403


def test_two_workers_share_the_database(settings: Settings, engine: Engine) -> None:
    with running_server({"DLR_DATABASE_URL": settings.database_url}, "--workers", "2") as (
        url, _
    ):
        with httpx.Client(base_url=url) as c, ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(
                lambda i: c.post("/dlr", data={"type": "delivery", "msg_id": f"w{i % 150}",
                                               "status": "delivered"}).status_code,
                range(300)))
    assert set(answers) == {200}
    assert events(engine) == 150


def test_slow_request_heads_are_cut_off(tmp_path: Path) -> None:
    import socket
    import time

    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'slow.db'}",
           "DLR_CALLBACK_READ_TIMEOUT": "0.5"}
    with running_server(env) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as idle, \
                socket.create_connection((host, int(port))) as slow:
            slow.sendall(b"POST /dlr HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            idle.settimeout(5)
            slow.settimeout(5)
            started = time.monotonic()
            assert slow.recv(1024) == b""  # closed by the server
            assert idle.recv(1024) == b""
            assert time.monotonic() - started < 4
        # Ordinary requests are not affected.
        assert httpx.get(f"{url}/dlr", params={"type": "seen", "msg_id": "s"}).status_code == 200
