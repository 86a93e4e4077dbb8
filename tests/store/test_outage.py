"""A database that cannot commit: 503 (so the provider re-sends), never 200; then recovery."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.main import create_app
from app.store.db import make_engine
from app.store.migrate import upgrade

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
async def test_database_away_gives_503_and_recovery_needs_no_restart(
    app_with: AppFactory, engine: Engine, backend: str, outage: tuple  # type: ignore[type-arg]
) -> None:
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
            if backend == "postgresql":  # SQLite readers still work while a writer is stuck
                assert (await c.get("/readyz")).status_code == 503
            assert (await c.get("/healthz")).status_code == 200
        # The provider re-sends what was not acknowledged; the same process now stores it.
        resent = await asyncio.gather(*[
            dlr(c, type="delivery", msg_id=f"during{i}", status="delivered") for i in range(30)
        ])
        assert {r.status_code for r in resent} == {200}
        assert (await c.get("/readyz")).status_code == 200
    assert events(engine) == 31  # exactly what was acknowledged: nothing more, nothing less


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
