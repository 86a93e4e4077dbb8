"""Retention: delete what is older than a cut-off in small batches, each its own transaction,
so the ingest writers never wait long for a lock."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import ColumnElement, Engine, Table, case, delete, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute

from app.store.models import Delivery, Event, Message, OutboundEvent, Rejected, Send

_AGE = re.compile(r"^(\d+)([dhm])$")


def parse_age(value: str) -> timedelta:
    """'90d', '12h' or '30m'."""
    m = _AGE.match(value.strip())
    if not m:
        raise ValueError(f"age {value!r} must look like 90d, 12h or 30m")
    n, unit = int(m.group(1)), m.group(2)
    return {"d": timedelta(days=n), "h": timedelta(hours=n), "m": timedelta(minutes=n)}[unit]


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


def count_older(engine: Engine, *, before: datetime) -> dict[str, int]:
    """How many rows per table `purge` would delete now (what `--dry-run` shows)."""
    with engine.connect() as conn:
        return {table.name: conn.scalar(
                    select(func.count()).select_from(table).where(column < before)) or 0
                for table, column in TARGETS}


def purge(engine: Engine, *, before: datetime, batch: int = 5000,
          progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Delete rows older than `before`; return how many per table."""
    deleted: dict[str, int] = {}
    for table, column in TARGETS:
        total = 0
        while True:
            ids = select(table.c.id).where(column < before).order_by(table.c.id).limit(batch)
            with engine.begin() as conn:
                n = conn.execute(delete(table).where(table.c.id.in_(ids))).rowcount
            total += n
            if progress:
                progress(table.name, total)
            if n < batch:
                break
        deleted[table.name] = total
    return deleted
