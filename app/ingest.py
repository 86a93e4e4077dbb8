"""The write path. Every notification, rejection and send record reaches the database here.

Requests hand their item to the `Ingestor` and wait. A writer takes whatever has queued up,
writes it in one transaction (group commit: one fsync for many callbacks) and only then
answers each waiting request. If the commit fails, every request in the batch
learns it and answers 503, so nothing is acknowledged that is not stored.

Message rows are merged by one generated upsert (`MESSAGE_UPSERT`): each column's rule comes
from its `Merge` in app/models.py, and the precedence of statuses from `RANK` in
app/notifications.py. The SQL is the only place the rule is applied, so the result is the
same whatever order the notifications arrive in, and the database reports each status
change (for forwarding) without a second read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from itertools import chain
from typing import Any, Literal, Protocol, TypeVar, cast, runtime_checkable

from sqlalchemy import Column, Connection, Engine, Table, insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app import metrics
from app.db import stamper
from app.models import Event, Merge, Message, Rejected, Send
from app.notifications import FINAL_RANK, RANK, Notification, Rejection, Status, msg_key
from app.schemas import MessageSummary

log = logging.getLogger(__name__)

Outcome = Literal["new", "duplicate", "rejected"]
T = TypeVar("T")


@dataclass(slots=True)
class SendRecord:
    """What one request to the provider gave: its `sends` row and the msg_ids it returned."""

    p_transaction_id: str
    kind: str
    sending_method: str
    sender: str | None
    phones: list[str]
    outcome: str
    code: int | None
    tech_message: str | None
    attempts: int
    created_at: datetime
    msg_ids: dict[str, str] = field(default_factory=dict)  # phone -> msg_id
    send_id: int | None = None  # set once written


Item = Notification | Rejection | SendRecord


class StoreUnavailable(RuntimeError):
    """The database could not commit; the caller must not acknowledge."""


@dataclass(frozen=True, slots=True)
class Change:
    """A forwarded event's source: a status change or a new reply, as committed."""

    type: Literal["message.status", "message.reply"]
    message: dict[str, Any]  # MessageSummary as the API shows it, plus previous_status, sequence
    msg_key: str
    p_transaction_id: str | None
    sequence: int
    occurred_at: datetime
    reply: dict[str, Any] | None = None


class Forwarding(Protocol):
    """The outbox the write path fills in the same transaction (app/forwarding)."""

    # An SQL condition, true when anyone listens: asked in the events insert's RETURNING.
    active_sql: str

    def enqueue(self, conn: Connection, changes: Sequence[Change]) -> int: ...


# --- SQL generated from the models ----------------------------------------------------------

_PG_TYPES = {"BIGINT": "bigint", "INTEGER": "integer", "BOOLEAN": "boolean",
             "BYTEA": "bytea", "TIMESTAMP WITH TIME ZONE": "timestamptz"}


def _pg_type(column: Column[Any]) -> str:
    from sqlalchemy.dialects import postgresql

    compiled = column.type.compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]
    return _PG_TYPES.get(compiled, "text")


def _columns(table: Table) -> tuple[tuple[str, str], ...]:
    """(name, PostgreSQL type) of every column the write path fills: all but the row id."""
    return tuple((c.name, _pg_type(c)) for c in table.columns if not c.primary_key)


EVENT_COLUMNS = _columns(Event.__table__)  # type: ignore[arg-type]
MESSAGE_COLUMNS = _columns(Message.__table__)  # type: ignore[arg-type]
_MESSAGE_NAMES = tuple(name for name, _ in MESSAGE_COLUMNS)
_EVENT_NAMES = tuple(name for name, _ in EVENT_COLUMNS)


def _rank_sql() -> tuple[str, str]:
    """`wins` and `changed` conditions, from RANK: a lower status never overwrites a higher
    one; between two final ones (equal rank) the later-received wins."""
    wins = (f"(excluded.status_rank > messages.status_rank OR (excluded.status_rank = "
            f"messages.status_rank AND excluded.status_rank = {FINAL_RANK}))")
    return wins, f"({wins} AND excluded.status <> messages.status)"


def _merge_sql() -> str:
    wins, changed = _rank_sql()
    templates: dict[Merge, str | None] = {
        Merge.KEY: None,
        Merge.KEEP: None,
        Merge.FIRST: "COALESCE(messages.{c}, excluded.{c})",
        Merge.SEND: "COALESCE(excluded.{c}, messages.{c})",
        Merge.RANKED: f"CASE WHEN {wins} THEN excluded.{{c}} ELSE messages.{{c}} END",
        Merge.ON_CHANGE: f"CASE WHEN {changed} THEN excluded.{{c}} ELSE messages.{{c}} END",
        Merge.PREVIOUS: f"CASE WHEN {changed} THEN messages.status ELSE messages.{{c}} END",
        # A row that sets a status counts a change; any other (a reply: 1, a send: 0) adds
        # what it carries.
        Merge.SEQUENCE: (f"messages.{{c}} + CASE WHEN excluded.status_event IS NULL "
                         f"THEN excluded.{{c}} WHEN {changed} THEN 1 ELSE 0 END"),
        Merge.LATEST: "excluded.{c}",
    }
    sets = []
    for column in Message.__table__.columns:
        if column.primary_key:
            continue
        rule = column.info.get("merge")
        if not isinstance(rule, Merge):
            raise TypeError(f"messages.{column.name} has no Merge rule in its info")
        template = templates[rule]
        if template is not None:
            sets.append(f"{column.name} = {template.format(c=column.name)}")
    return ", ".join(sets)


MESSAGE_UPSERT = f"ON CONFLICT (msg_key) DO UPDATE SET {_merge_sql()}"


@lru_cache(maxsize=64)
def _insert_sql(dialect: str, table: str, columns: tuple[tuple[str, str], ...], rows: int,
                tail: str) -> str:
    # The hot path speaks SQL directly: SQLAlchemy Core would compile and type-process every
    # batch, which costs more than the database work itself.
    names = ", ".join(name for name, _ in columns)
    if dialect == "postgresql":
        # The whole batch as one JSON parameter: one statement for any row count, so
        # PostgreSQL plans it once, and Python serialises it in C rather than value by value.
        record = ", ".join(f"{n} {'text' if t == 'bytea' else t}" for n, t in columns)
        select = ", ".join(f"decode({n}, 'hex')" if t == "bytea" else n for n, t in columns)
        return (f"INSERT INTO {table} ({names}) SELECT {select} "
                f"FROM json_to_recordset(%s::json) AS r({record}) {tail}")
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({names}) VALUES {', '.join([row] * rows)} {tail}"


def _json_value(value: Any) -> Any:
    """JSON for what json.dumps cannot write itself: the bytes of a reply's raw text."""
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} in a write-path row")


def _bulk_insert(conn: Connection, table: str, columns: tuple[tuple[str, str], ...],
                 rows: list[tuple[Any, ...]], tail: str, chunk: int = 500) -> list[Any]:
    """Insert many rows in few statements; returns the RETURNING rows, if any. Times in
    `rows` are already bound (`stamper`)."""
    returned: list[Any] = []
    postgres = conn.dialect.name == "postgresql"
    names = [name for name, _ in columns]
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        sql = _insert_sql(conn.dialect.name, table, columns, 0 if postgres else len(part), tail)
        params: tuple[Any, ...]
        if postgres:
            params = (json.dumps([dict(zip(names, r, strict=True)) for r in part],
                                 default=_json_value),)
        else:
            params = tuple(chain.from_iterable(part))
        result = conn.exec_driver_sql(sql, params)
        if result.returns_rows:
            returned.extend(result.fetchall())
    return returned


def _insert_events(conn: Connection, rows: list[tuple[Any, ...]], forwarding: Forwarding | None
                   ) -> tuple[set[str], bool]:
    """Insert the events that are not stored yet: (the dedupe keys of those that were new,
    whether any forwarding endpoint listens)."""
    dedupe = _EVENT_NAMES.index("dedupe_key")
    insert_tail = "ON CONFLICT (dedupe_key) DO NOTHING"
    if conn.dialect.name == "postgresql":
        returning = "RETURNING dedupe_key" + (
            f", {forwarding.active_sql}" if forwarding is not None else "")
        returned = _bulk_insert(conn, "events", EVENT_COLUMNS, rows, f"{insert_tail} {returning}")
        return {r[0] for r in returned}, forwarding is not None and any(r[1] for r in returned)
    # SQLite: no RETURNING. sqlite3 steps (and hands the GIL back and forth with the event
    # loop) once per returned row; the rows a statement inserted are a contiguous rowid range
    # instead (one writer holds the database's write lock), read back in one step.
    new: set[str] = set()
    listening = False
    for i in range(0, len(rows), SQLITE_ROWS):
        part = rows[i:i + SQLITE_ROWS]
        result = conn.exec_driver_sql(
            _insert_sql("sqlite", "events", EVENT_COLUMNS, len(part), insert_tail),
            tuple(chain.from_iterable(part)))
        inserted, last = result.rowcount, result.lastrowid
        if inserted == len(part) and forwarding is None:
            new.update(r[dedupe] for r in part)
        elif inserted > 0:
            keys, active = conn.exec_driver_sql(
                "SELECT group_concat(dedupe_key, ','), "
                f"{forwarding.active_sql if forwarding is not None else 'false'} "
                "FROM events WHERE id BETWEEN ? AND ?", (last - inserted + 1, last)).one()
            new.update(keys.split(","))
            listening = listening or bool(active)
    return new, listening


# SQLite statements take at most this many rows (11 parameters each, far below its limit).
SQLITE_ROWS = 500


def _row(values: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    """A row tuple in the columns' order, absent columns NULL."""
    return tuple(map(values.get, names))


# --- message rows -----------------------------------------------------------------------------

def event_row(n: Notification, stamp: Any) -> tuple[Any, ...]:
    """The timeline row of a notification (every column of `events` but the id); `stamp` is
    its time, bound."""
    return _row({
        "dedupe_key": n.dedupe_key, "msg_key": n.msg_key, "type": n.type,
        "status": n.status.value if n.status else None, "status_extended": n.status_extended,
        "unknown_status_extended": n.unknown_status_extended, "text": n.text,
        "text_raw": n.text_raw, "p_transaction_id": n.p_transaction_id,
        "received_at": stamp,
    }, _EVENT_NAMES)


def notification_row(n: Notification, stamp: Any) -> tuple[Any, ...]:
    """What one new notification says about its message (merged by MESSAGE_UPSERT)."""
    status = n.message_status
    shown = status or Status.ACCEPTED
    return _row({
        "msg_key": n.msg_key, "msg_id": n.msg_id, "p_transaction_id": n.p_transaction_id,
        "status": shown.value, "status_rank": RANK[shown],
        "status_extended": n.status_extended if status else None,
        "status_event": n.dedupe_key if status else None,
        "event_seq": 1 if n.type == "reply" or status is not None else 0,
        # seen implies delivered
        "delivered_at": stamp if shown in (Status.DELIVERED, Status.SEEN) else None,
        "seen_at": stamp if shown is Status.SEEN else None,
        "created_at": stamp, "updated_at": stamp,
    }, _MESSAGE_NAMES)


def send_rows(record: SendRecord, stamp: Any) -> list[tuple[Any, ...]]:
    """One accepted message per msg_id the provider returned; `stamp`: the send's time."""
    return [_row({
        "msg_key": msg_key(msg_id), "msg_id": msg_id, "p_transaction_id": record.p_transaction_id,
        "phone": phone, "sender": record.sender, "kind": record.kind, "send_id": record.send_id,
        "status": Status.ACCEPTED.value, "status_rank": RANK[Status.ACCEPTED], "event_seq": 0,
        "sent_at": stamp, "created_at": stamp, "updated_at": stamp,
    }, _MESSAGE_NAMES) for phone, msg_id in record.msg_ids.items()]


MessageRow = tuple[tuple[Any, ...], Notification | None]  # the row, and the notification or None
_KEY = _MESSAGE_NAMES.index("msg_key")


def _rounds(rows: list[MessageRow]) -> list[list[MessageRow]]:
    """Split rows so that no message occurs twice in one statement (PostgreSQL refuses to
    update a row twice in one command), keeping each message's rows in arrival order."""
    rounds: list[list[MessageRow]] = []
    seen: dict[str, int] = {}
    for row in rows:
        key = row[0][_KEY]
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(row)
    return rounds


def _aware(value: Any) -> Any:
    """A time from RETURNING: SQLite gives text, PostgreSQL an aware datetime."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value


def _change(row: Any, n: Notification) -> Change | None:
    """The forwarded event a committed notification caused, read off its returned row."""
    values = dict(zip(_MESSAGE_NAMES, row, strict=True))
    if n.type == "reply":
        kind: Literal["message.status", "message.reply"] = "message.reply"
    elif values["status_event"] == n.dedupe_key:
        kind = "message.status"
    else:
        return None  # a late lower status, or the same status again: nothing changed
    for name in ("sent_at", "delivered_at", "seen_at", "created_at", "updated_at"):
        values[name] = _aware(values[name])
    message = MessageSummary.model_validate(values).model_dump(mode="json")
    message["previous_status"] = values["previous_status"] if kind == "message.status" else None
    message["sequence"] = values["event_seq"]
    return Change(
        type=kind, message=message, msg_key=n.msg_key,
        p_transaction_id=values["p_transaction_id"], sequence=values["event_seq"],
        occurred_at=n.received_at,
        reply={"text": n.text or "", "received_at": n.received_at.isoformat()}
        if kind == "message.reply" else None,
    )


# SQLite: the merged rows of a round read back in one step, as one JSON array. RETURNING
# steps once per row, and sqlite3 hands the GIL to the event loop and back at every step
# (beside a thread spinning as a busy loop would, a batch of 36 with forwarding on took
# 20.0 ms with RETURNING, 16.0 ms this way).
_SQLITE_READ_BACK = (
    f"SELECT json_group_array(json_array({', '.join(_MESSAGE_NAMES)})) FROM messages "
    "WHERE msg_key IN (SELECT value FROM json_each(?))")


def upsert_messages(conn: Connection, rows: list[MessageRow], *, returning: bool
                    ) -> list[Change]:
    """Merge message rows; with `returning`, report the status changes and replies."""
    changes: list[Change] = []
    sqlite = conn.dialect.name == "sqlite"
    tail = MESSAGE_UPSERT + (f" RETURNING {', '.join(_MESSAGE_NAMES)}"
                             if returning and not sqlite else "")
    for part in _rounds(rows):
        # Sorted keys make concurrent writers (replicas) lock rows in the same order.
        part.sort(key=lambda r: r[0][_KEY])
        returned = _bulk_insert(conn, "messages", MESSAGE_COLUMNS, [r for r, _ in part], tail)
        if returning and sqlite:
            # Read after each round, so a row is as that round left it, as RETURNING gives.
            keys = json.dumps([row[_KEY] for row, n in part if n is not None])
            returned = json.loads(conn.exec_driver_sql(_SQLITE_READ_BACK, (keys,)).scalar_one())
        if returning:
            by_key = {r[0]: r for r in returned}
            for row, n in part:
                if n is not None:
                    change = _change(by_key[row[_KEY]], n)
                    if change is not None:
                        changes.append(change)
    return changes


def _rejected_row(r: Rejection) -> dict[str, Any]:
    return {"reason": r.reason, "method": r.method, "content_type": r.content_type,
            "query": r.query, "body": r.body, "source_ip": r.source_ip,
            "received_at": r.received_at}


def _store_send(conn: Connection, record: SendRecord) -> None:
    record.send_id = conn.execute(
        insert(Send).returning(Send.id),
        {"p_transaction_id": record.p_transaction_id, "kind": record.kind,
         "sending_method": record.sending_method, "sender": record.sender,
         "phones": ",".join(record.phones), "outcome": record.outcome, "code": record.code,
         "tech_message": record.tech_message, "attempts": record.attempts,
         "created_at": record.created_at},
    ).scalar_one()


@dataclass(slots=True)
class Stored:
    outcomes: list[Outcome]
    forwarded: int = 0  # deliveries created for forwarding


def store(conn: Connection, items: Sequence[Item], forwarding: Forwarding | None = None
          ) -> Stored:
    """Write one batch inside the caller's transaction; the caller commits."""
    outcomes: list[Outcome] = ["rejected"] * len(items)
    rejected = [_rejected_row(i) for i in items if isinstance(i, Rejection)]
    if rejected:
        conn.execute(insert(Rejected), rejected)

    stamp = stamper(conn.dialect)
    message_rows: list[MessageRow] = []
    first: dict[str, int] = {}  # dedupe_key -> index of its first copy in this batch
    for idx, item in enumerate(items):
        if isinstance(item, Notification):
            outcomes[idx] = "duplicate"
            first.setdefault(item.dedupe_key, idx)
        elif isinstance(item, SendRecord):
            _store_send(conn, item)
            outcomes[idx] = "new"
            message_rows.extend((row, None) for row in send_rows(item, stamp(item.created_at)))

    listening = False  # whether any forwarding endpoint is enabled, asked with the events
    if first:
        # In dedupe_key order: writers in other processes (a second worker, a replica) that
        # insert the same notifications then wait for each other in one order, never in a
        # cycle (the message upsert sorts its rows for the same reason).
        order = sorted(first.values(), key=lambda i: cast(Notification, items[i]).dedupe_key)
        notes = [cast(Notification, items[i]) for i in order]
        stamps = [stamp(n.received_at) for n in notes]
        new, listening = _insert_events(
            conn, [event_row(n, s) for n, s in zip(notes, stamps, strict=True)], forwarding)
        for idx, n, s in zip(order, notes, stamps, strict=True):
            if n.dedupe_key in new:  # only new notifications change a message
                outcomes[idx] = "new"
                message_rows.append((notification_row(n, s), n))

    stored = Stored(outcomes)
    if message_rows:
        # Only new notifications make changes worth forwarding (a send makes none).
        changes = upsert_messages(conn, message_rows, returning=listening)
        if forwarding is not None and changes:
            stored.forwarded = forwarding.enqueue(conn, changes)
    return stored


def _unavailable(exc: BaseException) -> bool:
    """A failure of the database itself (down, locked, unreachable) rather than of one row."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@dataclass(slots=True)
class WriteStats:
    """What a writer observed since it was last asked: handed to the server process's
    metrics by the Ingestor (a writer in a child process has no registry anyone reads)."""

    commit_seconds: list[float] = field(default_factory=list)
    db_errors: list[str] = field(default_factory=list)  # the exception class of each
    forwarded: int = 0  # deliveries created for forwarding

    def add(self, other: WriteStats) -> None:
        self.commit_seconds += other.commit_seconds
        self.db_errors += other.db_errors
        self.forwarded += other.forwarded

    def publish(self) -> None:
        for seconds in self.commit_seconds:
            metrics.COMMIT_SECONDS.observe(seconds)
        for kind in self.db_errors:
            metrics.DB_ERRORS.labels(kind=kind).inc()


class BatchWriter(Protocol):
    """Where the Ingestor's thread writes a batch: a `Writer` in this process."""

    def start(self) -> None:
        """Called on the Ingestor's thread before its first batch."""

    def write(self, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]: ...

    def take_stats(self) -> WriteStats: ...

    def close(self) -> None: ...


@runtime_checkable
class HandingWriter(Protocol):
    """A writer that writes elsewhere (app/writer_process.py's `RemoteWriter`, in a child
    process): the Ingestor drives it from the event loop, with no thread in between. One
    batch at a time: `hand` it over, then `collect` its outcomes once the descriptor that
    `hand` returned is readable."""

    def start(self) -> None: ...

    def hand(self, items: Sequence[Item]) -> int: ...

    def collect(self, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]: ...

    def take_stats(self) -> WriteStats: ...

    def close(self) -> None: ...


# Times a batch is written again after the database rolled it back (Writer._commit_repeating).
ROLLBACK_RETRIES = 3


def _rolled_back(exc: DBAPIError) -> bool:
    """Whether the database rolled the transaction back itself: SQLSTATE class 40
    (serialization failure, deadlock detected; psycopg's classes for them share no base)."""
    return str(getattr(exc.orig, "sqlstate", None) or "").startswith("40")


class Writer:
    """One writer's connection, kept from batch to batch.

    Checking a connection out of the pool for every batch cost a ping round trip and about a
    quarter of the writer threads' time under a burst (profiled).
    After any failure the connection is dropped and the next batch opens a new one.
    """

    def __init__(self, engine: Engine, forwarding: Forwarding | None = None) -> None:
        self.engine = engine
        self.forwarding = forwarding
        self._stats = WriteStats()
        self._conn: Connection | None = None

    def take_stats(self) -> WriteStats:
        stats, self._stats = self._stats, WriteStats()
        return stats

    def start(self) -> None:
        """Nothing to start: the connection is opened by the first batch, so that a database
        that is down at start-up costs 503s, not the start."""

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _commit(self, items: Sequence[Item]) -> list[Outcome]:
        if self._conn is None:
            self._conn = self.engine.connect()
        try:
            with self._conn.begin():
                stored = store(self._conn, items, self.forwarding)
            self._stats.forwarded += stored.forwarded
            return stored.outcomes
        except BaseException:
            self.close()
            raise

    def _commit_repeating(self, items: Sequence[Item]) -> list[Outcome]:
        """Commit, repeating the batch where that is safe.

        - Once on a new connection if the kept one died while idle (a database restart, a
          dropped link): what the pool's pre-ping did before. Safe even if the commit went
          through: a notification is stored once however often it is written.
        - Up to ROLLBACK_RETRIES times after a rollback the database chose: a deadlock with
          another writer (a second worker's or a replica's, each in a process of its own),
          or a serialization failure. Nothing of the batch was written, and another try
          goes through once the other writer has committed; answering 503 instead made the
          provider wait to send again what one more try would have stored (the benchmark's
          two workers: 19 callbacks refused and a p99 of 0.9 s, the deadlock timeout).
        """
        reconnected, rollbacks = False, 0
        while True:
            try:
                return self._commit(items)
            except DBAPIError as exc:
                reason = str(exc.orig or exc).splitlines()[0]
                if exc.connection_invalidated and not reconnected:
                    reconnected = True
                    log.info("writer connection lost (%s); reconnecting", reason)
                elif _rolled_back(exc) and rollbacks < ROLLBACK_RETRIES:
                    rollbacks += 1
                    log.info("batch of %d rolled back by the database (%s); writing it again",
                             len(items), reason)
                else:
                    raise

    def write(self, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]:
        """Commit a batch; on a row-level failure, retry item by item so one bad row spoils
        nothing.

        A notification that cannot be stored even alone is archived as rejected with the
        error; only if that fails too does it get StoreUnavailable (and so a 503, and a
        resend). A send record that cannot be stored gets StoreUnavailable: its caller
        retries it and logs its msg_ids.
        """
        started = time.perf_counter()
        try:
            out: list[Outcome | StoreUnavailable] = list(self._commit_repeating(items))
            self._stats.commit_seconds.append(time.perf_counter() - started)
            return out
        except SQLAlchemyError as exc:
            self._stats.db_errors.append(type(exc).__name__)
            if _unavailable(exc) or len(items) == 1 and not isinstance(items[0], Notification):
                raise StoreUnavailable(str(exc).splitlines()[0]) from exc
            if len(items) > 1:
                log.warning("batch of %d failed (%s); storing one by one", len(items), exc)
                results: list[Outcome | StoreUnavailable] = []
                for item in items:
                    try:
                        results.extend(self.write([item]))
                    except StoreUnavailable as one:
                        results.append(one)
                return results
            item = items[0]
            assert isinstance(item, Notification)
            log.error("notification for %s could not be stored: %s", item.msg_id, exc)
            fallback = Rejection(
                reason=f"could not be stored: {type(exc).__name__}",
                method="-",
                content_type=None,
                query=b"",
                body=repr(item).encode("utf-8", "backslashreplace"),
                source_ip=None,
                received_at=item.received_at,
            )
            return list(self.write([fallback]))


@dataclass(slots=True)
class _Pending:
    item: Item
    future: asyncio.Future[Outcome]


_STOP = object()  # put on the writer's queue by close(), behind everything queued before it


@dataclass(slots=True)
class _Call:
    """Work for the Ingestor's thread besides batches (Ingestor.call)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


class Ingestor:
    """Group commit: requests wait on a future that the writer resolves once per batch.

    A writer in a child process (the default, a `HandingWriter`) is driven by the event loop
    itself: the loop hands it everything gathered, and when its answer arrives hands it what
    gathered meanwhile before it answers the requests of the batch just written (`_pump`).
    A writer in this process (`BatchWriter`) is a thread with its own queue. It takes
    everything queued, writes it in one transaction, hands the outcomes to the event loop in
    one call, and goes straight on to what queued meanwhile: the loop never stands between
    two batches (when that batch loop ran on the event loop, each batch waited for the loop
    to get round to it behind the requests it was serving, and under a burst the writer sat
    idle a quarter of the time). The thread also runs `call`s, in either case.

    One writer, on both databases: it writes every notification in arrival order,
    and on PostgreSQL two writers each took half the batch size for the same commit time
    (their round trips wait on the GIL the loop holds), so one writer with batches of ~33
    served 20-25% more callbacks per CPU second than two with batches of ~12 (measured with
    the benchmark's mix, see the README's Benchmark section).
    """

    def __init__(self, writer: BatchWriter | HandingWriter, *, max_batch: int = 500,
                 on_commit: Callable[[], None] | None = None) -> None:
        """`writer`: `Database.writer()`'s. `on_commit` is called on the loop after a batch
        that created deliveries."""
        self.max_batch = max_batch
        self.on_commit = on_commit
        # SimpleQueue: put and get in C, and the writer blocked in get() holds no GIL.
        self._queue: queue.SimpleQueue[list[_Pending] | _Call | object] = queue.SimpleQueue()
        self._gathering: list[_Pending] = []  # what this turn of the loop submitted (_flush)
        self.writer = writer
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # A handing writer's work, in order, and whether a batch or a call is under way.
        self._handing = writer if isinstance(writer, HandingWriter) else None
        self._work: deque[list[_Pending] | _Call] = deque()
        self._busy = False
        self._drained: asyncio.Event | None = None  # set by the last work before close

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._handing is not None:
            try:  # here, not on the thread: the loop hands it every batch
                self._handing.start()
            except Exception:  # noqa: BLE001 - the first batch tries again and answers 503
                log.exception("writer did not start")
        self._thread = threading.Thread(target=self._run, name="dlr-writer", daemon=True)
        self._thread.start()

    async def submit(self, item: Item) -> Outcome:
        """Resolve once the item is committed; raise StoreUnavailable if it was not."""
        if self._loop is None:
            raise RuntimeError("Ingestor.submit before start()")
        future: asyncio.Future[Outcome] = self._loop.create_future()
        if not self._gathering:
            self._loop.call_soon(self._flush)
        self._gathering.append(_Pending(item, future))
        return await future

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the Ingestor's thread, after what was submitted before it, and never
        beside a batch.

        For other writers of the same SQLite file in this process (the forwarder's rounds):
        SQLite lets one connection write at a time, and a second thread beside the writer
        waited in SQLite's busy backoff while the writer committed batch after batch
        (forwarding latency at 1,000 callbacks/s, callback's 200 to arrival: p50 1.3 s, p99
        2.2 s; on the writer's thread p50 30 ms, p99 0.6 s). Here it simply takes its turn.
        """
        if self._loop is None:
            raise RuntimeError("Ingestor.call before start()")
        future: asyncio.Future[T] = self._loop.create_future()
        self._flush()
        if self._handing is not None:
            self._work.append(_Call(fn, args, future))  # after the batches before it
            self._pump()
        else:
            self._queue.put(_Call(fn, args, future))
        return await future

    def _flush(self) -> None:
        """Hand what this turn of the loop gathered to the writer: a batch is at least
        everything one turn received. Handing each item over at once made the writer start
        on one or two items, commit after commit, each commit taking the GIL from the loop."""
        if self._gathering:
            if self._handing is not None:
                self._work.append(self._gathering)
                self._gathering = []
                self._pump()
            else:
                self._queue.put(self._gathering)
                self._gathering = []

    # --- a handing writer, driven by the loop ---------------------------------------------

    def _pump(self) -> None:
        """Start the next work unless some is under way: a call on the thread, or a batch of
        everything queued before the next call (at most max_batch) handed to the writer."""
        if self._busy or not self._work:
            if not self._busy and self._drained is not None:
                self._drained.set()
            return
        self._busy = True
        first = self._work.popleft()
        if isinstance(first, _Call):
            self._queue.put(first)  # the thread runs it, then _settled frees the writer
            return
        batch = first
        while self._work and len(batch) < self.max_batch:
            more = self._work[0]
            if not isinstance(more, list):
                break
            batch += more
            self._work.popleft()
        if len(batch) > self.max_batch:
            self._work.appendleft(batch[self.max_batch:])
            batch = batch[:self.max_batch]
        metrics.BATCH_SIZE.observe(len(batch))
        items = [p.item for p in batch]
        assert self._handing is not None and self._loop is not None
        try:
            ready = self._handing.hand(items)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of any failure
            log.exception("writer failed")
            self._written(batch, [StoreUnavailable(str(exc))] * len(batch))
            return
        self._loop.add_reader(ready, self._collect, batch, items, ready)

    def _collect(self, batch: list[_Pending], items: list[Item], ready: int) -> None:
        """On the loop, once the writer has answered (or ended)."""
        assert self._handing is not None and self._loop is not None
        self._loop.remove_reader(ready)
        results: Sequence[Outcome | StoreUnavailable]
        try:
            results = self._handing.collect(items)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of any failure
            if not isinstance(exc, StoreUnavailable):  # (that one is logged where it arose)
                log.exception("writer failed")
                exc = StoreUnavailable(str(exc))
            results = [exc] * len(batch)
        self._written(batch, results)

    def _written(self, batch: list[_Pending], results: Sequence[Outcome | StoreUnavailable]
                 ) -> None:
        stats = self.writer.take_stats()
        stats.publish()
        self._busy = False
        self._pump()  # the writer goes on with what gathered meanwhile, before the answers
        self._resolve(batch, results, stats.forwarded)

    def _settled(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None
                 ) -> None:
        """On the loop: a call ended on the thread."""
        _settle(future, result, exc)
        if self._handing is not None:
            self._busy = False
            self._pump()

    async def close(self) -> None:
        """Finish everything queued, then stop (graceful shutdown answers every request)."""
        self._flush()
        if self._handing is not None and (self._busy or self._work):
            self._drained = asyncio.Event()
            await self._drained.wait()
        self._queue.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)  # the thread closes the writer
        else:
            self.writer.close()

    def _run(self) -> None:
        """The Ingestor's thread: gather, write, hand the outcomes to the loop, repeat (with a
        handing writer: run the calls only)."""
        q = self._queue
        pending: list[_Pending] = []
        try:
            if self._handing is None:
                self.writer.start()
        except Exception:  # noqa: BLE001 - the first batch tries again and answers 503
            log.exception("writer did not start")
        while True:
            try:
                item = q.get_nowait() if pending else q.get()
            except queue.Empty:
                item = None  # nothing more queued: write what is pending
            if isinstance(item, list):
                pending += item
                if len(pending) >= self.max_batch:
                    batch, pending = pending[:self.max_batch], pending[self.max_batch:]
                    self._write(batch)
                continue
            while pending:  # before a call or the stop that was queued after them
                batch, pending = pending[:self.max_batch], pending[self.max_batch:]
                self._write(batch)
            if isinstance(item, _Call):
                self._call(item)
            elif item is _STOP:
                self.writer.close()
                return

    def _write(self, batch: list[_Pending]) -> None:
        assert self._loop is not None and self._handing is None
        writer = cast(BatchWriter, self.writer)
        metrics.BATCH_SIZE.observe(len(batch))
        results: Sequence[Outcome | StoreUnavailable]
        try:
            results = writer.write([p.item for p in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of any failure
            if not isinstance(exc, StoreUnavailable):
                log.exception("writer failed")
                exc = StoreUnavailable(str(exc))
            results = [exc] * len(batch)
        stats = writer.take_stats()
        stats.publish()
        self._loop.call_soon_threadsafe(self._resolve, batch, results, stats.forwarded)

    def _call(self, call: _Call) -> None:
        assert self._loop is not None
        try:
            result = call.fn(*call.args)
        except BaseException as exc:  # noqa: BLE001 - the caller gets whatever it raised
            self._loop.call_soon_threadsafe(self._settled, call.future, None, exc)
        else:
            self._loop.call_soon_threadsafe(self._settled, call.future, result, None)

    def _resolve(self, batch: list[_Pending], results: Sequence[Outcome | StoreUnavailable],
                 forwarded: int) -> None:
        """On the loop: answer every request of a committed (or failed) batch."""
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                if isinstance(result, StoreUnavailable):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
        if forwarded and self.on_commit is not None:
            self.on_commit()  # new deliveries: the forwarder sends them now


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
