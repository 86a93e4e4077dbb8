"""`dlr export`: every matching message to a file or stdout, as the REST export writes it,
straight from the database in chunks, with a progress bar."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from app.cli.common import CliError, cli, err, one_line_errors, require_database, settings
from app.core.notifications import Status


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"{name} must be an ISO 8601 time, e.g. 2026-11-27T10:00:00Z") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@cli.command("export")
@one_line_errors
def export(
    campaign: Annotated[str | None, typer.Option(help="Only this campaign's messages")] = None,
    p_transaction_id: Annotated[str | None, typer.Option(help="Only this p_transaction_id")
                                ] = None,
    status: Annotated[Status | None, typer.Option(help="Only messages in this status")] = None,
    since: Annotated[str | None, typer.Option(help="First known at or after (ISO 8601, UTC)")
                     ] = None,
    until: Annotated[str | None, typer.Option(help="First known before (ISO 8601, UTC)")
                     ] = None,
    format_: Annotated[str, typer.Option("--format", help="csv or ndjson")] = "csv",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, help="File to write (default: stdout)")] = None,
) -> None:
    """Every matching message, one row per recipient (msg_id, campaign, p_transaction_id,
    phone, status, status_extended, sent_at, delivered_at, seen_at, last reply)."""
    from app.query.export import Filters, Format, chunks_sync
    from app.store import counts
    from app.store.db import make_engine

    try:
        fmt = Format(format_)
    except ValueError:
        raise CliError("--format must be csv or ndjson") from None
    filters = Filters(campaign, p_transaction_id, status, _time(since, "--since"),
                      _time(until, "--until"))
    cfg = settings()
    require_database(cfg)
    engine = make_engine(cfg, pool_size=1)
    out = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        with engine.connect() as conn:
            total: int | None = None
            if campaign is not None and not (p_transaction_id or status or since or until):
                total = counts.window(conn, since=None, until=None,
                                     campaign=campaign).get("messages")
            with Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=err, transient=output is None) as bar:
                task = bar.add_task("export", total=total)
                written = 0
                for text, rows in chunks_sync(conn, filters, fmt):
                    out.write(text)
                    written += rows
                    bar.update(task, completed=written)
    finally:
        if output:
            out.close()
        engine.dispose()
    err.print(f"{written:,} messages exported" + (f" to {output}" if output else ""),
              highlight=False)
