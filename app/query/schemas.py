"""Answer models of the REST reads."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.core.message import MessageSummary


class EventOut(BaseModel):
    type: str
    status: str | None
    status_extended: str | None
    unknown_status_extended: bool
    text: str | None
    received_at: datetime


class ReplyOut(BaseModel):
    text: str
    received_at: datetime


class MessageOut(MessageSummary):
    replies: list[ReplyOut]
    events: list[EventOut]


class ReplyItem(BaseModel):
    msg_id: str
    p_transaction_id: str | None
    phone: str | None
    text: str
    received_at: datetime
    campaign: str | None = None


class RejectedItem(BaseModel):
    id: int
    reason: str
    raw: str = Field(description="The body as received (the query string for a GET)")
    method: str
    content_type: str | None
    query: str
    source_ip: str | None
    received_at: datetime


class Funnel(BaseModel):
    sent: int = Field(description="Messages known (sent or reported on)")
    delivered: int = Field(description="Delivered (seen counts as delivered)")
    seen: int
    replied: int = Field(description="Messages with at least one reply")


class Stats(BaseModel):
    since: datetime | None
    until: datetime | None
    p_transaction_id: str | None = None
    campaign: str | None = None
    total: int
    by_status: dict[str, int]
    by_status_extended: dict[str, int]
    funnel: Funnel
    events_by_type: dict[str, int]
    rejected: int


class TimelinePoint(BaseModel):
    t: datetime
    delivery: int
    seen: int
    reply: int


class Timeline(BaseModel):
    bucket_seconds: int
    points: list[TimelinePoint]


class CampaignItem(BaseModel):
    campaign: str
    messages: int
    by_status: dict[str, int]
    funnel: Funnel
    first_at: datetime | None = Field(description="When its first message was first known")
    last_at: datetime | None = Field(description="Its latest notification or send")
