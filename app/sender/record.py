"""Recording sends: a `sends` row for every request, and a message row per returned msg_id
(merged through the same upsert as the DLRs, so whichever arrives first, they meet)."""

from __future__ import annotations

from sqlalchemy import Engine, insert

from app.db import utcnow
from app.ingest import MessageDelta, upsert_messages
from app.models import Send
from app.notifications import Status, msg_key
from app.sender.client import Delivery
from app.sender.messages import SendRequest


def record_send(engine: Engine, request: SendRequest, delivery: Delivery) -> int:
    """Store what happened to one send request in one transaction; return the sends row id."""
    assert request.p_transaction_id is not None
    now = utcnow()
    with engine.begin() as conn:
        send_id = conn.execute(
            insert(Send).returning(Send.id),
            {
                "p_transaction_id": request.p_transaction_id,
                "kind": request.kind.value,
                "sending_method": request.sending_method,
                "sender": request.sender,
                "phones": ",".join(request.phone),
                "outcome": delivery.outcome,
                "code": delivery.code,
                "tech_message": delivery.tech_message,
                "attempts": delivery.attempts,
                "created_at": now,
            },
        ).scalar_one()
        upsert_messages(conn, [
            MessageDelta(
                msg_key=msg_key(msg_id), msg_id=msg_id, updated_at=now,
                status=Status.ACCEPTED, phone=phone, p_transaction_id=request.p_transaction_id,
                sender=request.sender, kind=request.kind.value, send_id=send_id, sent_at=now,
            )
            for phone, msg_id in delivery.msg_ids.items()
        ])
    return int(send_id)
