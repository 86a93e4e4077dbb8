"""The spool: callbacks kept on local disk while PostgreSQL is away, stored once it is back.

The provider re-sends anything not answered 200 for a day; answering 503 through an outage
made its retry machinery part of our durability, and a longer outage lost data. So while
PostgreSQL cannot take a batch because it is unreachable (not because a row is bad), the batch
is written to a local SQLite file (`DLR_SPOOL_PATH`) and committed with an fsync, and only
then answered 200: a 200 always means the callback is on disk, in PostgreSQL or here. A spool
that cannot be written (disk full, read-only, over `DLR_SPOOL_MAX_BYTES`) answers 503 as
before.

Once PostgreSQL answers again the spool drains into it through the normal write path
(`store`), oldest first, in chunks: the same precedence, the same dedupe (a callback the
provider also re-sent is stored once), forwarding events and counts as for any callback.
While anything is spooled, new batches are spooled behind it, so that nothing is stored out
of its order of arrival. A drained chunk is deleted from the spool only after PostgreSQL
committed it; a kill between the two writes it again, which the dedupe makes harmless, and
the next start drains what is left.

Each server process's writer keeps the spool of its data directory; replicas each keep their
own. On SQLite as the only database there is nothing to spool to: it is the local disk.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from app.store.write import DatabaseUnreachable, Item, Outcome, SendRecord, StoreUnavailable
from app.store.writer import SpoolState, Writer, WriteStats

log = logging.getLogger(__name__)

DRAIN_ITEMS = 5000        # callbacks drained in one transaction
DRAIN_SECONDS = 1.0       # what one drain call may take before new batches get their turn
RETRY_SECONDS = 1.0       # how soon PostgreSQL is tried again after it failed


class SpoolUnavailable(StoreUnavailable):
    """The spool cannot take the batch either: answered 503."""


class Spool:
    """A SQLite file of pickled batches, one row per batch, oldest first."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._db: sqlite3.Connection | None = None
        self._depth: int | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            # One user at a time: the writer, or the Ingestor reading its state between
            # two batches (a ThreadWriter's thread and the loop take turns).
            db = sqlite3.connect(self.path, timeout=5, isolation_level=None,
                                 check_same_thread=False)
            # Every put is committed with an fsync before its callbacks are answered.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY, "
                       "items BLOB NOT NULL, n INTEGER NOT NULL, at REAL NOT NULL)")
            self._db = db
        return self._db

    def depth(self) -> int:
        """Items kept (counted once, then followed as they are put and taken)."""
        if self._depth is None:
            if not self.path.exists():
                return 0
            self._depth = int(self._open().execute(
                "SELECT coalesce(sum(n), 0) FROM spool").fetchone()[0])
        return self._depth

    def oldest_seconds(self) -> float:
        if not self.depth():
            return 0.0
        row = self._open().execute("SELECT min(at) FROM spool").fetchone()
        return max(0.0, time.time() - row[0]) if row and row[0] is not None else 0.0

    def put(self, items: Sequence[Item]) -> None:
        """Keep a batch on disk (committed, fsynced); SpoolUnavailable if it cannot be."""
        try:
            if self.path.exists() and self._size() > self.max_bytes:
                raise SpoolUnavailable(f"the spool {self.path} is over its limit of "
                                       f"{self.max_bytes} bytes (DLR_SPOOL_MAX_BYTES)")
            self._open().execute("INSERT INTO spool (items, n, at) VALUES (?, ?, ?)",
                                 (pickle.dumps(list(items)), len(items), time.time()))
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise SpoolUnavailable(f"the spool {self.path} cannot be written: {exc}") from exc
        self._depth = self.depth() + len(items) if self._depth is not None else None

    def _size(self) -> int:
        return sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal"))
                   if p.exists())

    def oldest(self, most: int) -> list[tuple[int, list[Item]]]:
        """The oldest batches, up to `most` items (at least one batch). Read row by row until
        that many: under a steady 1,000/s the Ingestor hands batches of one or two, and a
        chunk of a fixed number of batches made a transaction of a few hundred callbacks."""
        cursor = self._open().execute("SELECT id, items, n FROM spool ORDER BY id")
        taken: list[tuple[int, list[Item]]] = []
        count = 0
        try:
            for row_id, blob, n in cursor:
                if taken and count + n > most:
                    break
                taken.append((row_id, pickle.loads(blob)))  # noqa: S301 - our own file
                count += n
        finally:
            cursor.close()
        return taken

    def remove(self, upto: int, items: int) -> None:
        """Forget the oldest batches, up to the row `upto`: one statement, so one commit and
        one fsync (a DELETE a batch, each its own commit, took longer than PostgreSQL took to
        store them)."""
        self._open().execute("DELETE FROM spool WHERE id <= ?", (upto,))
        if self._depth is not None:
            self._depth -= items
        if not self.depth():
            self._open().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._depth = None


class SpoolingWriter:
    """A `Writer` that keeps batches in the spool while PostgreSQL is unreachable, and drains
    the spool into it when it answers again. The same interface as `Writer`: the Ingestor's
    writers (the child process, or a thread) use either."""

    def __init__(self, writer: Writer, spool: Spool) -> None:
        self.writer = writer
        self.spool = spool
        self._retry_at = 0.0
        self._away = False
        self._warned = False
        self._drained = 0

    def start(self) -> None:
        self.writer.start()

    def close(self) -> None:
        self.writer.close()
        self.spool.close()

    def take_stats(self) -> WriteStats:
        stats = self.writer.take_stats()
        try:
            depth, oldest = self.spool.depth(), self.spool.oldest_seconds()
        except (sqlite3.Error, OSError):
            depth, oldest = 0, 0.0
        stats.spool = SpoolState(depth, oldest, self._away)
        stats.drained, self._drained = self._drained, 0
        return stats

    def write(self, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]:
        """Write the batch, or spool it: directly while nothing is spooled and PostgreSQL
        answers; behind what is spooled otherwise, draining the spool as PostgreSQL allows.
        An empty batch only drains (the Ingestor's drain ticks)."""
        if not self.spool.depth() and time.monotonic() >= self._retry_at:
            if not items and not self._away:
                return []
            try:  # (an empty batch while the database was away: is it back?)
                results = self.writer.write(items)
            except DatabaseUnreachable as exc:
                self._failed(exc)
            else:
                self._away = False
                return results
        results = self._spooled(items) if items else []
        if time.monotonic() >= self._retry_at:
            self._drain()
        return results

    def _spooled(self, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]:
        if not self._warned:
            self._warned = True
            log.warning("database unreachable: callbacks are kept in the spool %s and will be "
                        "stored when it is back", self.spool.path)
        self.spool.put(items)  # SpoolUnavailable: the whole batch is answered 503
        for item in items:
            if isinstance(item, SendRecord):
                item.send_id = None
        return ["spooled"] * len(items)

    def _failed(self, exc: DatabaseUnreachable) -> None:
        self._away = True
        self._retry_at = time.monotonic() + RETRY_SECONDS
        log.info("database unavailable (%s); spooling", exc)

    def _drain(self) -> None:
        """Store the oldest spooled batches, a chunk a transaction, for up to DRAIN_SECONDS."""
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.spool.depth() and time.monotonic() < deadline:
            chunk = self.spool.oldest(DRAIN_ITEMS)
            items = [item for _, batch in chunk for item in batch]
            try:
                results = self.writer.write(items)  # each was answered when it was kept
            except DatabaseUnreachable as exc:
                self._failed(exc)
                return
            self._away = False
            for item, result in zip(items, results, strict=True):
                if isinstance(result, StoreUnavailable):  # one bad row: logged, not kept
                    log.error("a spooled %s could not be stored: %s (%r)",
                              type(item).__name__, result, item)
            self.spool.remove(chunk[-1][0], len(items))
            self._drained += len(items)
        if not self.spool.depth() and self._warned:
            self._warned = False
            log.info("spool drained: every kept callback is stored")


def left_over(path: str | None) -> SpoolState | None:
    """What a spool holds as a process starts (a previous one's, killed during an outage),
    read before its writer drains it, so that /readyz says so from the first request."""
    if path is None or not Path(path).exists():
        return None
    spool = Spool(path, 0)
    try:
        depth = spool.depth()
        return SpoolState(depth, spool.oldest_seconds(), False) if depth else None
    except (sqlite3.Error, OSError):
        return None
    finally:
        spool.close()


def spooling(writer: Writer, path: str | None, max_bytes: int) -> Writer | SpoolingWriter:
    """The writer, spooling to `path` when one is given (PostgreSQL with a spool)."""
    if path is None:
        return writer
    return SpoolingWriter(writer, Spool(path, max_bytes))
