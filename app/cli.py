"""The `dlr` command line. Errors are one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from fastapi import HTTPException
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings, SettingsError, load_settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Delivery-report receiver for the provider's Viber/SMS bulk API.")
out = Console()
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A failure to report as one line."""


def one_line_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CliError, SettingsError) as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
        except SQLAlchemyError as exc:
            err.print(f"[red]error:[/red] database: {str(exc).splitlines()[0]}", highlight=False)
        raise typer.Exit(2)

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    return load_settings()


def migrate_database(cfg: Settings) -> None:
    from app.db import make_engine
    from app.migrate import upgrade

    engine = make_engine(cfg, pool_size=1)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


@cli.command()
@one_line_errors
def migrate() -> None:
    """Bring the database schema up to date."""
    migrate_database(settings())
    out.print("database is up to date")


@cli.command()
@one_line_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Migrate the database, then serve the receiver and the API."""
    import uvicorn

    cfg = settings()
    migrate_database(cfg)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        # X-Forwarded-For is judged by DLR_TRUSTED_PROXIES alone, never by uvicorn's default
        # of trusting loopback, so a local proxy cannot be used to forge an allowed address.
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=16 * 1024,
    )


@cli.command()
@one_line_errors
def status(msg_id: Annotated[str, typer.Argument(help="The provider's msg_id")]) -> None:
    """Show a message's current status and its timeline."""
    from app.api import get_message
    from app.db import make_engine

    engine = make_engine(settings(), pool_size=1)
    try:
        with Session(engine) as session:
            try:
                message = get_message(msg_id, session)
            except HTTPException as exc:
                raise CliError(str(exc.detail)) from None
    finally:
        engine.dispose()
    head = Table(show_header=False, box=None)
    for name in ("msg_id", "status", "status_extended", "phone", "p_transaction_id",
                 "sent_at", "delivered_at", "seen_at", "updated_at"):
        value = getattr(message, name)
        head.add_row(f"[bold]{name}[/bold]", "-" if value is None else str(value))
    out.print(head)
    events = Table("received_at", "type", "status", "status_extended", "text", title="events")
    for e in message.events:
        events.add_row(e.received_at.isoformat(), e.type, e.status or "",
                       e.status_extended or "", e.text or "")
    out.print(events)


def main() -> None:
    cli(prog_name="dlr")


if __name__ == "__main__":
    sys.exit(main())
