"""What every `dlr` command shares: the Typer app, one-line errors, the consoles, settings and
the database checks."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings, SettingsError, load_settings

if TYPE_CHECKING:

    pass

cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Delivery-report receiver for the provider's Viber/SMS bulk API.")
out = Console()
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A failure to report as one line."""


class LogLevel(StrEnum):
    """uvicorn's levels; a choice, so a typo is a usage error and not a traceback."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def one_line_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CliError, SettingsError) as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        except SQLAlchemyError as exc:
            err.print(f"[red]error:[/red] database: {str(exc).splitlines()[0]}", highlight=False)
        raise typer.Exit(2)

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    return load_settings()


def _show_version(value: bool) -> None:
    if value:
        out.print(f"dlr {package_version('dlr-receiver')}", highlight=False)
        raise typer.Exit()


@cli.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_show_version, help="Print the version and exit")
    ] = False,
) -> None:
    """Delivery-report receiver for the provider's Viber/SMS bulk API."""


def require_database(cfg: Settings) -> None:
    """Stop unless the SQLite file exists and holds the schema.

    SQLite creates a missing file on first connect, so a command run from the wrong
    directory would otherwise read (or record sends into) a new, empty `./dlr.db`.
    PostgreSQL URLs are used as given: connecting never creates a database there.
    """
    import sqlite3

    from sqlalchemy.engine import make_url

    if not cfg.is_sqlite:
        return
    name = make_url(cfg.sqlalchemy_url).database
    if not name or name == ":memory:" or name.startswith("file:"):
        return
    path = Path(name).resolve()
    hint = ("run `dlr migrate` (or `dlr serve`) to create it, or set DLR_DATABASE_URL to "
            "the database you mean")
    if not path.is_file():
        raise CliError(f"no database at {path} (DLR_DATABASE_URL={cfg.database_url}); {hint}")
    # Read-only, so even this check cannot create or change anything.
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=cfg.db_timeout)
    try:
        migrated = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                "AND name = 'alembic_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise CliError(f"{path} is not a usable SQLite database ({exc}); {hint}") from None
    finally:
        conn.close()
    if migrated is None:
        raise CliError(f"the database at {path} has no schema; {hint}")


def migrate_database(cfg: Settings) -> None:
    from app.store.db import make_engine
    from app.store.migrate import upgrade

    engine = make_engine(cfg, pool_size=1)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


