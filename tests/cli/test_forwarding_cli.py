"""`dlr endpoints ...` and `dlr deliveries ...`."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select, update
from typer.testing import CliRunner

from app.cli import cli
from app.cli import forwarding as forwarding_cli
from app.config import Settings
from app.forward.dispatcher import Forwarder
from app.store.models import Delivery, Endpoint

from ..helpers import add_endpoint, count, emit, make_settings, running_sink, status_event

runner = CliRunner()


def test_add_list_replay_retry_remove(settings: Settings, engine: Engine) -> None:
    env = {"DLR_DATABASE_URL": settings.database_url}
    added = runner.invoke(cli, ["endpoints", "add", "http://127.0.0.1:9/hook",
                                "--event", "message.status", "--prefix", "camp-",
                                "--description", "CRM"], env=env)
    assert added.exit_code == 0, added.output
    endpoint_id = re.search(r"endpoint (ep_\w+)", added.stdout).group(1)  # type: ignore[union-attr]
    secret = re.search(r"secret: (whsec_\S+)", added.stdout).group(1)  # type: ignore[union-attr]

    emit(engine, [status_event("m-1", "delivered", ptid="camp-1"),
                  status_event("m-2", "delivered", ptid="other")])
    listed = runner.invoke(cli, ["endpoints", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert endpoint_id in listed.stdout and "camp-" in listed.stdout
    assert secret not in listed.stdout

    with engine.begin() as conn:
        conn.execute(update(Delivery).values(status="failed"))
    shown = runner.invoke(cli, ["deliveries", "list", "--status", "failed"], env=env)
    assert shown.exit_code == 0 and "m-1" in shown.stdout and "m-2" not in shown.stdout
    (delivery_id,) = re.findall(r"^\W*(\d+)\W", shown.stdout, re.M)[:1]
    retried = runner.invoke(cli, ["deliveries", "retry", delivery_id, "--wait", "0"],
                            env=env)
    assert retried.exit_code == 0, retried.output
    assert count(engine, Delivery) == 1

    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    replayed = runner.invoke(cli, ["endpoints", "replay", endpoint_id, "--since", since],
                             env=env)
    assert replayed.exit_code == 0, replayed.output
    assert "queued 0" in replayed.stdout  # m-1 is pending again already

    rotated = runner.invoke(cli, ["endpoints", "rotate-secret", endpoint_id], env=env)
    assert rotated.exit_code == 0 and secret not in rotated.stdout

    removed = runner.invoke(cli, ["endpoints", "remove", endpoint_id, "--yes"], env=env)
    assert removed.exit_code == 0
    assert count(engine, Endpoint) == 0 and count(engine, Delivery) == 0


def test_errors_are_one_line(settings: Settings, engine: Engine) -> None:
    env = {"DLR_DATABASE_URL": settings.database_url}
    for args, words in [
        (["endpoints", "add", "http://169.254.169.254/"], "link-local"),
        (["endpoints", "add", "gopher://x/"], "http"),
        (["endpoints", "add", "http://a..b/"], "a..b"),
        (["endpoints", "add", "http://127.0.0.1/", "--description", "a\x00b"], "NUL"),
        (["endpoints", "update", "ep_missing", "--description", "x"], "no endpoint"),
        (["endpoints", "update", "ep_missing"], "nothing to change"),
        (["endpoints", "pause", "ep_missing"], "no endpoint ep_missing"),
        (["endpoints", "remove", "ep_missing"], "no endpoint ep_missing"),
        (["endpoints", "replay", "ep_missing", "--since", "yesterday"], "ISO 8601"),
        (["deliveries", "retry", "12345"], "no delivery 12345"),
    ]:
        result = runner.invoke(cli, args, env=env)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert count(engine, Endpoint) == 0
    bad = runner.invoke(cli, ["endpoints", "add", "http://127.0.0.1/", "--event", "x"], env=env)
    assert bad.exit_code != 0 and count(engine, Endpoint) == 0


def test_remove_asks_first(settings: Settings, engine: Engine,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"DLR_DATABASE_URL": settings.database_url}
    ep = add_endpoint(engine, "http://127.0.0.1:9/")
    emit(engine, [status_event("m-1", "delivered")])
    # No terminal to ask in (cron, a script): refused without --yes.
    refused = runner.invoke(cli, ["endpoints", "remove", ep.id], env=env)
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    assert "1 pending" in refused.stderr
    monkeypatch.setattr(forwarding_cli, "_interactive", lambda: True)
    kept = runner.invoke(cli, ["endpoints", "remove", ep.id], env=env, input="n\n")
    assert kept.exit_code == 1 and count(engine, Endpoint) == 1
    removed = runner.invoke(cli, ["endpoints", "remove", ep.id], env=env, input="y\n")
    assert removed.exit_code == 0 and count(engine, Endpoint) == 0


def test_update_pause_resume(settings: Settings, engine: Engine) -> None:
    env = {"DLR_DATABASE_URL": settings.database_url}
    ep = add_endpoint(engine, "http://127.0.0.1:9/a")
    updated = runner.invoke(cli, ["endpoints", "update", ep.id, "--url", "http://127.0.0.1:9/b",
                                  "--event", "message.reply", "--prefix", "camp-"], env=env)
    assert updated.exit_code == 0, updated.output
    with engine.connect() as conn:
        row = conn.execute(select(Endpoint)).one()
    assert (row.url, row.events, row.p_transaction_id_prefix, row.secret) == (
        "http://127.0.0.1:9/b", "message.reply", "camp-", ep.secret)
    paused = runner.invoke(cli, ["endpoints", "pause", ep.id], env=env)
    assert paused.exit_code == 0, paused.output
    listed = runner.invoke(cli, ["endpoints", "list"], env=env)
    assert "paused since" in listed.stdout
    resumed = runner.invoke(cli, ["endpoints", "resume", ep.id], env=env)
    assert resumed.exit_code == 0
    with engine.connect() as conn:
        assert conn.execute(select(Endpoint.paused_at)).scalar() is None
    bad = runner.invoke(cli, ["endpoints", "update", ep.id, "--url", "http://a..b/"], env=env)
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_the_delivery_list_fits_80_columns(settings: Settings, engine: Engine) -> None:
    env = {"DLR_DATABASE_URL": settings.database_url, "COLUMNS": "80"}
    add_endpoint(engine, "http://127.0.0.1:9/a-rather-long-path/" + "x" * 40)
    emit(engine, [status_event(f"MSG-{i}-" + "7" * 30, "delivered") for i in range(3)])
    with engine.begin() as conn:
        conn.execute(update(Delivery).values(
            attempts=3, last_error="HTTP 500: " + "an error page of some length " * 10,
            next_attempt_at=datetime.now(UTC) - timedelta(minutes=10)))
    shown = runner.invoke(cli, ["deliveries", "list"], env=env)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [ln for ln in lines if len(ln) > 80]
    assert "MSG-2-" in shown.stdout and "held back since" in shown.stdout
    assert "an error page" in shown.stdout


@pytest.mark.slow
async def test_retry_waits_for_the_attempt_and_prints_it(settings: Settings,
                                                         engine: Engine) -> None:
    env = {"DLR_DATABASE_URL": settings.database_url}
    with running_sink() as sink:
        add_endpoint(engine, sink.url)
        emit(engine, [status_event("m-1", "delivered")])
        with engine.begin() as conn:
            conn.execute(update(Delivery).values(status="failed"))
        delivery_id = str(count(engine, Delivery))
        f = Forwarder(engine, make_settings(database_url=settings.database_url))
        await f.start()
        try:
            done = await asyncio.to_thread(runner.invoke, cli, [
                "deliveries", "retry", delivery_id, "--wait", "10"], env=env)
            sink.answer = lambda n, h, b: 503
            with engine.begin() as conn:
                conn.execute(update(Delivery).values(status="failed"))
            failed = await asyncio.to_thread(runner.invoke, cli, [
                "deliveries", "retry", delivery_id, "--wait", "10"], env=env)
        finally:
            await f.close()
    assert done.exit_code == 0, done.output
    assert re.search(r"delivered: HTTP 200 in \d+ ms", done.stdout), done.stdout
    assert failed.exit_code == 1, failed.output
    assert "HTTP 503" in failed.stdout and "next attempt" in failed.stdout
    # Nothing sends (no server): it says so after the wait, and fails.
    with engine.begin() as conn:
        conn.execute(update(Delivery).values(status="failed"))
    alone = runner.invoke(cli, ["deliveries", "retry", delivery_id, "--wait", "0.5"], env=env)
    assert alone.exit_code == 1 and "no attempt within 0.5 s" in alone.stdout
