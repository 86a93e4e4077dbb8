"""`dlr purge`: old rows go in small batches; recent ones and what they show stay; nothing
goes without a confirmation, and a dry run only counts."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select, update
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.core.notifications import interpret
from app.forward.queue import Outcome, record
from app.store.db import make_engine
from app.store.migrate import upgrade
from app.store.models import Delivery, Event, Message, OutboundEvent, Rejected
from app.store.retention import parse_age, purge
from app.store.write import store

from ..helpers import add_endpoint, count, dlr, emit, make_settings, status_event


async def test_purge_deletes_only_what_is_older(
    client: httpx.AsyncClient, engine: Engine, settings: Settings
) -> None:
    await old_and_new(client, engine, old=5)

    result = CliRunner().invoke(cli, ["purge", "--older-than", "90d", "--batch", "3", "--yes"],
                                env={"DLR_DATABASE_URL": settings.database_url})
    assert result.exit_code == 0, result.output
    assert "10 events" in result.stdout and "5 messages" in result.stdout
    assert (count(engine, Event), count(engine, Message), count(engine, Rejected)) == (1, 1, 0)
    assert (await client.get("/api/v1/messages/new")).json()["status"] == "delivered"


def test_purge_age_is_checked() -> None:
    result = CliRunner().invoke(cli, ["purge", "--older-than", "ninety days"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: age 'ninety days' must be a number and a unit: min, h, d, w, mo (30 days) "
        "or y (365 days), e.g. 90d, 6mo")


@pytest.mark.parametrize(("value", "age"), [
    ("30min", timedelta(minutes=30)), ("12h", timedelta(hours=12)), ("90d", timedelta(days=90)),
    ("2w", timedelta(weeks=2)), ("6mo", timedelta(days=180)), ("1y", timedelta(days=365)),
    ("90D", timedelta(days=90)), (" 6 MO ", timedelta(days=180)), ("0d", timedelta(0)),
])
def test_ages_in_every_unit(value: str, age: timedelta) -> None:
    assert parse_age(value) == age


@pytest.mark.parametrize("value", ["6m", "6M"])
def test_m_alone_is_refused_as_ambiguous(value: str) -> None:
    # A cron line written for six months would otherwise delete all but six minutes.
    result = CliRunner().invoke(cli, ["purge", "--older-than", value, "--yes"])
    assert result.exit_code == 2
    assert result.stderr == (f"error: age {value!r} is ambiguous: write 6min for minutes or "
                             "6mo for months\n")


@pytest.mark.parametrize("value", ["6", "6s", "6mon", "6 months", "-1d", "1.5d", "d"])
def test_other_units_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="must be a number and a unit"):
        parse_age(value)


def test_the_help_names_the_units() -> None:
    result = CliRunner().invoke(cli, ["purge", "--help"], env={"COLUMNS": "200"})
    assert "6mo" in result.stdout and "min" in result.stdout


async def test_a_dry_run_counts_exactly_what_the_run_deletes_forwarding_included(
    client: httpx.AsyncClient, engine: Engine, settings: Settings
) -> None:
    await old_and_new(client, engine)
    first = add_endpoint(engine, "http://127.0.0.1:9/a")
    second = add_endpoint(engine, "http://127.0.0.1:9/b")
    old = datetime.now(UTC) - timedelta(days=40)
    emit(engine, [status_event(f"m-{i}", "delivered", at=old) for i in range(4)])
    yesterday = datetime.now(UTC) - timedelta(days=1)
    # m-0: delivered to both long ago (the event goes once both deliveries have gone);
    # m-1: failed at one long ago, delivered to the other yesterday; m-2: delivered to one
    # long ago, pending at the other; m-3: pending at both.
    plan = {("m-0", first.id): ("delivered", old), ("m-0", second.id): ("delivered", old),
            ("m-1", first.id): ("failed", old), ("m-1", second.id): ("delivered", yesterday),
            ("m-2", first.id): ("delivered", old)}
    with engine.begin() as conn:
        rows = conn.execute(select(Delivery.id, Delivery.endpoint_id, OutboundEvent.msg_key)
                            .join(OutboundEvent, OutboundEvent.id == Delivery.event_id)).all()
        for delivery_id, endpoint_id, msg_key in rows:
            if (msg_key, endpoint_id) not in plan:
                continue
            status, at = plan[(msg_key, endpoint_id)]
            conn.execute(update(Delivery).where(Delivery.id == delivery_id)
                         .values(lease_token="t"))
            record(conn, [Outcome(delivery_id, endpoint_id, "t", status, attempted_at=at,
                                  status_code=200 if status == "delivered" else 500,
                                  ok=status == "delivered")])
    env = {"DLR_DATABASE_URL": settings.database_url}
    dry = CliRunner().invoke(cli, ["purge", "--older-than", "30d", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    done = CliRunner().invoke(cli, ["purge", "--older-than", "30d", "--yes", "--batch", "2"],
                              env=env)
    assert done.exit_code == 0, done.output
    would = dry.stdout.split(": ", 1)[1].strip()
    deleted = done.stdout.split(": ", 1)[1].strip()
    assert would == deleted
    assert would == ("4 deliveries, 1 outbound_events, 4 events, 1 rejected, 0 sends, "
                     "2 messages")
    with engine.connect() as conn:
        assert sorted(conn.scalars(select(OutboundEvent.msg_key))) == ["m-1", "m-2", "m-3"]
        assert count(engine, Delivery) == 4


async def old_and_new(client: httpx.AsyncClient, engine: Engine, old: int = 2) -> None:
    """`old` messages (two events each) and a rejected callback from 120 days ago, one of
    today."""
    for i in range(old):
        await dlr(client, type="delivery", msg_id=f"old{i}", status="delivered")
        await dlr(client, type="seen", msg_id=f"old{i}")
    await dlr(client, type="bogus", msg_id="old-rejected")
    await dlr(client, type="delivery", msg_id="new", status="delivered")
    long_ago = datetime.now(UTC) - timedelta(days=120)
    with engine.begin() as conn:
        conn.execute(update(Event).where(Event.msg_key.like("old%")).values(received_at=long_ago))
        conn.execute(update(Message).where(Message.msg_key.like("old%"))
                     .values(updated_at=long_ago))
        conn.execute(update(Rejected).values(received_at=long_ago))


def kept(engine: Engine) -> tuple[int, int, int]:
    return count(engine, Event), count(engine, Message), count(engine, Rejected)


async def test_dry_run_counts_per_table_and_deletes_nothing(
    client: httpx.AsyncClient, engine: Engine, settings: Settings
) -> None:
    await old_and_new(client, engine)
    result = CliRunner().invoke(cli, ["purge", "--older-than", "90d", "--dry-run"],
                                env={"DLR_DATABASE_URL": settings.database_url})
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("would delete before ")
    assert result.stdout.rstrip().endswith(
        ": 0 deliveries, 0 outbound_events, 4 events, 1 rejected, 0 sends, 2 messages")
    assert kept(engine) == (5, 3, 1)


async def test_without_a_terminal_purge_needs_yes(
    client: httpx.AsyncClient, engine: Engine, settings: Settings
) -> None:
    await old_and_new(client, engine)
    result = CliRunner().invoke(cli, ["purge", "--older-than", "90d"],
                                env={"DLR_DATABASE_URL": settings.database_url})
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: would delete 0 deliveries, 0 outbound_events, 4 events, "
                               "1 rejected, 0 sends, 2 messages")
    assert "--yes" in lines[0] and "--dry-run" in lines[0]
    assert kept(engine) == (5, 3, 1)


@pytest.mark.parametrize(("answer", "exit_code", "left"), [("n\n", 1, (5, 3, 1)),
                                                          ("y\n", 0, (1, 1, 0))])
async def test_at_a_terminal_purge_asks_first(
    client: httpx.AsyncClient, engine: Engine, settings: Settings,
    monkeypatch: pytest.MonkeyPatch, answer: str, exit_code: int, left: tuple[int, int, int]
) -> None:
    await old_and_new(client, engine)
    monkeypatch.setattr("app.cli.commands._interactive", lambda: True)  # as if run from a terminal
    result = CliRunner().invoke(cli, ["purge", "--older-than", "90d"], input=answer,
                                env={"DLR_DATABASE_URL": settings.database_url})
    assert result.exit_code == exit_code, result.output
    assert ("delete 0 deliveries, 0 outbound_events, 4 events, 1 rejected, 0 sends, 2 messages"
            in result.stderr)
    assert kept(engine) == left


async def test_age_zero_needs_yes_even_at_a_terminal(
    client: httpx.AsyncClient, engine: Engine, settings: Settings,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    await old_and_new(client, engine)
    monkeypatch.setattr("app.cli.commands._interactive", lambda: True)
    env = {"DLR_DATABASE_URL": settings.database_url}
    refused = CliRunner().invoke(cli, ["purge", "--older-than", "0d"], input="y\n", env=env)
    assert refused.exit_code == 2
    assert refused.stderr == "error: --older-than 0d deletes everything; add --yes if you mean it\n"
    assert kept(engine) == (5, 3, 1)
    dry = CliRunner().invoke(cli, ["purge", "--older-than", "0d", "--dry-run"], env=env)
    assert dry.exit_code == 0 and "5 events" in dry.stdout
    done = CliRunner().invoke(cli, ["purge", "--older-than", "0d", "--yes"], env=env)
    assert done.exit_code == 0, done.output
    assert kept(engine) == (0, 0, 0)


def test_a_sqlite_purge_leaves_the_write_lock_free_between_its_batches(tmp_path: Path) -> None:
    """SQLite has one write lock: a purge run back to back starved the callbacks' writer
    (p99 1.4 s, timeouts). A writer that never waits for the lock gets it again and again
    while the purge runs, at least once per batch."""
    path = tmp_path / "purge.db"
    engine = make_engine(make_settings(database_url=f"sqlite:///{path}"), pool_size=1)
    upgrade(engine)
    long_ago = datetime.now(UTC) - timedelta(days=120)
    with engine.begin() as conn:
        store(conn, [interpret({"type": "delivery", "status": "delivered", "msg_id": f"o{i}"},
                               received_at=long_ago) for i in range(400)])
    batches: list[int] = []
    got_in = 0
    done = threading.Event()

    def writer() -> None:
        nonlocal got_in
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        while not done.is_set():
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
                got_in += 1
            except sqlite3.OperationalError:  # locked: the purge is in a batch
                pass
            time.sleep(0.002)
        other.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deleted = purge(engine, before=datetime.now(UTC) - timedelta(days=90), batch=40,
                        progress=lambda _table, n: batches.append(n))
    finally:
        done.set()
        thread.join()
        engine.dispose()
    assert deleted["events"] == 400 and deleted["messages"] == 400
    assert got_in >= len(batches) >= 20
