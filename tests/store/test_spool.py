"""Always 200: a real `dlr serve` keeps answering while PostgreSQL is away, and nothing it
answered 200 is lost, not even when it is killed during the outage.

PostgreSQL (a server of the test's own) is stopped in the middle of a burst; the server is
killed with SIGKILL while it is still stopped; then PostgreSQL starts again and a new server
on the same data directory starts: every callback that got a 200 is stored exactly once, and
forwarded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from app.store.db import make_engine
from app.store.migrate import upgrade

from ..helpers import (
    DLR,
    LocalPostgres,
    add_endpoint,
    free_port,
    make_settings,
    running_sink,
    throwaway_postgres,
)

BURST = 900
CONCURRENCY = 32
pytestmark = pytest.mark.slow  # real servers, a burst and a restart (about 20 s)


def notification(i: int) -> dict[str, str]:
    kinds = [{"type": "delivery", "status": "delivered"}, {"type": "seen"},
             {"type": "reply", "text": f"ответ {i}"}]
    return {"msg_id": f"spool-{i // 3}", **kinds[i % 3]}


def start(database_url: str, spool: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLR_")} | {
        "DLR_DATABASE_URL": database_url, "DLR_SPOOL_PATH": str(spool), "DLR_DB_TIMEOUT": "2",
        # Short attempts: what the killed server had claimed comes back when its lease (a
        # few timeouts and 10 s) has passed.
        "DLR_FORWARD_RETRY_SCHEDULE": "1,1,1,1,1", "DLR_FORWARD_TIMEOUT": "1"}
    return subprocess.Popen([DLR, "serve", "--port", str(port), "--no-access-log",
                             "--log-level", "warning"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def ready(url: str, status: str = "ready", timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while True:
            try:
                r = await c.get(f"{url}/readyz")
                if r.status_code == 200 and r.json()["status"] == status:
                    return r.json()  # type: ignore[no-any-return]
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not {status}")
            await asyncio.sleep(0.1)


async def burst(url: str, on_progress: Any) -> dict[int, str]:
    outcome: dict[int, str] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(BURST):
        queue.put_nowait(i)

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=20) as c:
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    r = await c.post(f"{url}/dlr", data=notification(i))
                    outcome[i] = str(r.status_code)
                except httpx.HTTPError as exc:
                    outcome[i] = f"dropped:{type(exc).__name__}"
                on_progress(outcome)

    await asyncio.gather(*[worker() for _ in range(CONCURRENCY)])
    return outcome


async def test_kill_9_during_an_outage_loses_nothing_answered_200(tmp_path: Path) -> None:
    """On a PostgreSQL server of the test's own, which it stops mid-burst and starts again
    (SQLite is the local disk: nothing to spool to)."""
    with throwaway_postgres() as postgres, running_sink() as sink:
        engine = make_engine(make_settings(database_url=postgres.url), pool_size=1)
        try:
            upgrade(engine)
            await outage_and_kill(postgres, engine, sink, tmp_path)
        finally:
            engine.dispose()


async def outage_and_kill(postgres: LocalPostgres, engine: Engine, sink: Any,
                          tmp_path: Path) -> None:
    spool = tmp_path / "data" / "spool.db"
    spool.parent.mkdir()
    database_url = postgres.url
    add_endpoint(engine, sink.url)
    port = free_port()
    server = start(database_url, spool, port)
    try:
        await ready(f"http://127.0.0.1:{port}")
        state: dict[str, Any] = {"cut": False, "during": 0}

        def faults(outcome: dict[int, str]) -> None:
            answered = sum(v == "200" for v in outcome.values())
            if not state["cut"] and answered >= BURST // 4:
                state["cut"] = True
                state["cut_at"] = answered
                postgres.stop()  # the server's connections end, new ones are refused
            elif state["cut"] and answered >= state["cut_at"] + BURST // 3 \
                    and server.poll() is None:
                server.send_signal(signal.SIGKILL)  # with callbacks in the spool

        outcome = await burst(f"http://127.0.0.1:{port}", faults)
        server.wait()
        assert server.returncode == -signal.SIGKILL
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    answered = [i for i, v in outcome.items() if v == "200"]
    refused = [v for v in outcome.values() if v not in ("200",)]
    # Up to the kill every callback was answered 200, PostgreSQL or not.
    assert len(answered) >= state["cut_at"] + BURST // 3
    assert all(v.startswith("dropped:") for v in refused), Counter(refused)
    assert spool.exists()

    postgres.start()
    engine.dispose()  # its connections ended with the server
    port = free_port()
    server = start(database_url, spool, port)
    try:
        await ready(f"http://127.0.0.1:{port}")  # drained (ready, not "spooling")
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT msg_key, type, count(*) FROM events WHERE msg_key LIKE 'spool-%' "
                "GROUP BY msg_key, type")).all()
        stored = {(m, t): n for m, t, n in rows}
        lost = [i for i in answered if (notification(i)["msg_id"],
                                        notification(i)["type"]) not in stored]
        assert lost == [], f"{len(lost)} callbacks answered 200 were lost"
        assert set(stored.values()) == {1}  # none twice
        # Forwarded: every stored change reached the endpoint, each once.
        with engine.connect() as conn:
            changes = conn.execute(text(
                "SELECT count(*) FROM outbound_events WHERE msg_key LIKE 'spool-%'"
            )).scalar()
        assert changes and changes >= len({notification(i)["msg_id"] for i in answered})
        # At least once: a webhook the killed server had sent but not recorded may come
        # again (the same webhook-id); every change must arrive.
        deadline = time.monotonic() + 120
        while True:
            ids = {r.webhook_id for r in sink.requests() if b'"spool-' in r.body}
            if len(ids) >= changes or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert len(ids) == changes
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
