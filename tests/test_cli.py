"""The `dlr` command line: migrate, status, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import httpx
from sqlalchemy import Engine
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings

from .helpers import dlr

runner = CliRunner()


def test_migrate_creates_the_schema(tmp_path: Path) -> None:
    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    first = runner.invoke(cli, ["migrate"], env=env)
    again = runner.invoke(cli, ["migrate"], env=env)
    assert (first.exit_code, again.exit_code) == (0, 0), first.output
    assert "up to date" in again.stdout


async def test_status_shows_the_timeline(
    client: httpx.AsyncClient, engine: Engine, settings: Settings
) -> None:
    await dlr(client, type="delivery", msg_id="cli-1", status="undelivered",
              status_extended="PHONE_INCORRECT")
    await dlr(client, type="reply", msg_id="cli-1", text="кто это?")
    result = runner.invoke(cli, ["status", "cli-1"], env={"DLR_DATABASE_URL":
                                                          settings.database_url})
    assert result.exit_code == 0, result.output
    assert "undelivered" in result.stdout and "PHONE_INCORRECT" in result.stdout
    assert "кто это?" in result.stdout


def test_status_of_unknown_message_is_one_line_and_nonzero(tmp_path: Path) -> None:
    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    runner.invoke(cli, ["migrate"], env=env)
    result = runner.invoke(cli, ["status", "missing-id"], env=env)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: no message with msg_id 'missing-id'"


def test_bad_setting_is_one_line_and_nonzero() -> None:
    result = runner.invoke(cli, ["migrate"], env={"DLR_MAX_CALLBACK_BYTES": "big"})
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: setting DLR_MAX_CALLBACK_BYTES:")


def test_database_unreachable_is_one_line() -> None:
    env = {"DLR_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "DLR_DB_TIMEOUT": "1"}
    result = runner.invoke(cli, ["migrate"], env=env)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: database:")
