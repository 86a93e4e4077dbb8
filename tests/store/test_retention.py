"""`dlr purge`: old rows go in small batches; recent ones and what they show stay; nothing
goes without a confirmation, and a dry run only counts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine, update
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.store.models import Event, Message, Rejected

from ..helpers import count, dlr


async def test_purge_deletes_only_what_is_older(
    client: httpx.AsyncClient, engine: Engine, settings: Settings
) -> None:
    for i in range(5):
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

    result = CliRunner().invoke(cli, ["purge", "--older-than", "90d", "--batch", "3", "--yes"],
                                env={"DLR_DATABASE_URL": settings.database_url})
    assert result.exit_code == 0, result.output
    assert "10 events" in result.stdout and "5 messages" in result.stdout
    assert (count(engine, Event), count(engine, Message), count(engine, Rejected)) == (1, 1, 0)
    assert (await client.get("/api/v1/messages/new")).json()["status"] == "delivered"


def test_purge_age_is_checked() -> None:
    result = CliRunner().invoke(cli, ["purge", "--older-than", "ninety days"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: age 'ninety days' must look like 90d, 12h or 30m"


async def old_and_new(client: httpx.AsyncClient, engine: Engine) -> None:
    """Two messages (four events) and a rejected callback from 120 days ago, one of today."""
    for i in range(2):
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
