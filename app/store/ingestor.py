"""Group commit: every notification, rejection and send record reaches the database here.

Requests hand their item to the `Ingestor` and wait. A writer takes whatever has queued up,
writes it in one transaction (one fsync for many callbacks) and only then answers each
waiting request. If the commit fails, every request in the batch learns it and answers 503,
so nothing is acknowledged that is not stored.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from app.ops import metrics
from app.store.write import Item, Outcome, StoreUnavailable
from app.store.writer import HandingWriter, SpoolState

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_SECONDS = 1.0  # how often a writer whose database is away is asked to try it again
# Batches the writer holds at once: while it writes one, the next waits in its pipe, so it
# starts on it the moment it commits instead of when the loop next gets to its answer (the
# loop is answering and reading callbacks meanwhile; with one at a time the child was busy
# about half the time under a burst, profiled). Two rather than one: ingest +10-14% on
# PostgreSQL, +1-3% on SQLite (docs/decisions/writer-process.md).
IN_FLIGHT = 2

@dataclass(slots=True)
class _Pending:
    item: Item
    future: asyncio.Future[Outcome]


@dataclass(slots=True)
class _Call:
    """Work for the Ingestor's thread besides batches (Ingestor.call)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


class Ingestor:
    """Group commit: requests wait on a future that the writer resolves once per batch.

    The event loop drives the writer itself (`_pump`): it hands the writer everything
    gathered, and hands over what gathers meanwhile as the next batch at once, to wait with
    the writer (at most IN_FLIGHT batches), so the writer starts on it the moment it commits
    rather than when the loop next gets to its answer. When an answer arrives the loop hands
    over what gathered before it answers the requests of the batch just written. Batches
    are written and answered in the order handed. The writer is a `RemoteWriter` in a child
    process (the default) or a `ThreadWriter`; both are driven by this same code. A thread of
    the Ingestor's own runs `call`s (other writers of the same SQLite file), when no batch is
    with the writer.

    One writer, on both databases: it writes every notification in arrival order,
    and on PostgreSQL two writers each took half the batch size for the same commit time,
    so one writer with batches of ~33 served 20-25% more callbacks per CPU second than two
    with batches of ~12 (docs/decisions/writer-process.md).
    """

    def __init__(self, writer: HandingWriter, *, max_batch: int = 500,
                 on_commit: Callable[[], None] | None = None, spools: bool = False) -> None:
        """`writer`: `writer_for()`'s (app/store/writers.py). `on_commit` is called on the
        loop after a batch that created deliveries. `spools`: the writer keeps a spool
        (app/store/spool.py), which the Ingestor has it drain when no batch comes."""
        self.max_batch = max_batch
        self.on_commit = on_commit
        self.writer = writer
        self.spools = spools
        # The writer's spool as of its last batch (None: not known yet, or no spool).
        self.spool_state: SpoolState | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._closing = False
        # The calls' thread takes them from here; put and get in C, no GIL held while waiting.
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._gathering: list[_Pending] = []  # what this turn of the loop submitted (_flush)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The work in order (batches and calls) not started yet, the batches the writer has
        # (oldest first, with the descriptor each answers on), and whether a call runs.
        self._work: deque[list[_Pending] | _Call] = deque()
        self._flight: deque[tuple[list[_Pending], list[Item], int]] = deque()
        self._waiting_on: int | None = None  # the descriptor the loop watches
        self._calling = False
        self._drained: asyncio.Event | None = None  # set by the last work before close

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.writer.start()
        except Exception:  # noqa: BLE001 - the first batch tries again and answers 503
            log.exception("writer did not start")
        self._thread = threading.Thread(target=self._run_calls, name="dlr-calls", daemon=True)
        self._thread.start()
        if self.spools:
            # What a process killed during an outage left in the spool is drained now.
            self._drain_in(0.2)

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
        2.2 s; taking turns, p50 30 ms, p99 0.6 s). Here it simply takes its turn.
        """
        if self._loop is None:
            raise RuntimeError("Ingestor.call before start()")
        future: asyncio.Future[T] = self._loop.create_future()
        self._flush()
        self._work.append(_Call(fn, args, future))  # after the batches before it
        self._pump()
        return await future

    def _flush(self) -> None:
        """Hand what this turn of the loop gathered to the writer: a batch is at least
        everything one turn received. Handing each item over at once made the writer start
        on one or two items, commit after commit, each commit taking the GIL from the loop."""
        if self._gathering:
            self._work.append(self._gathering)
            self._gathering = []
            self._pump()

    def _pump(self) -> None:
        """Start what can start: a call on the thread once no batch is with the writer, or
        batches of everything queued before the next call (at most max_batch each) handed
        to the writer while it holds fewer than IN_FLIGHT."""
        while not self._calling and self._work:
            first = self._work[0]
            if isinstance(first, _Call):
                if self._flight:
                    return  # after the batches before it
                self._work.popleft()
                self._calling = True
                self._calls.put(first)  # the thread runs it, then _settled goes on
                return
            if len(self._flight) >= IN_FLIGHT:
                return
            self._hand(self._next_batch())
        if not self._calling and not self._flight and self._drained is not None:
            self._drained.set()

    def _next_batch(self) -> list[_Pending]:
        batch = cast(list[_Pending], self._work.popleft())
        while self._work and len(batch) < self.max_batch:
            more = self._work[0]
            if not isinstance(more, list):
                break
            batch += more
            self._work.popleft()
        if len(batch) > self.max_batch:
            self._work.appendleft(batch[self.max_batch:])
            batch = batch[:self.max_batch]
        return batch

    def _hand(self, batch: list[_Pending]) -> None:
        if batch:  # (an empty batch only drains the spool)
            metrics.BATCH_SIZE.observe(len(batch))
        items = [p.item for p in batch]
        try:
            ready = self.writer.hand(items)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of any failure
            log.exception("writer failed")
            self._resolve(batch, [StoreUnavailable(str(exc))] * len(batch), 0)
            return
        self._flight.append((batch, items, ready))
        self._watch()

    def _watch(self) -> None:
        """Watch the descriptor the oldest batch with the writer answers on."""
        assert self._loop is not None
        ready = self._flight[0][2] if self._flight else None
        if ready != self._waiting_on:
            if self._waiting_on is not None:
                self._loop.remove_reader(self._waiting_on)
            if ready is not None:
                self._loop.add_reader(ready, self._collect)
            self._waiting_on = ready

    def _collect(self) -> None:
        """On the loop, once the writer has answered the oldest batch (or ended)."""
        batch, items, _ready = self._flight.popleft()
        results: Sequence[Outcome | StoreUnavailable]
        try:
            results = self.writer.collect(items)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of any failure
            if not isinstance(exc, StoreUnavailable):  # (that one is logged where it arose)
                log.exception("writer failed")
                exc = StoreUnavailable(str(exc))
            results = [exc] * len(batch)
        self._watch()
        stats = self.writer.take_stats()
        stats.publish()
        if stats.spool is not None:
            self._spool_seen(stats.spool)
        self._pump()  # the writer goes on with what gathered meanwhile, before the answers
        self._resolve(batch, results, stats.forwarded)

    # --- the spool's drain ------------------------------------------------------------------

    def _spool_seen(self, state: SpoolState) -> None:
        """Keep the writer draining while anything is spooled: at once while the database
        answers, every RETRY_SECONDS while it is away (each drain tries it once)."""
        self.spool_state = state
        if state.active:
            self._drain_in(RETRY_SECONDS if state.database_away else 0.0)

    def _drain_in(self, seconds: float) -> None:
        if self._tick is None and not self._closing and self._loop is not None:
            self._tick = self._loop.call_later(seconds, self._drain_tick)

    def _drain_tick(self) -> None:
        self._tick = None
        if not self._closing and not self._work and not self._flight:  # (a batch drains too)
            self._work.append([])
            self._pump()

    def _settled(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None
                 ) -> None:
        """On the loop: a call ended on the thread."""
        _settle(future, result, exc)
        self._calling = False
        self._pump()

    async def close(self) -> None:
        """Finish everything queued, then stop (graceful shutdown answers every request)."""
        self._closing = True
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._flush()
        if self._calling or self._flight or self._work:
            self._drained = asyncio.Event()
            await self._drained.wait()
        self._calls.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self.writer.close)

    def _run_calls(self) -> None:
        """The Ingestor's thread: run each call handed to it, until close."""
        while (call := self._calls.get()) is not None:
            self._call(call)

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
