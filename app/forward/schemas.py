"""Request and answer models of the forwarding routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.targets import check_url
from app.store.outbox import EVENT_TYPES, EventType


def aware(value: datetime) -> datetime:
    """A time without an offset is read as UTC, as everywhere in the API."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class EndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="http(s) URL; link-local (metadata) addresses are refused")
    events: list[EventType] = Field(default_factory=lambda: list(EVENT_TYPES), min_length=1)
    p_transaction_id_prefix: str | None = Field(
        default=None, max_length=255,
        description="Only messages whose p_transaction_id starts with this")
    description: str | None = Field(default=None, max_length=1000)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[EventType]) -> list[EventType]:
        return list(dict.fromkeys(value))


class LastErrorOut(BaseModel):
    at: datetime
    status_code: int | None
    response: str | None


class EndpointStatsOut(BaseModel):
    pending: int = Field(description="Deliveries not yet delivered, due or waiting to retry")
    backlog: int = Field(description="Deliveries due now but not delivered yet")
    oldest_pending_at: datetime | None
    success_rate: float | None = Field(
        description="Share of 2xx answers among the latest attempts (null: none yet)")
    attempts_considered: int
    last_error: LastErrorOut | None


class EndpointOut(BaseModel):
    id: str
    url: str
    events: list[str]
    p_transaction_id_prefix: str | None
    description: str | None
    secret: str = Field(description="In full only when created or rotated; masked otherwise")
    enabled: bool
    disabled_reason: str | None
    from_settings: bool
    created_at: datetime
    updated_at: datetime
    stats: EndpointStatsOut | None = None

    @classmethod
    def of(cls, row: Any, *, secret: str, stats: EndpointStatsOut | None = None,
           ) -> EndpointOut:
        return cls(id=row.id, url=row.url, events=row.events.split(","),
                   p_transaction_id_prefix=row.p_transaction_id_prefix,
                   description=row.description, secret=secret, enabled=row.enabled,
                   disabled_reason=row.disabled_reason, from_settings=row.from_settings,
                   created_at=row.created_at, updated_at=row.updated_at, stats=stats)


class EndpointList(BaseModel):
    items: list[EndpointOut]


class ReplayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: datetime
    until: datetime | None = Field(default=None, description="Default: now")

    @model_validator(mode="after")
    def _window(self) -> ReplayIn:
        self.since = aware(self.since)
        if self.until is not None:
            self.until = aware(self.until)
            if self.until <= self.since:
                raise ValueError("until must be after since")
        return self


class ReplayOut(BaseModel):
    endpoint_id: str
    since: datetime
    until: datetime
    queued: int = Field(description="Deliveries queued (events already pending are skipped)")


class AttemptOut(BaseModel):
    attempted_at: datetime
    status_code: int | None = Field(description="null when no answer came (error, timeout)")
    ok: bool
    latency_ms: float
    response: str | None = Field(description="First 1 KB of the answer's body, or the error")


class DeliveryOut(BaseModel):
    id: int
    endpoint_id: str
    status: str = Field(description="pending, delivered or failed")
    webhook_id: str
    event_type: str
    msg_id: str | None
    sequence: int
    occurred_at: datetime
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="When pending: the next attempt")
    finished_at: datetime | None
    attempt_count: int
    last_status_code: int | None
    last_error: str | None
    attempts: list[AttemptOut]


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None
