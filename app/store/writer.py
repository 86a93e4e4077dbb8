"""One batch's commit (`Writer`, on a connection it keeps), and the writers the Ingestor hands
batches to: `ThreadWriter` in this process, `RemoteWriter` (app/store/writer_process.py) in a
child process, the default. Both are driven by the same scheduling code (app/store/ingestor.py):
hand a batch over, collect its outcomes once a descriptor is readable.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.core.notifications import Notification, Rejection
from app.ops import metrics
from app.store.write import (
    DatabaseUnreachable,
    Forwarding,
    Item,
    Outcome,
    StoreUnavailable,
    store,
)

log = logging.getLogger(__name__)

def _unavailable(exc: BaseException) -> bool:
    """A failure of the database itself (down, locked, unreachable) rather than of one row."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@dataclass(frozen=True, slots=True)
class SpoolState:
    """What the server process shows of its writer's spool (app/store/spool.py): /readyz,
    /metrics, the reads' 503."""

    depth: int               # callbacks (and send records) kept, not yet stored
    oldest_seconds: float    # age of the oldest kept, 0 when empty
    database_away: bool      # the last attempt to reach PostgreSQL failed

    @property
    def active(self) -> bool:
        return self.depth > 0 or self.database_away


@dataclass(slots=True)
class WriteStats:
    """What a writer observed since it was last asked: handed to the server process's
    metrics by the Ingestor (a writer in a child process has no registry anyone reads)."""

    commit_seconds: list[float] = field(default_factory=list)
    db_errors: list[str] = field(default_factory=list)  # the exception class of each
    forwarded: int = 0  # deliveries created for forwarding
    spool: SpoolState | None = None  # a spooling writer's, as of its last batch
    drained: int = 0  # spooled items stored

    def add(self, other: WriteStats) -> None:
        self.commit_seconds += other.commit_seconds
        self.db_errors += other.db_errors
        self.forwarded += other.forwarded
        self.spool = other.spool or self.spool
        self.drained += other.drained

    def publish(self) -> None:
        for seconds in self.commit_seconds:
            metrics.COMMIT_SECONDS.observe(seconds)
        for kind in self.db_errors:
            metrics.DB_ERRORS.labels(kind=kind).inc()
        if self.spool is not None:
            metrics.SPOOL_DEPTH.set(self.spool.depth)
            metrics.SPOOL_OLDEST.set(self.spool.oldest_seconds)
        if self.drained:
            metrics.SPOOL_DRAINED.inc(self.drained)


@runtime_checkable
class HandingWriter(Protocol):
    """What the Ingestor hands batches to, from the event loop: `hand` one over, then
    `collect` its outcomes once the descriptor that `hand` returned is readable. It may hold a
    few batches at once (the Ingestor's IN_FLIGHT); they are written, and collected, in the
    order they were handed.
    `RemoteWriter` writes in a child process (the default, app/store/writer_process.py),
    `ThreadWriter` on a thread of this process; the Ingestor cannot tell them apart."""

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
            if _unavailable(exc):
                raise DatabaseUnreachable(str(exc).splitlines()[0]) from exc
            if len(items) <= 1 and not (items and isinstance(items[0], Notification)):
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


class BatchWrite(Protocol):
    """What writes one batch where it runs: a `Writer`, or a `SpoolingWriter` around one."""

    def start(self) -> None: ...

    def write(self, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]: ...

    def take_stats(self) -> WriteStats: ...

    def close(self) -> None: ...


class ThreadWriter:
    """A `Writer` on a thread of this process, handed batches exactly as the child process is
    (`DLR_WRITER_PROCESS=false`: a debugger, a test that patches the write path, a command's
    few send records). The thread writes the batch, leaves the outcomes here and writes one
    byte to a pipe, which is the descriptor the Ingestor waits on."""

    def __init__(self, writer: BatchWrite) -> None:
        self.writer = writer
        self._inbox: queue.SimpleQueue[list[Item] | None] = queue.SimpleQueue()
        # Each batch's outcomes, in order; a byte on the pipe for each.
        self._results: queue.SimpleQueue[list[Outcome | StoreUnavailable]] = queue.SimpleQueue()
        self._ready, self._done = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dlr-writer", daemon=True)
            self._thread.start()

    def hand(self, items: Sequence[Item]) -> int:
        self.start()
        self._inbox.put(list(items))
        return self._ready

    def collect(self, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]:
        os.read(self._ready, 1)
        results = self._results.get_nowait()
        assert len(results) == len(items)
        return results

    def take_stats(self) -> WriteStats:
        return self.writer.take_stats()

    def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None
        self.writer.close()
        for fd in (self._ready, self._done):
            try:
                os.close(fd)
            except OSError:  # closed already (close() called twice)
                pass

    def _run(self) -> None:
        while (items := self._inbox.get()) is not None:
            results: list[Outcome | StoreUnavailable]
            try:
                results = self.writer.write(items)
            except StoreUnavailable as exc:  # the database is away: the 503s say so
                results = [exc] * len(items)
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of any failure
                log.exception("writer failed")
                results = [StoreUnavailable(str(exc))] * len(items)
            self._results.put(results)
            os.write(self._done, b"\0")
