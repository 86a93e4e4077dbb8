"""`dlr endpoints ...` and `dlr deliveries ...`: forwarding from the command line, straight on
the database (a running server picks changes up within a second)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from sqlalchemy import Connection

from app.cli.common import CliError, err, one_line_errors, out, settings
from app.core.targets import RefusedAddress, check_url, refuse_if_blocked
from app.core.times import iso
from app.core.webhook_signing import mask
from app.forward import deliveries, endpoints
from app.forward.schemas import storable

T = TypeVar("T")
endpoints_cli = typer.Typer(no_args_is_help=True, help="Where events are forwarded.")
deliveries_cli = typer.Typer(no_args_is_help=True, help="Forwarded events and their attempts.")


class EventName(StrEnum):
    status = "message.status"
    reply = "message.reply"


class DeliveryStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


def register(cli: typer.Typer) -> None:
    cli.add_typer(endpoints_cli, name="endpoints")
    cli.add_typer(deliveries_cli, name="deliveries")


@contextmanager
def _transaction() -> Iterator[Connection]:
    from app.store.db import make_engine

    engine = make_engine(settings(), pool_size=1)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def _run(fn: Callable[[Connection], T]) -> T:
    try:
        with _transaction() as conn:
            return fn(conn)
    except (endpoints.NotFound, endpoints.Conflict) as exc:
        raise CliError(str(exc)) from None


def _time(value: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"{name} must be an ISO 8601 time, e.g. 2026-11-27T10:00:00Z") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _checked_url(url: str) -> str:
    """The URL as check_url takes it, refused when its host resolves to a metadata address."""
    try:
        url = check_url(storable(url))
        asyncio.run(refuse_if_blocked(url))
    except (ValueError, RefusedAddress) as exc:
        raise CliError(str(exc)) from None
    return url


def _text(value: str | None, name: str, limit: int) -> str | None:
    """A text option the database can store, refused (one line) otherwise."""
    if value is None:
        return None
    try:
        storable(value)
    except ValueError as exc:
        raise CliError(f"{name} {exc}") from None
    if len(value) > limit:
        raise CliError(f"{name} is longer than {limit} characters")
    return value


def _interactive() -> bool:
    """Whether a person can answer a prompt (cron and scripts cannot: they need --yes)."""
    return sys.stdin.isatty()


def _state(row: Any) -> str:
    if not row.enabled:
        return f"disabled ({row.disabled_reason})"
    if row.paused_at is not None:
        return f"paused since {row.paused_at:%Y-%m-%d %H:%M:%S}Z"
    return "enabled"


@endpoints_cli.command("add")
@one_line_errors
def add(
    url: Annotated[str, typer.Argument(help="http(s) URL of your webhook receiver")],
    event: Annotated[list[EventName] | None, typer.Option(
        help="Event type to forward (repeat for several; default: all)")] = None,
    prefix: Annotated[str | None, typer.Option(
        help="Only messages whose p_transaction_id starts with this")] = None,
    description: Annotated[str | None, typer.Option(help="A note for people")] = None,
) -> None:
    """Add an endpoint; prints its id and signing secret (shown this once)."""
    checked = _checked_url(url)
    prefix = _text(prefix, "--prefix", 255)
    description = _text(description, "--description", 1000)
    events = [e.value for e in dict.fromkeys(event)] if event else None
    row = _run(lambda conn: endpoints.create(conn, url=checked, events=events, prefix=prefix,
                                             description=description))
    out.print(f"endpoint [bold]{row.id}[/bold] -> {escape(row.url)}")
    out.print(f"events: {row.events.replace(',', ', ')}")
    out.print(f"secret: {row.secret}", highlight=False, soft_wrap=True)


@endpoints_cli.command("list")
@one_line_errors
def list_endpoints() -> None:
    """Every endpoint with its backlog, success rate and last error."""
    def load(conn: Connection) -> tuple[list[Any], dict[str, endpoints.Stats]]:
        rows = endpoints.list_all(conn)
        return rows, endpoints.stats(conn, rows)

    rows, stats = _run(load)
    # One block per endpoint: a URL and an error message do not fit a terminal-wide table.
    for row in rows:
        st = stats[row.id]
        state = _state(row)
        rate = "-" if st.success_rate is None else (
            f"{st.success_rate:.1%} of the last {st.attempts_considered}")
        out.print(f"[bold]{row.id}[/bold] {escape(row.url)} {escape(state)}", soft_wrap=True)
        out.print(f"  events {row.events.replace(',', ', ')}; prefix "
                  f"{escape(row.p_transaction_id_prefix or '-')}; "
                  f"{escape(row.description or '')}", highlight=False, soft_wrap=True)
        out.print(f"  backlog {st.backlog} due, {st.pending} pending; success {rate}",
                  highlight=False)
        if st.last_error is not None:
            last = st.last_error
            out.print(escape(f"  last error {last.at:%Y-%m-%d %H:%M:%S}Z "
                             f"{last.status_code or 'no answer'}: "
                             f"{(last.response or '')[:200]}"), highlight=False, soft_wrap=True)
    if not rows:
        out.print("no endpoints; add one with `dlr endpoints add URL`")


@endpoints_cli.command("remove")
@one_line_errors
def remove(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id")],
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="Remove without asking (needed when not run from a terminal)")
    ] = False,
) -> None:
    """Remove an endpoint and its deliveries (pending ones are never sent)."""
    def load(conn: Connection) -> tuple[Any, endpoints.Stats]:
        row = endpoints.get(conn, endpoint_id)
        return row, endpoints.stats(conn, [row])[row.id]

    row, st = _run(load)
    what = f"endpoint {endpoint_id} ({row.url}) with {st.pending:,} pending deliveries"
    if not yes:
        if not _interactive():
            raise CliError(f"would remove {what}; add --yes to remove it")
        if not typer.confirm(f"remove {what}?", err=True):
            err.print("nothing removed")
            raise typer.Exit(1)
    _run(lambda conn: endpoints.remove(conn, endpoint_id))
    out.print(f"removed {endpoint_id}")


@endpoints_cli.command("update")
@one_line_errors
def update_endpoint(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id")],
    url: Annotated[str | None, typer.Option(help="A new URL (pending deliveries go there)")
                   ] = None,
    event: Annotated[list[EventName] | None, typer.Option(
        help="Event types to forward from now on (repeat for several)")] = None,
    prefix: Annotated[str | None, typer.Option(
        help="Only messages whose p_transaction_id starts with this ('' for all)")] = None,
    description: Annotated[str | None, typer.Option(help="A note for people")] = None,
) -> None:
    """Change an endpoint in place: its secret, deliveries and webhook-ids stay."""
    changes: dict[str, Any] = {}
    if url is not None:
        changes["url"] = _checked_url(url)
    if event:
        changes["events"] = [e.value for e in dict.fromkeys(event)]
    if prefix is not None:
        changes["p_transaction_id_prefix"] = _text(prefix, "--prefix", 255) or None
    if description is not None:
        changes["description"] = _text(description, "--description", 1000) or None
    if not changes:
        raise CliError("nothing to change: give --url, --event, --prefix or --description")
    row = _run(lambda conn: endpoints.change(conn, endpoint_id, changes))
    out.print(f"updated {row.id} -> {escape(row.url)}", soft_wrap=True)
    out.print(f"events: {row.events.replace(',', ', ')}; prefix "
              f"{escape(row.p_transaction_id_prefix or '-')}", highlight=False)


@endpoints_cli.command("pause")
@one_line_errors
def pause(endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id")]) -> None:
    """Stop sending to an endpoint: its deliveries wait (none fails) until it is resumed."""
    _run(lambda conn: endpoints.change(conn, endpoint_id, {"enabled": False}))
    out.print(f"paused {endpoint_id}; events are still queued for it "
              f"(`dlr endpoints resume {endpoint_id}`)", highlight=False)


@endpoints_cli.command("resume")
@one_line_errors
def resume(endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id")]) -> None:
    """Send to a paused (or disabled) endpoint again, what waited first."""
    _run(lambda conn: endpoints.change(conn, endpoint_id, {"enabled": True}))
    out.print(f"resumed {endpoint_id}")


@endpoints_cli.command("test")
@one_line_errors
def test_endpoint(endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id")],
                  ) -> None:
    """Send one signed `endpoint.test` event now and print what came of it."""
    from app.core.times import utcnow
    from app.forward.dispatcher import send_once
    from app.store.outbox import new_webhook_id

    row = _run(lambda conn: endpoints.get(conn, endpoint_id))
    now = utcnow()
    webhook_id = new_webhook_id()
    payload = json.dumps({"type": "endpoint.test", "timestamp": iso(now),
                          "data": {"endpoint_id": row.id}}, separators=(",", ":")).encode()
    sent = asyncio.run(send_once(row.url, endpoints.signing_keys(row, now), webhook_id,
                                 payload, settings().forward_timeout))
    outcome = f"HTTP {sent.status_code}" if sent.ok else (sent.error or "failed")
    out.print(escape(f"{'ok' if sent.ok else 'failed'}: {outcome[:300]} in "
                     f"{sent.latency_ms:.0f} ms ({webhook_id})"), highlight=False,
              soft_wrap=True)
    if not sent.ok:
        raise typer.Exit(1)


@endpoints_cli.command("rotate-secret")
@one_line_errors
def rotate_secret(endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id")],
                  ) -> None:
    """A new signing secret; the old one keeps signing beside it for 24 hours."""
    row = _run(lambda conn: endpoints.rotate(conn, endpoint_id))
    out.print(f"secret: {row.secret}", highlight=False, soft_wrap=True)
    previous = endpoints.previous_secrets(row, datetime.now(UTC))[-1]
    out.print(f"(the previous one, {mask(previous)}, keeps signing for 24 hours)",
              highlight=False)


@endpoints_cli.command("enable")
@one_line_errors
def enable(endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id")]) -> None:
    """Enable an endpoint again (one that answered 410 Gone is disabled); resumes it too."""
    _run(lambda conn: endpoints.enable(conn, endpoint_id))
    out.print(f"enabled {endpoint_id}")


@endpoints_cli.command("replay")
@one_line_errors
def replay(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id")],
    since: Annotated[str, typer.Option(help="Start of the window (ISO 8601, UTC if no offset)")],
    until: Annotated[str | None, typer.Option(help="End of the window (default: now)")] = None,
) -> None:
    """Send every event of a window again, each with its original webhook-id."""
    start = _time(since, "--since")
    end = _time(until, "--until") if until else datetime.now(UTC)
    if end <= start:
        raise CliError("--until must be after --since")
    queued = _run(lambda conn: endpoints.replay(conn, endpoint_id, since=start, until=end))
    out.print(f"queued {queued:,} deliveries to {endpoint_id}")


def _next(item: deliveries.Listed, now: datetime) -> str:
    """When a pending delivery goes next, as far as the database tells."""
    d = item.delivery
    if d.endpoint_paused_at is not None:
        return "waiting: its endpoint is paused"
    if d.lease_until is not None and d.lease_until > now:
        return "being attempted now"
    if d.next_attempt_at > now:
        return f"next attempt {d.next_attempt_at:%Y-%m-%d %H:%M:%S}Z"
    if d.attempts and now - d.next_attempt_at > timedelta(seconds=5):
        return (f"held back since {d.next_attempt_at:%H:%M:%S}Z: the endpoint keeps failing "
                "(circuit open), or no server is running")
    return "due now"


@deliveries_cli.command("list")
@one_line_errors
def list_deliveries(
    endpoint: Annotated[str | None, typer.Option(help="Only this endpoint's")] = None,
    status: Annotated[DeliveryStatus | None, typer.Option(help="Only in this state")] = None,
    msg_id: Annotated[str | None, typer.Option(help="Only this message's")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first")] = 20,
) -> None:
    """Deliveries, newest first, with their attempts."""
    endpoint = _text(endpoint, "--endpoint", 40)
    msg_id = _text(msg_id, "--msg-id", 255)
    items, _ = _run(lambda conn: deliveries.page(
        conn, endpoint_id=endpoint, status=status.value if status else None, msg_id=msg_id,
        limit=limit))
    now = datetime.now(UTC)
    # One block per delivery, each line short: a table of ids, errors and attempts does not
    # fit 80 columns.
    for item in items:
        d = item.delivery
        out.print(f"[bold]{d.id}[/bold] {d.status} {d.event_type} "
                  f"{escape(item.msg_id or '-')}", highlight=False)
        out.print(f"  to {d.endpoint_id}", highlight=False)
        out.print(f"  webhook-id {d.webhook_id}", highlight=False)
        if d.status == "pending":
            out.print(f"  {_next(item, now)}", highlight=False)
        if item.attempts:
            out.print(f"  {len(item.attempts)} attempts; the last: " + ", ".join(
                f"{a.attempted_at:%H:%M:%S} {a.status_code or 'none'} {a.latency_ms:.0f} ms"
                for a in item.attempts[-3:]), highlight=False)
        if d.last_error:
            out.print(escape(f"  last error: {d.last_error[:200]}"), highlight=False)
    if not items:
        out.print("no deliveries")


@deliveries_cli.command("retry")
@one_line_errors
def retry(
    delivery_id: Annotated[int, typer.Argument(help="The delivery's id")],
    wait: Annotated[float, typer.Option(
        min=0, max=3600,
        help="Seconds to wait for the attempt and print its outcome (0: do not wait)")] = 30,
) -> None:
    """Attempt a delivery again now, with the same webhook-id, and print what came of it."""
    before = len(_run(lambda conn: deliveries.retry(conn, delivery_id)).attempts)
    if wait == 0:
        out.print(f"delivery {delivery_id} will be attempted again within a second")
        return
    deadline = time.monotonic() + wait
    with err.status(f"waiting for delivery {delivery_id}'s attempt"):
        while True:
            item = _run(lambda conn: deliveries.one(conn, delivery_id))
            if len(item.attempts) > before or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
    if len(item.attempts) <= before:
        out.print(f"no attempt within {wait:g} s: it stays queued (a running server sends "
                  f"it; {_next(item, datetime.now(UTC))})", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    a = item.attempts[-1]
    answer = f"HTTP {a.status_code}" if a.status_code is not None else "no answer"
    out.print(f"{item.delivery.status}: {answer} in {a.latency_ms:.0f} ms", highlight=False)
    if not a.ok:
        if a.response:
            out.print(escape(f"  {a.response[:200]}"), highlight=False)
        if item.delivery.status == "pending":
            out.print(f"  {_next(item, datetime.now(UTC))}", highlight=False)
        raise typer.Exit(1)
