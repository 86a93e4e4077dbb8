"""Retention: delete what is older than a cut-off in small batches, each its own transaction,
so the ingest writers never wait long for a lock.

On SQLite every write takes the one database lock, so a purge transaction holds up every
callback for as long as it runs, and back-to-back transactions starved them (measured: a
day of 200,000 messages purged under 1,000 callbacks/s, callbacks p99 1.4 s, 10 timed out).
There a batch is sized to hold the lock about SQLITE_HOLD_SECONDS, and the purge then leaves
the lock free for SQLITE_PAUSE_SECONDS, longer than SQLite's busy handler sleeps between two
tries at that point, so a waiting writer gets its turn (a day of 1,000,000 messages purged
under about 1,000 callbacks/s: p99 56 ms, none timed out; docs/decisions/paced-purge.md).
PostgreSQL's writers do not wait for a purge (it locks only the old rows it deletes):
batches there are `batch` rows, back to back.

Deleting rows subtracts them from the counts (app/store/counts.py): the triggers add a delta
row for each deleted row on SQLite, one per key and statement on PostgreSQL. Each batch folds
the deltas it added in its own transaction, a squash of only the keys it touched: left to the
app's squasher, a purge of 200,000 messages left 1.6 million delta rows, and squashing them
held SQLite's writer for seconds at a time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import (
    ColumnElement,
    Engine,
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    or_,
    select,
)
from sqlalchemy.orm import InstrumentedAttribute

from app.store.counts import high_marks, squash
from app.store.models import Delivery, Event, Message, OutboundEvent, Rejected, Send

_AGE = re.compile(r"^(\d+)\s*([a-z]+)$", re.IGNORECASE)
UNITS = {"min": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1),
         "w": timedelta(weeks=1), "mo": timedelta(days=30), "y": timedelta(days=365)}
AGE_HELP = "a number and a unit: min, h, d, w, mo (30 days) or y (365 days), e.g. 90d, 6mo"


def parse_age(value: str) -> timedelta:
    """'30min', '12h', '90d', '2w', '6mo' (30 days each) or '1y' (365 days).

    `m` alone is refused, whatever its case: a cron line written for six months as `6m`
    would otherwise delete all but six minutes.
    """
    m = _AGE.match(value.strip())
    unit = m.group(2).lower() if m else ""
    if m and unit == "m":
        n = m.group(1)
        raise ValueError(f"age {value!r} is ambiguous: write {n}min for minutes or {n}mo "
                         "for months")
    if not m or unit not in UNITS:
        raise ValueError(f"age {value!r} must be {AGE_HELP}")
    return int(m.group(1)) * UNITS[unit]


# (table, its time column). A message's updated_at is never older than any of its events,
# so events go first and no message loses events it still shows.
# Forwarding's rows go first. A delivery goes once it has finished (delivered or failed) before
# the cut-off: its `finished_at` is NULL while pending, so a pending delivery is never removed,
# however old; its attempts go with it (ON DELETE CASCADE). An outbound event goes once it is
# older than the cut-off and no delivery of it is left.
_DELIVERY_LEFT = exists(select(Delivery.id).where(Delivery.event_id == OutboundEvent.id))
FORWARDING_TARGETS: tuple[tuple[Table, ColumnElement[datetime]], ...] = (
    (cast(Table, Delivery.__table__), cast(ColumnElement[datetime], Delivery.finished_at)),
    (cast(Table, OutboundEvent.__table__),
     case((_DELIVERY_LEFT, None), else_=OutboundEvent.occurred_at)),
)
TARGETS: tuple[tuple[Table, InstrumentedAttribute[datetime] | ColumnElement[datetime]], ...] = (
    *FORWARDING_TARGETS, *((cast(Table, model.__table__), column)
    for model, column in ((Event, Event.received_at), (Rejected, Rejected.received_at),
                          (Send, Send.created_at), (Message, Message.updated_at))))


def _deletable(table: Table, column: ColumnElement[datetime] | InstrumentedAttribute[datetime],
               before: datetime) -> ColumnElement[bool]:
    """The rows of `table` that a purge with this cut-off deletes, judged before it starts.

    For every table but one that is the delete's own condition. An outbound event goes once
    no delivery of it is left, and the run deletes its finished deliveries first: so it counts
    when no delivery of it will remain, none pending and none finished at or after the
    cut-off.
    """
    if table.name != OutboundEvent.__tablename__:
        return column < before
    remaining = exists(select(Delivery.id).where(
        Delivery.event_id == OutboundEvent.id,
        or_(Delivery.finished_at.is_(None), Delivery.finished_at >= before)))
    return and_(OutboundEvent.occurred_at < before, ~remaining)


def count_older(engine: Engine, *, before: datetime) -> dict[str, int]:
    """How many rows per table `purge` would delete now (what `--dry-run` shows): the same
    rows the run deletes, outbound events whose deliveries go first included."""
    with engine.connect() as conn:
        return {table.name: conn.scalar(select(func.count()).select_from(table)
                                        .where(_deletable(table, column, before))) or 0
                for table, column in TARGETS}


SQLITE_HOLD_SECONDS = 0.03
# A writer that began waiting during a hold of about 30 ms sleeps 20 ms at most between two
# tries (SQLite's busy handler: 1, 2, 5, 10, 15, 20, 25, 25, ... ms): it gets its turn.
SQLITE_PAUSE_SECONDS = 0.04
SQLITE_FIRST_BATCH = 500


def purge(engine: Engine, *, before: datetime, batch: int = 5000,
          progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Delete rows older than `before`, at most `batch` rows a transaction (fewer on SQLite,
    paced as the module says); return how many per table."""
    paced = engine.dialect.name == "sqlite"
    size = min(batch, SQLITE_FIRST_BATCH) if paced else batch
    deleted: dict[str, int] = {}
    for table, column in TARGETS:
        total = 0
        while True:
            ids = select(table.c.id).where(column < before).order_by(table.c.id).limit(size)
            started = time.monotonic()
            with engine.begin() as conn:
                marks = high_marks(conn)
                n = conn.execute(delete(table).where(table.c.id.in_(ids))).rowcount
                squash(conn, marks)
            held = time.monotonic() - started
            total += n
            if progress:
                progress(table.name, total)
            if n < size:
                break
            if paced:
                size = min(batch, max(50, int(size * SQLITE_HOLD_SECONDS / max(held, 1e-3))))
                time.sleep(SQLITE_PAUSE_SECONDS)
        deleted[table.name] = total
    return deleted
