"""`dlr endpoints ...` and `dlr deliveries ...`: forwarding from the command line, straight on
the database (a running server picks changes up within a second)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Column, Table
from sqlalchemy import Connection

from app.cli.common import CliError, one_line_errors, out, settings
from app.core.targets import RefusedAddress, check_url, refuse_if_blocked
from app.core.webhook_signing import mask
from app.forward import deliveries, endpoints

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
        url = check_url(url)
        asyncio.run(refuse_if_blocked(url))
    except (ValueError, RefusedAddress) as exc:
        raise CliError(str(exc)) from None
    return url


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
        state = "enabled" if row.enabled else f"disabled ({row.disabled_reason})"
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
def remove(endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id")]) -> None:
    """Remove an endpoint and its deliveries."""
    _run(lambda conn: endpoints.remove(conn, endpoint_id))
    out.print(f"removed {endpoint_id}")


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
    """Enable an endpoint again (one that answered 410 Gone is disabled)."""
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


@deliveries_cli.command("list")
@one_line_errors
def list_deliveries(
    endpoint: Annotated[str | None, typer.Option(help="Only this endpoint's")] = None,
    status: Annotated[DeliveryStatus | None, typer.Option(help="Only in this state")] = None,
    msg_id: Annotated[str | None, typer.Option(help="Only this message's")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first")] = 20,
) -> None:
    """Deliveries, newest first, with their attempts."""
    items, _ = _run(lambda conn: deliveries.page(
        conn, endpoint_id=endpoint, status=status.value if status else None, msg_id=msg_id,
        limit=limit))
    table = Table(Column("id", no_wrap=True), Column("endpoint", no_wrap=True), "event",
                  "msg_id", "status", "attempts (code, ms)", "last error")
    for item in items:
        d = item.delivery
        table.add_row(
            str(d.id), d.endpoint_id, f"{d.event_type}\n{d.webhook_id}",
            escape(item.msg_id or ""),
            d.status + (f"\nnext {d.next_attempt_at:%H:%M:%S}" if d.status == "pending" else ""),
            "\n".join(f"{a.attempted_at:%H:%M:%S} {a.status_code or '-'} {a.latency_ms:.0f}"
                      for a in item.attempts[-5:]),
            escape((d.last_error or "")[:80]))
    out.print(table)


@deliveries_cli.command("retry")
@one_line_errors
def retry(delivery_id: Annotated[int, typer.Argument(help="The delivery's id")]) -> None:
    """Attempt a delivery again now, with the same webhook-id."""
    _run(lambda conn: deliveries.retry(conn, delivery_id))
    out.print(f"delivery {delivery_id} will be attempted again within a second")
