"""`dlr purge`: old rows go in small batches; recent ones and what they show stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import Engine, update
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.models import Event, Message, Rejected

from .helpers import count, dlr


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

    result = CliRunner().invoke(cli, ["purge", "--older-than", "90d", "--batch", "3"],
                                env={"DLR_DATABASE_URL": settings.database_url})
    assert result.exit_code == 0, result.output
    assert "10 events" in result.stdout and "5 messages" in result.stdout
    assert (count(engine, Event), count(engine, Message), count(engine, Rejected)) == (1, 1, 0)
    assert (await client.get("/api/v1/messages/new")).json()["status"] == "delivered"


def test_purge_age_is_checked() -> None:
    result = CliRunner().invoke(cli, ["purge", "--older-than", "ninety days"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: age 'ninety days' must look like 90d, 12h or 30m"
