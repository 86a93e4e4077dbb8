"""One front door: every route, hot ones included, goes through the app's router, middleware,
access rule and error handlers; provider calls never hold up the reads."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.main import create_app
from app.send import SendRequest
from app.store import write as ingest
from app.store.db import Database
from app.store.migrate import upgrade
from app.store.models import Message
from app.web.security import require_api_access

from ..helpers import (
    AppFactory,
    client_for,
    dlr,
    make_settings,
    record_send,
    serving_in_thread,
    wipe,
)


class Recorder:
    """A middleware a user might add (tracing, metrics): it records every path it sees."""

    seen: list[str] = []

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            Recorder.seen.append(scope["path"])
        await self.app(scope, receive, send)


async def test_a_middleware_added_to_the_app_sees_the_hot_routes(
    settings: Settings, engine: Engine
) -> None:
    app = create_app(settings)
    app.add_middleware(Recorder)
    Recorder.seen = []
    async with app.router.lifespan_context(app), client_for(app) as c:
        assert (await dlr(c, type="seen", msg_id="m1")).status_code == 200
        assert (await c.get("/api/v1/messages/m1")).status_code == 200
        assert (await c.get("/api/v1/stats")).status_code == 200
    assert Recorder.seen == ["/dlr", "/api/v1/messages/m1", "/api/v1/stats"]


async def test_overriding_the_access_rule_changes_every_api_route(app: FastAPI) -> None:
    async with client_for(app, peer="203.0.113.9") as outsider:
        await dlr(outsider, type="seen", msg_id="m1")
        paths = ["/api/v1/messages/m1", "/api/v1/messages", "/api/v1/stats",
                 "/api/v1/replies", "/api/v1/rejected"]
        assert {(await outsider.get(p)).status_code for p in paths} == {403}

        async def open_to_all() -> None:
            return None

        app.dependency_overrides[require_api_access] = open_to_all
        try:
            assert {(await outsider.get(p)).status_code for p in paths} == {200}
        finally:
            app.dependency_overrides.clear()
        assert (await outsider.get("/api/v1/messages/m1")).status_code == 403


@pytest.mark.parametrize(("path", "target", "attribute"), [
    ("/dlr?type=seen&msg_id=m1", "app.receive.callbacks", "interpret"),
    ("/api/v1/messages/m1", "app.store.db.Database", "read_rows"),
    ("/api/v1/messages", "app.store.db.Database", "read_rows"),
    ("/api/v1/stats", "app.store.db.Database", "session"),
])
async def test_an_unexpected_error_is_the_same_json_500_everywhere(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    path: str, target: str, attribute: str,
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(f"{target}.{attribute}", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False,
                                    client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        r = await c.get(path)
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": "internal error"}
    assert "a bug" not in r.text  # never a stack trace


async def test_a_msg_id_with_a_slash_can_be_looked_up(client: httpx.AsyncClient) -> None:
    assert (await dlr(client, type="seen", msg_id="a/b")).status_code == 200
    r = await client.get("/api/v1/messages/a%2Fb")
    assert r.status_code == 200
    assert r.json()["msg_id"] == "a/b"


async def test_sends_hanging_on_the_provider_leave_reads_answering(
    app_with: AppFactory, silent_provider: str,
) -> None:
    url = silent_provider
    app = await app_with(bulk_url=url, bulk_user="u", bulk_secret_key="k", bulk_from="Shop",
                         send_timeout=60, send_max_retries=0)
    async with client_for(app) as c:
        sends = [asyncio.create_task(c.post("/api/v1/messages", json={
            "phone": [f"7903123456{i}"], "txt": "hi"})) for i in range(8)]
        await asyncio.sleep(0.3)  # all eight are now waiting on the provider
        for path in ("/readyz", "/api/v1/stats"):
            # A guard against hanging forever, not a measurement: a blocked read thread
            # would wait for the 60 s send timeout.
            r = await asyncio.wait_for(c.get(path), timeout=10)
            assert r.status_code == 200
        assert not any(s.done() for s in sends)  # the reads did not wait for them
        for s in sends:
            s.cancel()
        await asyncio.gather(*sends, return_exceptions=True)


async def test_an_accepted_send_is_recorded_when_the_database_fails_at_first(
    app_with: AppFactory, engine: Engine, monkeypatch: pytest.MonkeyPatch, backend: str,
) -> None:
    """The provider accepted: its msg_ids exist nowhere else. A database fault between its
    answer and the commit is retried through the write path until the record is stored (on
    PostgreSQL the record waits in the spool meanwhile, and is stored when it drains)."""
    from app.simulator.provider import ProviderSimulator

    sim = ProviderSimulator(user="u", secret_key="k")
    real = ingest._store_send
    failures = {"left": 2}

    def flaky(conn: Any, record: ingest.SendRecord) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("INSERT INTO sends", {}, Exception("connection lost"))
        real(conn, record)

    monkeypatch.setattr(ingest, "_store_send", flaky)
    monkeypatch.setattr("app.send.RECORD_BACKOFF", 0.01)
    with serving_in_thread(sim.app()) as sim_url:
        # The fault is patched into this process's write path: the writer runs here.
        app = await app_with(bulk_url=sim_url + "/", bulk_user="u", bulk_secret_key="k",
                             bulk_from="Shop", writer_process=False)
        sender = app.state.sender
        result = await sender.send(SendRequest(phone=["79031234567"], txt="hi"))
        msg_id = result.msg_ids["79031234567"]

        def recorded() -> Any:
            with engine.connect() as conn:
                return conn.execute(select(Message.status, Message.phone, Message.send_id)
                                    .where(Message.msg_id == msg_id)).first()

        deadline = asyncio.get_running_loop().time() + 10
        while (row := recorded()) is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
    assert result.outcome == "accepted" and failures["left"] == 0
    assert row is not None and (row.status, row.phone) == ("accepted", "79031234567")
    if backend == "sqlite":  # stored by the sender's own retries, before it answered
        assert row.send_id == result.send_id
    else:  # kept in the spool first: stored (with its send record) when it drained
        assert row.send_id is not None and result.send_id is None


async def test_msg_ids_are_logged_when_a_send_cannot_be_recorded(
    app_with: AppFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    backend: str,
) -> None:
    """A record that cannot be stored however often it is tried: its msg_ids are logged (on
    SQLite), or kept on disk in the spool until the database takes it (PostgreSQL)."""
    from app.simulator.provider import ProviderSimulator

    def down(_conn: Any, _record: ingest.SendRecord) -> None:
        raise OperationalError("INSERT INTO sends", {}, Exception("database is down"))

    monkeypatch.setattr(ingest, "_store_send", down)
    monkeypatch.setattr("app.send.RECORD_BACKOFF", 0.001)
    sim = ProviderSimulator(user="u", secret_key="k")
    with serving_in_thread(sim.app()) as sim_url:
        # The fault is patched into this process's write path: the writer runs here.
        app = await app_with(bulk_url=sim_url + "/", bulk_user="u", bulk_secret_key="k",
                             bulk_from="Shop", writer_process=False)
        async with client_for(app) as c:
            with caplog.at_level(logging.ERROR, logger="app.send"):
                r = await c.post("/api/v1/messages", json={"phone": ["79031234567"],
                                                           "txt": "hi"})
            ready = (await c.get("/readyz")).json()
    assert r.status_code == 200  # the message is on its way: the caller gets its msg_id
    msg_id = r.json()["msg_ids"]["79031234567"]
    if backend == "sqlite":
        assert any(msg_id in rec.getMessage() for rec in caplog.records
                   if rec.levelno == logging.ERROR)
    else:
        assert ready["status"] == "spooling" and ready["spool_depth"] == 1


async def test_reads_recover_after_the_database_ended_their_connections(pg_url: str) -> None:
    """After a PostgreSQL restart, the pooled read connections are dead; the first lookup
    and page on each must not answer 503 (they are retried on a fresh connection)."""
    settings = make_settings(database_url=pg_url)
    database = Database(settings)
    upgrade(database.engine)
    wipe(database.engine)
    record_send(database.engine, "r1", "79000000001", "camp")
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app), client_for(app) as c:
            # Fill the read pools with several open connections.
            await asyncio.gather(*[c.get("/api/v1/messages/r1") for _ in range(8)])
            await asyncio.gather(*[c.get("/api/v1/stats") for _ in range(4)])
            with database.engine.connect() as conn:
                assert conn.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                ).scalar()
            answers = await asyncio.gather(
                *[c.get("/api/v1/messages/r1") for _ in range(8)],
                *[c.get("/api/v1/messages?p_transaction_id=camp") for _ in range(4)],
                *[c.get("/api/v1/stats") for _ in range(4)],
                *[c.get("/api/v1/replies") for _ in range(2)],
            )
        assert [r.status_code for r in answers] == [200] * len(answers)
    finally:
        await database.close()


async def test_a_sqlite_read_that_fails_is_the_json_503_of_every_database_error(
        tmp_path: Path) -> None:
    """The lookup and the pages read SQLite through its driver directly (app/store/db.py); a failure
    there is answered like any database error, not as a 500."""
    path = tmp_path / "reads.db"
    settings = make_settings(database_url=f"sqlite:///{path}")
    database = Database(settings)
    upgrade(database.engine)
    record_send(database.engine, "s1", "79000000001", "camp")
    app = create_app(settings)
    async with app.router.lifespan_context(app), client_for(app) as c:
        before = await c.get("/api/v1/messages/s1")
        assert before.status_code == 200 and before.json()["msg_id"] == "s1"
        with database.engine.begin() as conn:
            conn.execute(text("DROP TABLE messages"))  # what a damaged file would look like
        answers = [await c.get("/api/v1/messages/s1"),
                   await c.get("/api/v1/messages?p_transaction_id=camp")]
    database.engine.dispose()
    assert [r.status_code for r in answers] == [503, 503]
    for r in answers:
        assert r.json() == {"detail": "database unavailable"}
        assert r.headers["retry-after"] == "5"
