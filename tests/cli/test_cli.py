"""The `dlr` command line: migrate, status, send --csv, and one-line errors."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.simulator.provider import ProviderSimulator
from app.store.models import Send

from ..helpers import count, dlr, serving_in_thread

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


async def test_recount_counts_rows_written_around_the_service(
    client: httpx.AsyncClient, engine: Engine, settings: Settings
) -> None:
    """A row put in by hand shows in the dashboard's stats once `dlr recount` has run (on
    SQLite the write path keeps the counts and does not see it; PostgreSQL's triggers do)."""
    from sqlalchemy import text

    assert (await dlr(client, type="delivery", msg_id="rc-1", status="delivered")).status_code \
        == 200
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO messages (msg_key, msg_id, status, status_rank, created_at, "
            "updated_at, event_seq) VALUES ('rc-2', 'rc-2', 'undelivered', 2, :at, :at, 0)"),
            {"at": (await client.get("/api/v1/messages/rc-1")).json()["created_at"]})
    result = runner.invoke(cli, ["recount"], env={"DLR_DATABASE_URL": settings.database_url})
    assert result.exit_code == 0, result.output
    assert "counted 2 messages" in result.stdout
    stats = (await client.get("/api/v1/stats")).json()
    assert stats["total"] == 2, stats


# --- where the database is: reading commands never create one ------------------------------

@pytest.mark.parametrize("command", [["status", "m1"], ["purge", "--older-than", "90d", "--yes"],
                                     ["send", "--phone", "79031234567", "--txt", "hi"],
                                     ["recount"]])
def test_no_database_here_creates_none_and_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default ./dlr.db, from a directory that has none
    env = {"DLR_BULK_URL": "http://127.0.0.1:1/", "DLR_BULK_USER": "u",
           "DLR_BULK_SECRET_KEY": "k", "DLR_BULK_FROM": "Shop"}
    result = runner.invoke(cli, command, env=env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: no database at {tmp_path.resolve() / 'dlr.db'} ")
    assert "DLR_DATABASE_URL" in lines[0] and "dlr migrate" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_an_empty_database_file_is_named_not_a_missing_table(tmp_path: Path) -> None:
    empty = tmp_path / "old.db"
    empty.touch()  # what earlier versions left behind after `dlr status`
    result = runner.invoke(cli, ["status", "m1"],
                           env={"DLR_DATABASE_URL": f"sqlite:///{empty}"})
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: the database at {empty} has no schema;")
    assert empty.stat().st_size == 0


def test_csv_send_without_database_sends_nothing(tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("phone,txt\n79031234567,hi\n")
    with serving_in_thread(ProviderSimulator(user="u", secret_key="k").app()) as sim_url:
        result = runner.invoke(cli, ["send", "--csv", str(rows)], env=sim_env(
            sim_url, f"sqlite:///{tmp_path / 'elsewhere.db'}"))
    assert result.exit_code == 2
    assert "no database at" in result.stderr
    assert not (tmp_path / "elsewhere.db").exists()


# --- bad options and settings are one line -------------------------------------------------

def test_bad_log_level_is_a_usage_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["serve", "--log-level", "loud"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "'loud' is not one of" in result.stderr and "--log-level" in result.stderr
    assert list(tmp_path.iterdir()) == []  # stopped before migrating anything


def test_unknown_name_in_dotenv_reads_like_an_unknown_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("DLR_CALLBAK_TOKEN=typo\n")
    from_file = runner.invoke(cli, ["migrate"])
    (tmp_path / ".env").unlink()
    from_env = runner.invoke(cli, ["migrate"], env={"DLR_CALLBAK_TOKEN": "typo"})
    assert from_file.exit_code == from_env.exit_code == 2
    assert from_file.stderr == from_env.stderr == "error: unknown setting DLR_CALLBAK_TOKEN\n"


def test_version() -> None:
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"dlr {version('dlr-receiver')}\n"


# --- dlr send --csv -------------------------------------------------------------------------

def sim_env(sim_url: str, database_url: str) -> dict[str, str]:
    return {"DLR_DATABASE_URL": database_url, "DLR_BULK_URL": sim_url + "/",
            "DLR_BULK_USER": "u", "DLR_BULK_SECRET_KEY": "k", "DLR_BULK_FROM": "Shop"}


def test_csv_reports_every_bad_row_and_sends_nothing(tmp_path: Path, settings: Settings,
                                                     engine: Engine) -> None:
    rows = tmp_path / "spring.csv"
    rows.write_text("phone,txt,from\n"
                    "79031234567,ok,Shop\n"
                    "12,too short a phone,Shop\n"
                    "79031234568,ok,Shop\n"
                    "79031234569,sender too long,AVeryLongSenderName\n"
                    "79031234570,\"a quoted\nline break\",Shop\n"
                    "79031234571,one,Shop,extra\n")
    sim = ProviderSimulator(user="u", secret_key="k")
    with serving_in_thread(sim.app()) as sim_url:
        result = runner.invoke(cli, ["send", "--csv", str(rows)],
                               env=sim_env(sim_url, settings.database_url))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ", 2)[1] for line in lines[:-1]] == [
        f"{rows}:3", f"{rows}:5", f"{rows}:8"]
    assert "phone" in lines[0] and "from" in lines[1] and "4 fields" in lines[2]
    assert lines[-1] == f"error: {rows}: 3 bad of 6 rows; nothing was sent"
    assert sim.requests == [] and count(engine, Send) == 0


def test_semicolon_csv_is_read_and_a_rerun_shows_all_rows_done(
    tmp_path: Path, settings: Settings, engine: Engine
) -> None:
    rows = tmp_path / "excel.csv"
    # What Excel writes in a Russian locale: a BOM, ';' between fields, a ',' inside one.
    rows.write_bytes("phone;txt\r\n79031234567;Привет, мир\r\n79031234568;Hi there\r\n"
                     .encode("utf-8-sig"))
    sim = ProviderSimulator(user="u", secret_key="k")
    with serving_in_thread(sim.app()) as sim_url:
        env = sim_env(sim_url, settings.database_url)
        first = runner.invoke(cli, ["send", "--csv", str(rows), "--rate", "1000"], env=env)
        again = runner.invoke(cli, ["send", "--csv", str(rows), "--rate", "1000"], env=env)
    assert first.exit_code == 0, first.output
    assert sorted(phone for phone, _ in sim.sent.values()) == ["79031234567", "79031234568"]
    assert len(sim.requests) == 2  # the re-run sent nothing
    assert again.exit_code == 0, again.output
    assert "all 2 rows already sent" in again.stderr
    assert "100%" in again.stderr and "0%" not in again.stderr.replace("100%", "")
    assert "2 skipped" in again.stdout


def test_csv_header_errors_name_the_separator(tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("phone;text\n79031234567;hi\n")
    result = runner.invoke(cli, ["send", "--csv", str(rows)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {rows}: line 1: unknown column 'text' "
                                    "(separated by ';')")
    rows.write_text("Telephone\n79031234567\n")
    result = runner.invoke(cli, ["send", "--csv", str(rows)])
    assert "separated by" in result.stderr and "'telephone'" in result.stderr


@pytest.mark.parametrize(("extra", "named"), [
    (["--phone", "79031234567", "--txt", "hi"], "--phone"),
    (["--p-transaction-id", "x"], "--p-transaction-id"),
    (["--phone", "79031234567", "--p-transaction-id", "x"], "--phone and --p-transaction-id"),
])
def test_csv_conflicts_name_only_the_options_given(
    tmp_path: Path, extra: list[str], named: str
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("phone\n79031234567\n")
    result = runner.invoke(cli, ["send", "--csv", str(rows), *extra])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {named} cannot be combined with --csv (each row gives its own)\n")


async def test_status_is_readable_in_80_columns(
    client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.cli import common

    # The consoles read COLUMNS when they print (not a width frozen when first imported).
    monkeypatch.setattr(common.out, "_width", None)
    msg_id = "550e8400-e29b-41d4-a716-446655440000"
    await dlr(client, type="delivery", msg_id=msg_id, status="undelivered",
              status_extended="SUBSCRIBER_IS_BLOCKED", p_transaction_id="campaign-2024-spring-1")
    await dlr(client, type="reply", msg_id=msg_id,
              text="a reply long enough to need folding: " + "word " * 30)
    result = runner.invoke(cli, ["status", msg_id],
                           env={"DLR_DATABASE_URL": settings.database_url, "COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80, "\n" + result.stdout
    assert any(msg_id in line for line in lines)  # whole, on one line
    assert any("SUBSCRIBER_IS_BLOCKED" in line for line in lines)
    assert any("campaign-2024-spring-1" in line for line in lines)
    # Every time is whole on one line: its date and its clock side by side.
    stamps = [line for line in lines if re.search(r"\d{4}-\d\d-\d\d", line)]
    assert len(stamps) >= 3  # updated_at and two events
    assert all(re.search(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d", line) for line in stamps), (
        "\n" + result.stdout)
