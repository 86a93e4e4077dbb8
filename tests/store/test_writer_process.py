"""The write path's writer in a child process (app/store/writer_process.py, the default; the other
tests' in-process apps keep it in a thread, see helpers.make_settings): callbacks
are committed by the child and answered by the server, what only the child sees (metrics,
log lines, send ids) reaches the server, and a child that dies costs at most its own batch,
which the provider then sends again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from app.config import Settings, load_settings
from app.core.notifications import interpret
from app.core.times import utcnow
from app.main import create_app
from app.store.db import Database, make_engine
from app.store.migrate import upgrade
from app.store.writer import ThreadWriter
from app.store.writer_process import ENDED, RemoteWriter
from app.store.writers import writer_for

from ..helpers import (
    AppFactory,
    client_for,
    dlr,
    events,
    make_settings,
    sqlite_write_lock,
    wipe,
)

ENDED_METRIC = f'dlr_db_errors_total{{kind="{ENDED}"}}'


def metric(body: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def wait_gone(pid: int, timeout: float = 10) -> None:
    """Until `pid` has exited (its parent, the fork server, reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs")


@contextlib.contextmanager
def writes_blocked(settings: Settings, engine: Engine) -> Iterator[None]:
    """Hold the events table's write lock from another connection: a batch waits on it."""
    if engine.dialect.name == "sqlite":
        with sqlite_write_lock(settings.database_url.removeprefix("sqlite:///")):
            yield
        return
    with engine.connect() as conn, conn.begin():
        conn.execute(text("LOCK TABLE events IN EXCLUSIVE MODE"))
        yield


async def test_the_child_commits_and_the_server_counts(app_with: AppFactory,
                                                       engine: Engine) -> None:
    app = await app_with(writer_process=True)
    writer = app.state.ingestor.writer
    assert isinstance(writer, RemoteWriter)
    async with client_for(app) as c:
        before = (await c.get("/metrics")).text
        answers = await asyncio.gather(*[
            dlr(c, type="delivery", msg_id=f"w{i}", status="delivered") for i in range(40)])
        after = (await c.get("/metrics")).text
    assert {r.status_code for r in answers} == {200}
    assert events(engine) == 40
    assert writer.pid is not None and writer.pid != os.getpid()
    # The child's commit times are the server's metrics, one per batch it wrote.
    commits = (metric(after, "dlr_commit_seconds_count")
               - metric(before, "dlr_commit_seconds_count"))
    batches = metric(after, "dlr_batch_size_count") - metric(before, "dlr_batch_size_count")
    assert 1 <= commits == batches <= 40


async def test_a_writer_killed_while_idle_costs_no_callback(app_with: AppFactory,
                                                            engine: Engine) -> None:
    app = await app_with(writer_process=True)
    writer = app.state.ingestor.writer
    async with client_for(app) as c:
        assert (await dlr(c, type="seen", msg_id="k0")).status_code == 200
        killed = writer.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_gone(killed)
        answers = await asyncio.gather(*[
            dlr(c, type="seen", msg_id=f"k{i}") for i in range(1, 11)])
    assert {r.status_code for r in answers} == {200}
    assert writer.pid not in (None, killed)
    assert events(engine) == 11


async def test_a_writer_killed_with_a_batch_answers_503_and_the_resend_is_stored_once(
    app_with: AppFactory, settings: Settings, engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # db_timeout: the batch waits on the lock rather than timing out
    app = await app_with(writer_process=True, db_timeout=30)
    writer = app.state.ingestor.writer
    async with client_for(app) as c:
        assert (await dlr(c, type="seen", msg_id="b0")).status_code == 200
        ended_before = metric((await c.get("/metrics")).text, ENDED_METRIC)
        with writes_blocked(settings, engine):
            waiting = asyncio.create_task(dlr(c, type="seen", msg_id="b1"))
            await asyncio.sleep(0.5)  # the child now waits for the lock with the batch
            assert not waiting.done()
            killed = writer.pid
            assert killed is not None
            with caplog.at_level(logging.ERROR, logger="app.store.writer_process"):
                os.kill(killed, signal.SIGKILL)
                answer = await asyncio.wait_for(waiting, timeout=10)
        assert answer.status_code == 503 and answer.headers["retry-after"]
        ended = metric((await c.get("/metrics")).text, ENDED_METRIC) - ended_before
        assert ended == 1  # the death is counted where operators look
        assert any("writer process ended" in r.getMessage() and "with a batch" in
                   r.getMessage() for r in caplog.records)
        assert not [r for r in caplog.records if r.exc_info]  # said once, without a trace
        # The provider sends it again; a new child stores it, once.
        for _ in range(2):
            assert (await dlr(c, type="seen", msg_id="b1")).status_code == 200
    assert writer.pid not in (None, killed)
    assert events(engine) == 2


async def test_the_next_batch_waits_with_the_child_and_a_death_answers_both(
    app_with: AppFactory, settings: Settings, engine: Engine,
) -> None:
    """While the child writes a batch, the next one is already handed to it (it starts on it
    the moment it commits, not when the event loop next gets to its answer); if the child
    dies, both are answered 503, and a new child stores what the provider sends again."""
    app = await app_with(writer_process=True, db_timeout=30)
    writer = app.state.ingestor.writer
    async with client_for(app) as c:
        assert (await dlr(c, type="seen", msg_id="p0")).status_code == 200
        with writes_blocked(settings, engine):
            first = asyncio.create_task(dlr(c, type="seen", msg_id="p1"))
            await asyncio.sleep(0.3)  # the child waits for the lock with the first batch
            second = asyncio.create_task(dlr(c, type="seen", msg_id="p2"))
            await asyncio.sleep(0.3)  # the second waits in the child's pipe
            assert not first.done() and not second.done()
            killed = writer.pid
            assert killed is not None
            os.kill(killed, signal.SIGKILL)
            answers = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
        assert [a.status_code for a in answers] == [503, 503]
        for msg_id in ("p1", "p2"):  # sent again: stored once each, by a new child
            assert (await dlr(c, type="seen", msg_id=msg_id)).status_code == 200
    assert writer.pid not in (None, killed)
    assert events(engine) == 3


async def test_the_childs_log_lines_reach_the_servers_log(
    pg_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A line the child logs (here: the database ended its kept connection, and it
    reconnected) is written by the server's logging, as if logged there."""
    settings = make_settings(database_url=pg_url, writer_process=True)
    engine = make_engine(settings, pool_size=1)
    upgrade(engine)
    wipe(engine)
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app), client_for(app) as c:
            assert (await dlr(c, type="seen", msg_id="l0")).status_code == 200
            child = app.state.ingestor.writer.pid
            with engine.connect() as conn:
                conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
            with caplog.at_level(logging.INFO, logger="app.store.writer"):
                assert (await dlr(c, type="seen", msg_id="l1")).status_code == 200
        lost = [r for r in caplog.records if "writer connection lost" in r.getMessage()]
        assert lost and lost[0].name == "app.store.writer" and lost[0].process == child
        assert events(engine) == 2
    finally:
        engine.dispose()


async def test_a_send_gets_its_record_id_from_the_child(app_with: AppFactory,
                                                        engine: Engine) -> None:
    from app.send import SendRequest
    from app.simulator.provider import ProviderSimulator

    from ..helpers import serving_in_thread

    sim = ProviderSimulator(user="u", secret_key="k")
    with serving_in_thread(sim.app()) as sim_url:
        app = await app_with(bulk_url=sim_url + "/", bulk_user="u", bulk_secret_key="k",
                             bulk_from="Shop", writer_process=True)
        result = await app.state.sender.send(SendRequest(phone=["79031234567"], txt="hi"))
    assert result.outcome == "accepted"
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT id FROM sends")).scalar_one()
        linked = conn.execute(text("SELECT send_id FROM messages WHERE msg_id = :m"),
                              {"m": result.msg_ids["79031234567"]}).scalar_one()
    assert result.send_id == stored == linked


def test_the_child_is_the_default_and_the_setting_keeps_the_writer_here(
    settings: Settings,
) -> None:
    default = load_settings(_env_file=None, database_url=settings.database_url)
    here = make_settings(database_url=settings.database_url, writer_process=False)
    for chosen, kind in ((default, RemoteWriter), (here, ThreadWriter)):
        database = Database(chosen)
        try:
            assert isinstance(writer_for(database, forwarding=True), kind)
        finally:
            database.engine.dispose()
            database.reader.dispose()


async def test_writer_process_false_stores_through_the_servers_thread(
    app_with: AppFactory, engine: Engine,
) -> None:
    app = await app_with(writer_process=False)
    async with client_for(app) as c:
        assert (await dlr(c, type="seen", msg_id="t1")).status_code == 200
    assert isinstance(app.state.ingestor.writer, ThreadWriter)
    assert events(engine) == 1


async def test_a_call_on_the_writers_thread_waits_for_the_batches_before_it(
        app_with: AppFactory, engine: Engine) -> None:
    # The event loop drives the child; the forwarder's SQLite rounds (Ingestor.call) still
    # take their turn between batches, never beside one.
    app = await app_with(writer_process=True)
    ingestor = app.state.ingestor
    notes = [interpret({"type": "seen", "msg_id": f"c{i}"}, received_at=utcnow())
             for i in range(30)]
    first = [asyncio.ensure_future(ingestor.submit(n)) for n in notes[:20]]
    stored_then = asyncio.ensure_future(ingestor.call(events, engine))
    later = [asyncio.ensure_future(ingestor.submit(n)) for n in notes[20:]]
    outcomes = await asyncio.gather(*first, *later)
    assert await stored_then == 20
    assert outcomes == ["new"] * 30 and events(engine) == 30


async def test_a_writer_process_that_fails_to_start_is_started_by_the_first_batch(
        app_with: AppFactory, engine: Engine, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real_start = RemoteWriter._start
    starts: list[int] = []

    def failing_once(self: RemoteWriter) -> Any:
        starts.append(1)
        if len(starts) == 1:
            raise OSError("Resource temporarily unavailable")
        return real_start(self)

    monkeypatch.setattr(RemoteWriter, "_start", failing_once)
    with caplog.at_level(logging.ERROR, logger="app.store.ingestor"):
        app = await app_with(writer_process=True)  # the server starts all the same
    assert "writer did not start" in caplog.text
    async with client_for(app) as c:
        assert (await dlr(c, type="seen", msg_id="late-start")).status_code == 200
    assert len(starts) == 2 and events(engine) == 1
