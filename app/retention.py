"""Retention: delete what is older than a cut-off in small batches, each its own transaction,
so the ingest writers never wait long for a lock."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, select

from app.models import Event, Message, Rejected, Send

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
TARGETS = ((Event, Event.received_at), (Rejected, Rejected.received_at),
           (Send, Send.created_at), (Message, Message.updated_at))


def purge(engine: Engine, *, before: datetime, batch: int = 5000,
          progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Delete rows older than `before`; return how many per table."""
    deleted: dict[str, int] = {}
    for model, column in TARGETS:
        table = model.__table__
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
