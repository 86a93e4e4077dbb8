"""The write path. Every notification, rejection and send record reaches the database here.

Requests hand their item to the `Ingestor` and wait. One writer per process takes whatever
has queued up, writes it in one transaction (group commit: one fsync for many callbacks) and
only then answers each waiting request. If the commit fails, every request in the batch
learns it and answers 503, so nothing is acknowledged that is not stored.

Message status is folded with `supersedes()`, in SQL for what is already stored, so the
result is the same whatever order the notifications arrive in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, Engine, and_, case, func, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app import metrics
from app.models import Event, Message, Rejected
from app.notifications import RANK, Notification, Rejection, Status, supersedes

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

    def row(self) -> dict[str, Any]:
        return {
            "msg_key": self.msg_key,
            "msg_id": self.msg_id,
            "p_transaction_id": self.p_transaction_id,
            "phone": self.phone,
            "sender": self.sender,
            "kind": self.kind,
            "send_id": self.send_id,
            "status": self.status.value,
            "status_rank": RANK[self.status],
            "status_extended": self.status_extended,
            "sent_at": self.sent_at,
            "delivered_at": self.delivered_at,
            "seen_at": self.seen_at,
            "created_at": self.updated_at,
            "updated_at": self.updated_at,
        }


def _insert(conn: Connection, table: Any) -> Any:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def upsert_messages(conn: Connection, deltas: Iterable[MessageDelta]) -> None:
    """Merge deltas into message rows; a lower status never overwrites a higher one."""
    rows = [d.row() for d in deltas]
    if not rows:
        return
    m = Message.__table__.c
    stmt = _insert(conn, Message.__table__)
    ex = stmt.excluded
    wins = or_(
        ex.status_rank > m.status_rank,
        and_(ex.status_rank == m.status_rank, ex.status_rank == RANK[Status.DELIVERED]),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[m.msg_key],
        set_={
            "status": case((wins, ex.status), else_=m.status),
            "status_rank": case((wins, ex.status_rank), else_=m.status_rank),
            "status_extended": case((wins, ex.status_extended), else_=m.status_extended),
            "p_transaction_id": func.coalesce(m.p_transaction_id, ex.p_transaction_id),
            "phone": func.coalesce(ex.phone, m.phone),
            "sender": func.coalesce(ex.sender, m.sender),
            "kind": func.coalesce(ex.kind, m.kind),
            "send_id": func.coalesce(ex.send_id, m.send_id),
            "sent_at": func.coalesce(ex.sent_at, m.sent_at),
            "delivered_at": func.coalesce(m.delivered_at, ex.delivered_at),
            "seen_at": func.coalesce(m.seen_at, ex.seen_at),
            "updated_at": ex.updated_at,
        },
    )
    # Sorted keys make concurrent writers (several workers) lock rows in the same order.
    rows.sort(key=lambda r: r["msg_key"])
    conn.execute(stmt, rows)


def _event_row(n: Notification) -> dict[str, Any]:
    return {
        "dedupe_key": n.dedupe_key,
        "msg_key": n.msg_key,
        "type": n.type,
        "status": n.status.value if n.status else None,
        "status_extended": n.status_extended,
        "unknown_status_extended": n.unknown_status_extended,
        "text": n.text,
        "text_raw": n.text_raw,
        "p_transaction_id": n.p_transaction_id,
        "received_at": n.received_at,
    }


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

    first: dict[str, int] = {}  # dedupe_key -> index of its first copy in this batch
    for idx, item in enumerate(items):
        if isinstance(item, Notification):
            outcomes[idx] = "duplicate"
            first.setdefault(item.dedupe_key, idx)
    if not first:
        return outcomes

    stmt = (
        _insert(conn, Event.__table__)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(Event.__table__.c.dedupe_key)
    )
    rows = [_event_row(items[idx]) for idx in first.values()]  # type: ignore[arg-type]
    inserted = set(conn.execute(stmt, rows).scalars().all())

    deltas: dict[str, MessageDelta] = {}
    for key, idx in first.items():
        if key not in inserted:
            continue
        outcomes[idx] = "new"
        n = items[idx]
        assert isinstance(n, Notification)
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


def write_batch(engine: Engine, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]:
    """Commit a batch; on a row-level failure, retry item by item so one bad row spoils nothing.

    An item that cannot be stored even alone is archived as rejected with the error; only if
    that fails too does it get StoreUnavailable (and so a 503, and a resend).
    """
    started = time.perf_counter()
    try:
        with engine.begin() as conn:
            out: list[Outcome | StoreUnavailable] = list(store(conn, items))
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
                    results.extend(write_batch(engine, [item]))
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
        return list(write_batch(engine, [fallback]))


@dataclass(slots=True)
class _Pending:
    item: Item
    future: asyncio.Future[Outcome]


@dataclass
class Ingestor:
    """Group commit: requests wait on a future that the single writer resolves per batch."""

    engine: Engine
    max_batch: int = 500
    _queue: asyncio.Queue[_Pending] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="dlr-writer")
    )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dlr-writer")

    async def submit(self, item: Item) -> Outcome:
        """Resolve once the item is committed; raise StoreUnavailable if it was not."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, future))
        return await future

    async def close(self) -> None:
        """Finish everything queued, then stop (graceful shutdown answers every request)."""
        await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            metrics.BATCH_SIZE.observe(len(batch))
            try:
                results = await loop.run_in_executor(
                    self._executor, write_batch, self.engine, [p.item for p in batch]
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
                self._queue.task_done()
