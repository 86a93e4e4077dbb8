"""Engine, metadata conventions, the column types shared by the tables, and `Database`, the
one owner of an application's connections.

Engines are built inside the application's lifespan (or by a command), never at import
time, so tests and tools can point them anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar, cast

import psycopg
from anyio import CapacityLimiter, to_thread
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import (
    ClauseElement,
    DateTime,
    Engine,
    MetaData,
    Select,
    TextClause,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.dialects.sqlite.pysqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import TypeDecorator

from app.config import Settings
from app.store.keyed_reads import KeyedRead, KeyedReads

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the way out on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@lru_cache(maxsize=4)
def _time_binder(dialect: Dialect) -> Callable[[Any], Any]:
    """How the dialect binds a UTCDateTime before its driver adapts it (naive UTC on SQLite),
    taken from the column type."""
    return UTCDateTime().bind_processor(dialect) or (lambda v: v)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run beside the single writer; synchronous=FULL makes an acknowledged
    # notification survive a power cut, not only a process kill.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(settings: Settings, *, pool_size: int = 8, reader: bool = False) -> Engine:
    """The engine; `reader=True` gives the API's PostgreSQL reads their own pool in
    autocommit, without the pre-ping: a lookup is then one round trip, not four."""
    url = settings.sqlalchemy_url
    if settings.is_sqlite:
        engine = create_engine(
            url,
            connect_args={"timeout": settings.db_timeout, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=not reader,
        **({"isolation_level": "AUTOCOMMIT"} if reader else {}),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=settings.db_timeout,
        connect_args={"connect_timeout": max(1, int(settings.db_timeout))},
    )


# --- the process's one owner of database connections ----------------------------------------

T = TypeVar("T")
# A prebuilt read: a select, or literal SQL.
Statement = Select[Any] | TextClause
# Reads on worker threads (SQLite pages, the dashboard's aggregates) get their own limiter,
# not anyio's process-wide one: nothing else (a provider call, another app in the same
# process) can then take their threads, and they cannot take anyone else's.
READ_THREADS = 8
# Failures after which a read is tried once more on a fresh connection: a pooled connection
# that the server ended while idle (restart, administrator) fails on first use.
_STALE = (psycopg.OperationalError, psycopg.InterfaceError)


class Database:
    """Owns the engines, pools and read helpers of one application instance.

    - `engine`: the engine of a writer in this process (app/store/writers.py), of migrations
      and of the forwarder.
    - reads: on PostgreSQL an async psycopg pool in autocommit (a worker thread's hand-off
      costs more than an indexed read) plus an autocommit engine for ORM aggregates; on SQLite
      the same engine, read in worker threads under `read_limiter`.
    The lifespan only calls `open()` and `close()`.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.is_sqlite = settings.is_sqlite
        self.engine = make_engine(settings, pool_size=READ_THREADS)
        self.reader = self.engine if self.is_sqlite else make_engine(
            settings, pool_size=READ_THREADS, reader=True)
        self.read_pool: AsyncConnectionPool | None = None if self.is_sqlite else (
            AsyncConnectionPool(
                settings.libpq_url, min_size=1, max_size=READ_THREADS, open=False,
                timeout=settings.db_timeout,
                kwargs={"autocommit": True, "options": "-c TimeZone=UTC"}))
        self.read_limiter = CapacityLimiter(READ_THREADS)
        self.keyed = KeyedReads(self._read_on_loop, self.engine.dialect.name)

    async def open(self) -> None:
        if self.read_pool is not None:
            await self.read_pool.open(wait=False)

    async def close(self) -> None:
        self.engine.dispose()
        if self.reader is not self.engine:
            self.reader.dispose()
        if self.read_pool is not None:
            await self.read_pool.close()

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run a blocking read in one of the read threads."""
        return await to_thread.run_sync(fn, limiter=self.read_limiter)

    async def session(self, fn: Callable[[Session], T]) -> T:
        """Run `fn` with an ORM session on the read engine, in a read thread."""
        def run() -> T:
            with Session(self.reader) as session:
                return fn(session)

        return await self.in_thread(lambda: _once_more_if_dead(run))

    def _rows(self, statement: Statement, params: dict[str, Any]) -> list[Any]:
        """SQLite: the statement compiled once, run on the driver's own cursor (SQLAlchemy's
        execution and result processing cost a lookup three times the query itself)."""
        read = sqlite_read(statement)
        given = read.defaults | params
        args = tuple(_sqlite_param(given[name]) for name in read.names)
        connection = self.reader.raw_connection()
        try:
            cursor = connection.driver_connection.execute(read.sql, args)  # type: ignore[union-attr]
            rows: list[Any] = cursor.fetchall()
        finally:
            connection.close()
        if not read.times:
            return rows
        out = []
        for row in rows:
            values = list(row)
            for i in read.times:
                if values[i] is not None:
                    values[i] = _utc(values[i])
            out.append(values)
        return out

    async def read_rows(self, statement: Statement, params: dict[str, Any], *,
                        thread: bool = True) -> list[Any]:
        """Run a prebuilt read without holding up the event loop that answers the callbacks.

        PostgreSQL: on the async pool, the statement compiled once. SQLite: in a read thread,
        since rows not in cache can take milliseconds; `thread=False` reads on the loop, for
        the lookups' keyed reads, where a local indexed read is cheaper than any hand-off. A
        connection that turns out dead is replaced and the read repeated once, as the writers
        do.
        """
        if self.read_pool is None:
            if thread:
                return await self.in_thread(lambda: self._rows(statement, params))
            return self._rows(statement, params)
        sql, defaults = postgresql_sql(statement)
        params = defaults | params if defaults else params
        for attempt in (1, 2):
            try:
                async with self.read_pool.connection() as conn:
                    cursor = await conn.execute(sql, params)
                    return await cursor.fetchall()
            except _STALE:
                if attempt == 2:
                    raise
                await self.read_pool.check()  # drop every idle connection the restart killed
        raise AssertionError("unreachable")

    async def _read_on_loop(self, statement: Statement, params: dict[str, Any]) -> list[Any]:
        return await self.read_rows(statement, params, thread=False)

    async def read_keyed(self, read: KeyedRead, key: str) -> list[Any]:
        """The rows of one key, read on the loop in one query with every other key asked for
        in the same turn (app/store/keyed_reads.py)."""
        return await self.keyed.rows(read, key)

    async def ping(self) -> None:
        """Raise unless the database answers (for /readyz)."""
        if self.read_pool is not None:
            await self.read_rows(_PING, {})
            return
        await self.in_thread(lambda: self._rows(_PING, {}))


def _once_more_if_dead(read: Callable[[], T]) -> T:
    """`read()`, repeated once if its pooled connection turned out dead (SQLAlchemy then
    invalidates the pool's older connections, so the second try gets a fresh one)."""
    try:
        return read()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        return read()


@dataclass(frozen=True, slots=True)
class SqliteRead:
    """A prebuilt read as SQLite's driver takes it."""

    sql: str
    names: tuple[str, ...]          # the bound parameters, in the order of their `?`
    defaults: dict[str, Any]        # values the statement binds itself (SQLite's OFFSET 0)
    times: tuple[int, ...]          # result columns of UTCDateTime (stored as text)


_SQLITE = sqlite_dialect()


@lru_cache(maxsize=256)
def sqlite_read(statement: ClauseElement) -> SqliteRead:
    compiled = cast(SQLCompiler, statement.compile(dialect=_SQLITE))
    columns = getattr(statement, "selected_columns", ())
    # Only values the statement set itself: a parameter the caller must give stays required.
    defaults = {name: value for name, value in compiled.params.items()
                if not compiled.binds[name].required}
    return SqliteRead(str(compiled), tuple(compiled.positiontup or ()), defaults,
                      tuple(i for i, c in enumerate(columns) if isinstance(c.type, UTCDateTime)))


def sqlite_time_text(value: datetime) -> str:
    """A UTCDateTime as SQLite stores it: naive UTC with six digits of microseconds, the text
    SQLAlchemy's SQLite DATETIME writes. (sqlite3's own adapter, `isoformat(" ")`, drops
    `.000000` at a whole second, and the shorter text then sorts before the same instant
    written by SQLAlchemy.) `_utc` reads it back."""
    return cast(datetime, _time_binder(_SQLITE)(value)).isoformat(" ", "microseconds")


def stamper(dialect: Dialect) -> Callable[[datetime], Any]:
    """A time as the hand-written hot-path SQL binds it: SQLite's stored text (the column
    type's own format), ISO 8601 in PostgreSQL's JSON batches. The write path converts each
    notification's time once for all its columns (the conversion was a tenth of a writer's
    time per row); sqlite3's adapter would be a Python call per time parameter."""
    if dialect.name == "postgresql":
        return datetime.isoformat
    return sqlite_time_text


def _sqlite_param(value: Any) -> Any:
    return sqlite_time_text(value) if isinstance(value, datetime) else value


def _utc(stored: str) -> datetime:
    """SQLite's stored text of a UTCDateTime as the type reads it: aware UTC (parsed with
    the offset appended, six times faster than `.replace(tzinfo=UTC)` afterwards)."""
    return datetime.fromisoformat(stored + "+00:00")


_PING = text("SELECT 1")
_POSTGRESQL = psycopg_dialect()  # type: ignore[no-untyped-call]


@lru_cache(maxsize=256)
def postgresql_sql(statement: ClauseElement) -> tuple[str, dict[str, Any]]:
    """SQL text of a prebuilt statement, compiled once (compiling costs more than running an
    indexed read: a third of a page's time when done per request), and the values of the
    parameters the statement binds itself (its constants)."""
    compiled = cast(SQLCompiler, statement.compile(dialect=_POSTGRESQL))
    return str(compiled), {name: value for name, value in compiled.params.items()
                           if not compiled.binds[name].required}
