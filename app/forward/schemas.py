"""Request and answer models of the forwarding routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from app.core.targets import check_url
from app.store.outbox import EVENT_TYPES, EventType


def aware(value: datetime) -> datetime:
    """A time without an offset is read as UTC, as everywhere in the API."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def storable(value: str) -> str:
    """Text the database can store: no NUL (PostgreSQL refuses it), no unpaired surrogate
    (no encoding has it); refused with the reason rather than failing at the database."""
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must not contain an unpaired surrogate (not valid Unicode)") from None
    return value


StorableText = Annotated[str, AfterValidator(storable)]
MAX_EVENTS = 8  # two types exist; a few repeats are harmless, a long list is refused at once
EVENTS_DOC = f"Event types to forward ({', '.join(EVENT_TYPES)})"
PREFIX_DOC = "Only messages whose p_transaction_id starts with this"


def _checked_url(value: str) -> str:
    return check_url(storable(value))


class EndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, AfterValidator(_checked_url)] = Field(
        max_length=2000,
        description="http(s) URL; link-local (metadata) addresses are refused")
    events: list[EventType] = Field(default_factory=lambda: list(EVENT_TYPES), min_length=1,
                                    max_length=MAX_EVENTS, description=EVENTS_DOC)
    p_transaction_id_prefix: StorableText | None = Field(
        default=None, max_length=255, description=PREFIX_DOC)
    description: StorableText | None = Field(default=None, max_length=1000)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[EventType]) -> list[EventType]:
        return list(dict.fromkeys(value))


class EndpointPatch(BaseModel):
    """The fields to change; those left out stay. `enabled` false pauses the endpoint, true
    resumes (and enables) it. `p_transaction_id_prefix` or `description` null clears it."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, AfterValidator(_checked_url)] | None = Field(
        default=None, max_length=2000)
    events: list[EventType] | None = Field(default=None, min_length=1, max_length=MAX_EVENTS,
                                           description=EVENTS_DOC)
    p_transaction_id_prefix: StorableText | None = Field(
        default=None, max_length=255, description=PREFIX_DOC)
    description: StorableText | None = Field(default=None, max_length=1000)
    enabled: bool | None = Field(default=None, description="false: pause; true: resume")

    @model_validator(mode="after")
    def _given(self) -> EndpointPatch:
        for name in ("url", "events", "enabled"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null (leave it out to keep it)")
        if not self.model_fields_set:
            raise ValueError("nothing to change: give at least one field")
        return self

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


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
    enabled: bool = Field(description="false while paused or disabled (see disabled_reason)")
    paused: bool = Field(description="Paused by the user: deliveries wait, none fails")
    paused_at: datetime | None
    disabled_reason: str | None = Field(
        description="Why it is disabled (a 410, DLR_FORWARD_URL unset) or paused")
    from_settings: bool
    created_at: datetime
    updated_at: datetime
    circuit_open_until: datetime | None = Field(
        default=None, description="Failing: no attempt before this time (null: closed)")
    stats: EndpointStatsOut | None = None

    @classmethod
    def of(cls, row: Any, *, secret: str, stats: EndpointStatsOut | None = None,
           circuit_open_until: datetime | None = None) -> EndpointOut:
        paused = row.paused_at is not None
        return cls(id=row.id, url=row.url, events=row.events.split(","),
                   p_transaction_id_prefix=row.p_transaction_id_prefix,
                   description=row.description, secret=secret,
                   enabled=row.enabled and not paused, paused=paused, paused_at=row.paused_at,
                   disabled_reason=row.disabled_reason or ("paused" if paused else None),
                   from_settings=row.from_settings, created_at=row.created_at,
                   updated_at=row.updated_at, circuit_open_until=circuit_open_until,
                   stats=stats)


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
    next_attempt_at: datetime | None = Field(
        description="When pending: the next attempt (while the endpoint's circuit is open, "
                    "when the circuit lets the next attempt through)")
    circuit_open: bool = Field(
        default=False, description="Pending and held back: its endpoint keeps failing")
    endpoint_paused: bool = Field(default=False, description="Pending and its endpoint paused")
    finished_at: datetime | None
    attempt_count: int
    last_status_code: int | None
    last_error: str | None
    attempts: list[AttemptOut]


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None


class EndpointTestOut(BaseModel):
    """One signed `endpoint.test` event sent now (not stored as a delivery)."""

    endpoint_id: str
    webhook_id: str
    ok: bool = Field(description="A 2xx answer came")
    status_code: int | None = Field(description="null when no answer came (error, timeout)")
    latency_ms: float
    error: str | None = Field(description="Why it failed: the status, or the error")
    response: str | None = Field(description="First 1 KB of the answer's body")
