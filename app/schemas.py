"""Pydantic models of the REST API's answers (and, with the send module, its requests)."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page"
    )


class ErrorOut(BaseModel):
    detail: str


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


class MessageSummary(BaseModel):
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


class MessageOut(MessageSummary):
    replies: list[ReplyOut]
    events: list[EventOut]


class ReplyItem(BaseModel):
    msg_id: str
    p_transaction_id: str | None
    phone: str | None
    text: str
    received_at: datetime


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


class Health(BaseModel):
    status: str


def invalid(loc: tuple[str, ...], msg: str) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own, so every 422 matches the OpenAPI schema."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg}])
