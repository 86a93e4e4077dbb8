"""A database that cannot commit: on PostgreSQL the callbacks are kept in the local spool and
answered 200, on SQLite (or with no spool to write) 503 so the provider re-sends; never a 200
for what is not on disk; then recovery."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.core.notifications import interpret
from app.main import create_app
from app.store.db import make_engine
from app.store.migrate import upgrade
from app.store.spool import Spool

from ..helpers import (
    AppFactory,
    TcpCutter,
    client_for,
    dlr,
    events,
    make_settings,
    sqlite_write_lock,
    wipe,
)


@pytest.fixture
def outage(settings: Settings, backend: str) -> Iterator[tuple[dict, AbstractContextManager]]:  # type: ignore[type-arg]
    """Settings for an app whose database we can take away, and the way to take it away."""
    if backend == "sqlite":
        path = make_url(settings.database_url).database
        assert path
        yield {"db_timeout": 0.2}, sqlite_write_lock(path)
        return
    url = make_url(settings.database_url)
    cutter = TcpCutter((url.host or "127.0.0.1", url.port or 5432))

    @contextmanager
    def down() -> Iterator[None]:
        cutter.cut()
        try:
            yield
        finally:
            cutter.restore()

    proxied = url.set(port=cutter.port).render_as_string(hide_password=False)
    try:
        yield {"database_url": proxied.replace("+psycopg", ""), "db_timeout": 1}, down()
    finally:
        cutter.close()


@pytest.mark.slow  # waits out the database timeout 60 times (over 1 s on PostgreSQL)
async def test_sqlite_locked_gives_503_and_recovery_needs_no_restart(
    app_with: AppFactory, engine: Engine, backend: str, outage: tuple  # type: ignore[type-arg]
) -> None:
    """SQLite is the local disk: nothing to spool to. A write lock held elsewhere is a 503
    (the provider re-sends), and the same process stores the re-sends."""
    if backend != "sqlite":
        pytest.skip("PostgreSQL spools instead: test_postgresql_away_spools_and_drains")
    overrides, down = outage
    app = await app_with(**overrides)
    async with client_for(app) as c:
        assert (await dlr(c, type="seen", msg_id="before")).status_code == 200
        with down:
            answers = await asyncio.gather(*[
                dlr(c, type="delivery", msg_id=f"during{i}", status="delivered")
                for i in range(30)
            ])
            assert {r.status_code for r in answers} == {503}
            assert answers[0].json()["detail"].startswith("database unavailable")
            assert answers[0].headers["retry-after"]
            assert (await c.get("/healthz")).status_code == 200
        # The provider re-sends what was not acknowledged; the same process now stores it.
        resent = await asyncio.gather(*[
            dlr(c, type="delivery", msg_id=f"during{i}", status="delivered") for i in range(30)
        ])
        assert {r.status_code for r in resent} == {200}
        assert (await c.get("/readyz")).status_code == 200
    assert events(engine) == 31  # exactly what was acknowledged: nothing more, nothing less


def relayed(database_url: str) -> tuple[TcpCutter, str]:
    """A cuttable relay in front of the test's PostgreSQL, and the URL that goes through it."""
    url = make_url(database_url)
    cutter = TcpCutter((url.host or "127.0.0.1", url.port or 5432))
    return cutter, url.set(port=cutter.port).render_as_string(hide_password=False)


async def eventually(check: Any, timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("child", [True, False], ids=["writer-process", "writer-thread"])
async def test_postgresql_away_spools_and_drains(
    app_with: AppFactory, engine: Engine, settings: Settings, backend: str, tmp_path: Path,
    child: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    """While PostgreSQL is unreachable every callback is kept in the local spool (on disk)
    and answered 200; the probes and reads say so; once it is back the spool drains through
    the normal write path, exactly once, and new callbacks go on being answered."""
    if backend != "postgresql":
        pytest.skip("SQLite is the local disk: nothing to spool to (the test above)")
    cutter, proxied = relayed(settings.database_url)
    spool = tmp_path / "spool.db"
    try:
        app = await app_with(database_url=proxied, db_timeout=1, spool_path=str(spool),
                             writer_process=child)
        async with client_for(app) as c:
            assert (await dlr(c, type="seen", msg_id="before")).status_code == 200
            cutter.cut()
            with caplog.at_level(logging.INFO, logger="app.store.spool"):
                answers = await asyncio.gather(*[
                    dlr(c, type="delivery", msg_id=f"during{i}", status="delivered")
                    for i in range(30)])
                assert {r.status_code for r in answers} == {200}
                assert spool.exists()
                # The provider's resend of one of them (answered 200 all the same).
                assert (await dlr(c, type="delivery", msg_id="during0",
                                  status="delivered")).status_code == 200
                ready = (await c.get("/readyz")).json()
                assert ready["status"] == "spooling" and ready["database"] == "unreachable"
                assert ready["spool_depth"] == 31
                assert (await c.get("/healthz")).status_code == 200
                read = await c.get("/api/v1/messages", params={"limit": 1})
                assert read.status_code == 503 and "spool" in read.json()["detail"]
                metrics = (await c.get("/metrics")).text
                assert "dlr_spool_depth 31.0" in metrics
                cutter.restore()
                # New callbacks keep being answered while the spool drains.
                late = await dlr(c, type="seen", msg_id="during5")
                assert late.status_code == 200

                async def drained() -> bool:
                    r = await c.get("/readyz")
                    return r.status_code == 200 and r.json()["status"] == "ready"

                assert await eventually(drained)
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                        and "spool" in r.getMessage()]
            assert len(warnings) == 1  # one WARNING when spooling starts ...
            drained_lines = [r for r in caplog.records if "spool drained" in r.getMessage()]
            assert len(drained_lines) == 1  # ... and one INFO when it is empty again
            m5 = (await c.get("/api/v1/messages/during5")).json()
            assert m5["status"] == "seen"  # the late seen after its spooled delivery
            drained_total = [float(line.split()[1]) for line in (await c.get("/metrics")).text
                             .splitlines() if line.startswith("dlr_spool_drained_total ")]
            assert drained_total and drained_total[0] >= 31
        assert events(engine) == 32  # before, 30 distinct during, the late seen: once each
    finally:
        cutter.close()


async def test_a_spool_that_cannot_be_written_is_a_503(
        app_with: AppFactory, engine: Engine, settings: Settings, backend: str,
        tmp_path: Path) -> None:
    """A 200 always means the callback is on disk: a spool in a missing directory, or one
    over DLR_SPOOL_MAX_BYTES, answers 503 (the provider re-sends)."""
    if backend != "postgresql":
        pytest.skip("SQLite is the local disk: nothing to spool to")
    cutter, proxied = relayed(settings.database_url)
    full = tmp_path / "full.db"
    with sqlite3.connect(full) as db:  # a spool already over its limit of 1 MiB
        db.execute("CREATE TABLE spool (id INTEGER PRIMARY KEY, items BLOB NOT NULL, "
                   "n INTEGER NOT NULL, at REAL NOT NULL)")
        db.execute("INSERT INTO spool (items, n, at) VALUES (zeroblob(2000000), 0, 0)")
    try:
        for spool in (tmp_path / "missing" / "spool.db", full):
            app = await app_with(database_url=proxied, db_timeout=1, spool_path=str(spool),
                                 spool_max_bytes=1024 * 1024, writer_process=False)
            async with client_for(app) as c:
                cutter.cut()
                r = await dlr(c, type="delivery", msg_id="x1", status="delivered")
                assert r.status_code == 503 and r.headers["retry-after"], spool
                cutter.restore()
    finally:
        cutter.close()


async def test_writer_connection_killed_while_idle_costs_no_callback(pg_url: str) -> None:
    """The writers keep their connections between batches. One that the server ended while
    idle (a restart, an administrator, a dropped link) is replaced at once: the provider's
    next callback is stored and answered 200, not refused."""
    settings = make_settings(database_url=pg_url)
    engine = make_engine(settings, pool_size=1)
    upgrade(engine)
    wipe(engine)
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app), client_for(app) as c:
            assert (await dlr(c, type="delivery", msg_id="m1", status="delivered")
                    ).status_code == 200
            with engine.connect() as conn:
                killed = conn.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
            assert killed
            answers = await asyncio.gather(*[
                dlr(c, type="delivery", msg_id=f"m{i}", status="delivered") for i in range(2, 12)
            ])
            assert {r.status_code for r in answers} == {200}
        assert events(engine) == 11
    finally:
        engine.dispose()


def test_a_drain_chunk_spans_many_small_batches_and_is_forgotten_at_once(
        tmp_path: Path) -> None:
    """At a steady rate the Ingestor spools batches of one: a drain still takes a full chunk
    of them (not a few hundred callbacks a transaction), oldest first, and what it forgets is
    gone from the file, while the rest is kept for the next start."""
    path = tmp_path / "spool.db"
    spool = Spool(str(path), 1 << 30)
    now = datetime.now(UTC)
    for i in range(30):
        spool.put([interpret({"type": "seen", "msg_id": f"one-{i}"}, received_at=now)])
    spool.put([interpret({"type": "seen", "msg_id": f"big-{i}"}, received_at=now)
               for i in range(5)])
    chunk = spool.oldest(12)
    taken = [item.msg_id for _, batch in chunk for item in batch]  # type: ignore[union-attr]
    assert taken == [f"one-{i}" for i in range(12)]
    spool.remove(chunk[-1][0], len(taken))
    spool.close()
    again = Spool(str(path), 1 << 30)
    assert again.depth() == 23
    rest = [item.msg_id for _, batch in again.oldest(100)  # type: ignore[union-attr]
            for item in batch]
    assert rest == [f"one-{i}" for i in range(12, 30)] + [f"big-{i}" for i in range(5)]
    assert [len(b) for _, b in again.oldest(20)] == [1] * 18  # a batch is never split
    again.close()
