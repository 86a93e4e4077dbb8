"""The write path. Every notification, rejection and send record reaches the database here.

Requests hand their item to the `Ingestor` and wait. A writer takes whatever has queued up,
writes it in one transaction (group commit: one fsync for many callbacks) and only then
answers each waiting request. If the commit fails, every request in the batch
learns it and answers 503, so nothing is acknowledged that is not stored.

Message status is folded with `supersedes()`, in SQL for what is already stored, so the
result is the same whatever order the notifications arrive in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app import metrics
from app.db import UTCDateTime
from app.models import Rejected
from app.notifications import FINAL_RANK, RANK, Notification, Rejection, Status, supersedes

log = logging.getLogger(__name__)

Outcome = Literal["new", "duplicate", "rejected"]
Item = Notification | Rejection


class StoreUnavailable(RuntimeError):
    """The database could not commit; the caller must not acknowledge."""


@dataclass(slots=True)
class MessageDelta:
    """What one unit of work knows about a message, merged into its row by upsert."""

    msg_key: str
    msg_id: str
    updated_at: datetime
    status: Status = Status.ACCEPTED
    status_extended: str | None = None
    p_transaction_id: str | None = None
    phone: str | None = None
    sender: str | None = None
    kind: str | None = None
    send_id: int | None = None
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    seen_at: datetime | None = None

    def apply(self, n: Notification) -> None:
        """Fold a newer notification into this delta, with the same rule as the SQL merge."""
        self.updated_at = n.received_at
        self.p_transaction_id = self.p_transaction_id or n.p_transaction_id
        new = n.message_status
        if new is None:
            return
        if new in (Status.DELIVERED, Status.SEEN) and self.delivered_at is None:
            self.delivered_at = n.received_at  # seen implies delivered
        if new is Status.SEEN and self.seen_at is None:
            self.seen_at = n.received_at
        if supersedes(RANK[new], RANK[self.status]):
            self.status = new
            self.status_extended = n.status_extended


# The hot path speaks SQL directly: SQLAlchemy Core would compile and type-process every
# batch, which costs more than the database work itself. Both databases get the same
# INSERT ... ON CONFLICT; only how the rows travel differs (see _insert_sql).
# (column, PostgreSQL type) in the order the row tuples are built.
EVENT_COLUMNS = (("dedupe_key", "text"), ("msg_key", "text"), ("type", "text"),
                 ("status", "text"), ("status_extended", "text"),
                 ("unknown_status_extended", "boolean"), ("text", "text"),
                 ("text_raw", "bytea"), ("p_transaction_id", "text"),
                 ("received_at", "timestamptz"))
MESSAGE_COLUMNS = (("msg_key", "text"), ("msg_id", "text"), ("p_transaction_id", "text"),
                   ("phone", "text"), ("sender", "text"), ("kind", "text"),
                   ("send_id", "bigint"), ("status", "text"), ("status_rank", "integer"),
                   ("status_extended", "text"), ("sent_at", "timestamptz"),
                   ("delivered_at", "timestamptz"), ("seen_at", "timestamptz"),
                   ("created_at", "timestamptz"), ("updated_at", "timestamptz"))
_WINS = (f"(excluded.status_rank > messages.status_rank OR (excluded.status_rank = "
         f"messages.status_rank AND excluded.status_rank = {FINAL_RANK}))")
MESSAGE_MERGE = ", ".join([
    # A lower status never overwrites a higher one; between equal final ones the later wins.
    *(f"{c} = CASE WHEN {_WINS} THEN excluded.{c} ELSE messages.{c} END"
      for c in ("status", "status_rank", "status_extended")),
    # What the send record knows wins; what came first is kept for the first-time stamps.
    *(f"{c} = COALESCE(excluded.{c}, messages.{c})"
      for c in ("phone", "sender", "kind", "send_id", "sent_at")),
    *(f"{c} = COALESCE(messages.{c}, excluded.{c})"
      for c in ("p_transaction_id", "delivered_at", "seen_at")),
    "updated_at = excluded.updated_at",
])


@lru_cache(maxsize=64)
def _insert_sql(dialect: str, table: str, columns: tuple[tuple[str, str], ...], rows: int,
                tail: str) -> str:
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
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def _bulk_insert(conn: Connection, table: str, columns: tuple[tuple[str, str], ...],
                 rows: list[tuple[Any, ...]], tail: str, chunk: int = 500) -> list[Any]:
    """Insert many rows in few statements; returns the RETURNING rows, if any."""
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
            params = tuple(v for r in part for v in r)
        result = conn.exec_driver_sql(sql, params)
        if result.returns_rows:
            returned.extend(result.fetchall())
    return returned


@lru_cache(maxsize=4)
def _time_binder(dialect: Any) -> Callable[[Any], Any]:
    """How the dialect stores UTCDateTime (SQLite keeps text), taken from the column type."""
    return UTCDateTime().bind_processor(dialect) or (lambda v: v)  # type: ignore[return-value]


def upsert_messages(conn: Connection, deltas: Iterable[MessageDelta]) -> None:
    """Merge deltas into message rows; a lower status never overwrites a higher one."""
    t = _time_binder(conn.dialect)
    # Sorted keys make concurrent writers (several workers) lock rows in the same order.
    rows = [
        (d.msg_key, d.msg_id, d.p_transaction_id, d.phone, d.sender, d.kind, d.send_id,
         d.status.value, RANK[d.status], d.status_extended, t(d.sent_at), t(d.delivered_at),
         t(d.seen_at), t(d.updated_at), t(d.updated_at))
        for d in sorted(deltas, key=lambda d: d.msg_key)
    ]
    if rows:
        _bulk_insert(conn, "messages", MESSAGE_COLUMNS, rows,
                            f"ON CONFLICT (msg_key) DO UPDATE SET {MESSAGE_MERGE}")


def _rejected_row(r: Rejection) -> dict[str, Any]:
    return {
        "reason": r.reason,
        "method": r.method,
        "content_type": r.content_type,
        "query": r.query,
        "body": r.body,
        "source_ip": r.source_ip,
        "received_at": r.received_at,
    }


def store(conn: Connection, items: Sequence[Item]) -> list[Outcome]:
    """Write one batch inside the caller's transaction; the caller commits."""
    outcomes: list[Outcome] = ["rejected"] * len(items)
    rejected = [_rejected_row(i) for i in items if isinstance(i, Rejection)]
    if rejected:
        conn.execute(Rejected.__table__.insert(), rejected)

    first: dict[str, Notification] = {}  # dedupe_key -> its first copy in this batch
    index: dict[str, int] = {}
    for idx, item in enumerate(items):
        if isinstance(item, Notification):
            outcomes[idx] = "duplicate"
            if item.dedupe_key not in first:
                first[item.dedupe_key] = item
                index[item.dedupe_key] = idx
    if not first:
        return outcomes

    t = _time_binder(conn.dialect)
    rows = [
        (n.dedupe_key, n.msg_key, n.type, n.status.value if n.status else None,
         n.status_extended, n.unknown_status_extended, n.text, n.text_raw,
         n.p_transaction_id, t(n.received_at))
        for n in first.values()
    ]
    inserted = {r[0] for r in _bulk_insert(
        conn, "events", EVENT_COLUMNS, rows,
        "ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key")}

    deltas: dict[str, MessageDelta] = {}
    for key, n in first.items():
        if key not in inserted:
            continue
        outcomes[index[key]] = "new"
        delta = deltas.get(n.msg_key)
        if delta is None:
            delta = deltas[n.msg_key] = MessageDelta(
                msg_key=n.msg_key, msg_id=n.msg_id, updated_at=n.received_at
            )
        delta.apply(n)
    upsert_messages(conn, deltas.values())
    return outcomes


def _unavailable(exc: BaseException) -> bool:
    """A failure of the database itself (down, locked, unreachable) rather than of one row."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class Writer:
    """One writer's connection, kept from batch to batch.

    Checking a connection out of the pool for every batch cost a ping round trip and about a
    quarter of the writer threads' time under a burst (profiled).
    After any failure the connection is dropped and the next batch opens a new one.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _commit(self, items: Sequence[Item]) -> list[Outcome]:
        if self._conn is None:
            self._conn = self.engine.connect()
        try:
            with self._conn.begin():
                return store(self._conn, items)
        except BaseException:
            self.close()
            raise

    def _commit_reconnecting(self, items: Sequence[Item]) -> list[Outcome]:
        try:
            return self._commit(items)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            # The kept connection died while idle (a database restart, a dropped link): what
            # the pool's pre-ping did before, once. Repeating the batch is safe even if the
            # commit went through: every insert is idempotent.
            log.info("writer connection lost (%s); reconnecting", str(exc).splitlines()[0])
            return self._commit(items)

    def write(self, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]:
        """Commit a batch; on a row-level failure, retry item by item so one bad row spoils
        nothing.

        An item that cannot be stored even alone is archived as rejected with the error; only
        if that fails too does it get StoreUnavailable (and so a 503, and a resend).
        """
        started = time.perf_counter()
        try:
            out: list[Outcome | StoreUnavailable] = list(self._commit_reconnecting(items))
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
            return out
        except SQLAlchemyError as exc:
            metrics.DB_ERRORS.labels(kind=type(exc).__name__).inc()
            if _unavailable(exc) or len(items) == 1 and isinstance(items[0], Rejection):
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


class Ingestor:
    """Group commit: requests wait on a future that a writer resolves once per batch.

    Each writer owns one queue, one thread and one connection. Notifications are routed by
    msg_key, so one message's notifications are always written by the same writer, in
    arrival order, while writers for other messages overlap their waits on the database.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 500, writers: int = 1) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._queues: list[asyncio.Queue[_Pending]] = [asyncio.Queue() for _ in range(writers)]
        self._writers = [Writer(engine) for _ in range(writers)]
        self._executor = ThreadPoolExecutor(writers, thread_name_prefix="dlr-writer")
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(q, w), name=f"dlr-writer-{i}")
                       for i, (q, w) in enumerate(zip(self._queues, self._writers, strict=True))]

    def _queue_for(self, item: Item) -> asyncio.Queue[_Pending]:
        if len(self._queues) == 1 or isinstance(item, Rejection):
            return self._queues[0]
        return self._queues[hash(item.msg_key) % len(self._queues)]

    async def submit(self, item: Item) -> Outcome:
        """Resolve once the item is committed; raise StoreUnavailable if it was not."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue_for(item).put_nowait(_Pending(item, future))
        return await future

    async def close(self) -> None:
        """Finish everything queued, then stop (graceful shutdown answers every request)."""
        for queue in self._queues:
            await queue.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)
        for writer in self._writers:
            writer.close()

    async def _run(self, queue: asyncio.Queue[_Pending], writer: Writer) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            metrics.BATCH_SIZE.observe(len(batch))
            try:
                results = await loop.run_in_executor(
                    self._executor, writer.write, [p.item for p in batch]
                )
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of any failure
                if not isinstance(exc, StoreUnavailable):
                    log.exception("writer failed")
                    exc = StoreUnavailable(str(exc))
                results = [exc] * len(batch)
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    if isinstance(result, StoreUnavailable):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)
                queue.task_done()
