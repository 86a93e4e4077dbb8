"""The message as every route shows it: the single lookup, pages, exports and forwarded events."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, model_validator

from app.core.notifications import shown_status_extended


class MessageSummary(BaseModel):
    """A message as every route shows it (the lookup, pages, forwarded events)."""

    msg_id: str
    p_transaction_id: str | None
    phone: str | None
    sender: str | None
    kind: str | None
    status: str
    status_extended: str | None
    sent_at: datetime | None
    delivered_at: datetime | None
    seen_at: datetime | None
    created_at: datetime
    updated_at: datetime
    campaign: str | None = None

    @model_validator(mode="after")
    def _shown_code(self) -> MessageSummary:
        self.status_extended = shown_status_extended(self.status_extended, self.kind)
        return self
