"""The writer in a process of its own (`DLR_WRITER_PROCESS`, on by default).

`RemoteWriter` is a `HandingWriter` (app/store/writer.py): the Ingestor, on the event loop, hands
it each batch, which it pickles to a child process that runs the real `Writer` on its own
connection, and collects the outcomes when the pipe becomes readable. The batching, the
order and every rule of the write path stay where they are; only the work of writing moves.
Why: the event loop that answers the callbacks and the writer's Python work (building rows,
the driver's calls, reading back what changed) shared one interpreter lock, and the process
was bound by that lock with a core of the machine idle (a writer thread cost a callback
44-67 us of CPU under the lock; the README's Benchmark section has the measurements). No
thread of the server stands between the loop and the child either: a thread that only
pickled and waited still took the lock back from the loop five times a batch, and each time
waited for it (half of the 7 ms from one batch to the next went in those waits, measured).

What the child does not have, it sends back with the outcomes: the send records' row ids,
how many deliveries it created for forwarding, its metrics (commit times, database errors)
and its log lines, re-emitted through the server's own logging as if written there.

The child is forked from multiprocessing's fork server, which imports the write path once
per server process; the child still imports the program's main script again as it starts
(see _PRELOAD), 0.3-0.5 s for `dlr`, once per server process and per replacement. It ignores
SIGINT and SIGTERM: a signal to the whole process group (Ctrl-C, systemd) must not end it
before the server has answered what is queued; it ends when the server closes the pipe, and
also if the server dies. If the child dies with a batch, the batch is answered 503 (the
provider sends it again, and a notification is stored once however often it comes) and the
next batch starts a new child; a child found dead before a batch is replaced at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from logging.handlers import QueueHandler
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.util import Finalize

from app.config import Settings
from app.store.db import make_engine
from app.store.outbox import Outbox
from app.store.spool import spooling
from app.store.write import Item, Outcome, SendRecord, StoreUnavailable
from app.store.writer import Writer, WriteStats

log = logging.getLogger(__name__)
# dlr_db_errors_total's kind for a child that died.
ENDED = "WriterProcessEnded"

# The fork server imports these once; each child then starts with them loaded. A child
# still imports the program's main script again, as multiprocessing does for every child it
# starts (without its `if __name__ == "__main__":` part, which a script that builds the app
# must have): about 0.3-0.5 s for `dlr`, once per server process.
_PRELOAD = ["app.store.writer_process", "app.store.outbox", "psycopg", "sqlite3"]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(_PRELOAD)


@dataclass(slots=True)
class Reply:
    """What the child answers for one batch."""

    results: list[Outcome | StoreUnavailable]
    send_ids: list[tuple[int, int | None]]  # (index in the batch, its `sends` row id)
    stats: WriteStats
    logs: list[logging.LogRecord]


class RemoteWriter:
    """A `Writer` in a child process; called on the event loop by the Ingestor only (`hand`,
    then `collect`, a few batches at a time, answered in order)."""

    def __init__(self, settings: Settings, *, forwarding: bool) -> None:
        self.settings = settings
        self.forwarding = forwarding
        self._stats = WriteStats()
        self._conn: Connection | None = None
        self._process: BaseProcess | None = None
        # The pipe each batch not yet collected went to, oldest first: a child that ended
        # leaves its pipe open until each of its batches has read the end from it.
        self._sent: deque[Connection] = deque()

    def start(self) -> None:
        """Start the child now, not on the first batch: starting the fork server takes about
        a second (once per server process)."""
        self._start()

    def _start(self) -> Connection:
        ours, theirs = _context.Pipe()
        # INFO and up are always sent (the write path logs rarely: a lost connection, a
        # failed batch), each re-emitted if the server's logger takes it; DEBUG if asked.
        level = min(logging.INFO, logging.getLogger("app").getEffectiveLevel())
        process = _context.Process(target=_serve, name="dlr-writer", daemon=True,
                                   args=(theirs, self.settings, self.forwarding, level))
        process.start()
        theirs.close()
        # Closed at interpreter exit before multiprocessing joins its children: the child
        # ignores the SIGTERM that multiprocessing would send and ends when its pipe closes,
        # so an exit that skipped close() would otherwise wait for it forever.
        Finalize(self, ours.close, exitpriority=10)
        self._conn, self._process = ours, process
        return ours

    @property
    def pid(self) -> int | None:
        """The child's process id, while it runs."""
        return self._process.pid if self._process is not None else None

    def _send(self, items: list[Item]) -> Connection:
        conn = self._conn or self._start()
        try:
            conn.send(items)
            return conn
        except OSError:
            # The child ended before this batch (killed while idle): nothing of it was
            # written, so a new child takes it.
            self._stats.db_errors.append(ENDED)
            log.error("writer process ended (exit code %s)%s; starting another", self._stop(),
                      " while idle" if not self._sent else "")
        conn = self._start()
        conn.send(items)
        return conn

    def hand(self, items: Sequence[Item]) -> int:
        """Send a batch to the child; the descriptor that becomes readable when it is written
        (or when the child has ended)."""
        conn = self._send(list(items))
        self._sent.append(conn)
        return conn.fileno()

    def collect(self, items: Sequence[Item]) -> list[Outcome | StoreUnavailable]:
        """The outcomes of the oldest batch `hand` sent, once its descriptor is readable."""
        conn = self._sent.popleft()
        try:
            reply: Reply = conn.recv()
        except (EOFError, OSError) as exc:
            # It ended with the batch: committed or not, it is answered 503 and sent again.
            self._stats.db_errors.append(ENDED)
            code = self._stop() if conn is self._conn else None
            if conn not in self._sent:
                conn.close()
            log.error("writer process ended (exit code %s) with a batch of %d; answered 503",
                      code, len(items))
            raise StoreUnavailable(f"writer process ended: {exc!r}") from exc
        for record in reply.logs:
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        for index, send_id in reply.send_ids:
            item = items[index]
            assert isinstance(item, SendRecord)
            item.send_id = send_id
        self._stats.add(reply.stats)
        return reply.results

    def take_stats(self) -> WriteStats:
        stats, self._stats = self._stats, WriteStats()
        return stats

    def _stop(self) -> int | None:
        """Close the pipe and wait for the child: it finishes what it was given, then ends.
        A pipe that batches not yet collected went to stays open for them (they read the
        end from it)."""
        if self._conn is not None:
            if self._conn not in self._sent:
                self._conn.close()
            self._conn = None
        code = None
        if self._process is not None:
            self._process.join(timeout=self.settings.db_timeout + 5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            code = self._process.exitcode
            self._process = None
        return code

    def close(self) -> None:
        self._stop()


class _Records(list[logging.LogRecord]):
    """A list that QueueHandler can put records into."""

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.append(record)


def _serve(conn: Connection, settings: Settings, forwarding: bool, level: int) -> None:
    """The child: write each batch that arrives, answer, until the server closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    records = _Records()
    root = logging.getLogger()
    root.handlers = [QueueHandler(records)]  # type: ignore[arg-type]
    root.setLevel(level)
    engine = make_engine(settings, pool_size=1)
    writer = spooling(Writer(engine, Outbox() if forwarding else None), settings.spool_file,
                      settings.spool_max_bytes)
    try:
        while True:
            try:
                items: list[Item] = conn.recv()
            except (EOFError, OSError):  # the server closed the pipe, or is gone
                return
            try:
                results = writer.write(items)
            except StoreUnavailable as exc:  # the database is away: the 503s say so
                results = [exc] * len(items)
            except Exception as exc:  # noqa: BLE001 - the server must hear of any failure
                log.exception("writer failed")
                results = [StoreUnavailable(str(exc))] * len(items)
            reply = Reply(
                results=results,
                send_ids=[(i, item.send_id) for i, item in enumerate(items)
                          if isinstance(item, SendRecord)],
                stats=writer.take_stats(), logs=list(records))
            records.clear()
            try:
                conn.send(reply)
            except OSError:  # the server is gone (killed): nobody waits for the answer
                return
    finally:
        writer.close()
        engine.dispose()

