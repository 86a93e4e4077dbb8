"""What `dlr purge` removes of forwarding (app/retention.py runs these first).

A delivery goes once it has finished (delivered or failed) before the cut-off: its
`finished_at` is NULL while pending, so a pending delivery is never removed, however old.
Its attempts go with it (ON DELETE CASCADE). An event goes once it is older than the cut-off
and no delivery of it is left.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import ColumnElement, Table, case, exists, select

from app.models import Delivery, OutboundEvent

_LEFT = exists(select(Delivery.id).where(Delivery.event_id == OutboundEvent.id))

# (table, its time column or an expression that is NULL while the row must stay).
FORWARDING_TARGETS: tuple[tuple[Table, ColumnElement[datetime]], ...] = (
    (cast(Table, Delivery.__table__), cast(ColumnElement[datetime], Delivery.finished_at)),
    (cast(Table, OutboundEvent.__table__),
     case((_LEFT, None), else_=OutboundEvent.occurred_at)),
)
