"""`dlr endpoints ...` and `dlr deliveries ...`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, update
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.store.models import Delivery, Endpoint

from ..helpers import count, emit, status_event

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
    retried = runner.invoke(cli, ["deliveries", "retry", delivery_id], env=env)
    assert retried.exit_code == 0, retried.output
    assert count(engine, Delivery) == 1

    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    replayed = runner.invoke(cli, ["endpoints", "replay", endpoint_id, "--since", since],
                             env=env)
    assert replayed.exit_code == 0, replayed.output
    assert "queued 0" in replayed.stdout  # m-1 is pending again already

    rotated = runner.invoke(cli, ["endpoints", "rotate-secret", endpoint_id], env=env)
    assert rotated.exit_code == 0 and secret not in rotated.stdout

    removed = runner.invoke(cli, ["endpoints", "remove", endpoint_id], env=env)
    assert removed.exit_code == 0
    assert count(engine, Endpoint) == 0 and count(engine, Delivery) == 0


def test_errors_are_one_line(settings: Settings, engine: Engine) -> None:
    env = {"DLR_DATABASE_URL": settings.database_url}
    for args, words in [
        (["endpoints", "add", "http://169.254.169.254/"], "link-local"),
        (["endpoints", "add", "gopher://x/"], "http"),
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
