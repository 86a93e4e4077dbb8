"""`dlr purge` and forwarding: finished deliveries go, pending ones never do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, select, update

from app.forward.queue import Outcome, record
from app.store.models import Delivery, DeliveryAttempt, OutboundEvent
from app.store.retention import purge

from ..helpers import add_endpoint, count, emit, status_event


def test_purge_removes_finished_deliveries_and_keeps_pending_ones(engine: Engine) -> None:
    ep = add_endpoint(engine, "http://127.0.0.1:9/")
    old = datetime.now(UTC) - timedelta(days=40)
    emit(engine, [status_event(f"m-{i}", "delivered", at=old) for i in range(4)])
    with engine.begin() as conn:
        ids = sorted(conn.scalars(select(Delivery.id)))
        # m-0 delivered long ago, m-1 failed long ago, m-2 delivered yesterday, m-3 pending.
        for delivery_id, status, at in ((ids[0], "delivered", old), (ids[1], "failed", old),
                                        (ids[2], "delivered", datetime.now(UTC) - timedelta(1))):
            conn.execute(update(Delivery).where(Delivery.id == delivery_id)
                         .values(lease_token="t"))
            record(conn, [Outcome(delivery_id, ep.id, "t", status, attempted_at=at,
                                  status_code=200 if status == "delivered" else 500,
                                  ok=status == "delivered")])
    assert count(engine, DeliveryAttempt) == 3

    deleted = purge(engine, before=datetime.now(UTC) - timedelta(days=30))

    assert deleted["deliveries"] == 2 and deleted["outbound_events"] == 2
    with engine.connect() as conn:
        left = sorted(conn.execute(select(Delivery.id, Delivery.status)).all())
        events = sorted(conn.scalars(select(OutboundEvent.msg_key)))
    assert left == [(ids[2], "delivered"), (ids[3], "pending")]
    assert events == ["m-2", "m-3"]  # m-3's event is older than the cut-off, but still owed
    assert count(engine, DeliveryAttempt) == 1  # the purged deliveries' attempts went too
