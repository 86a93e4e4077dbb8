"""Tables. The schema itself is built only by the Alembic migrations under migrations/.

Every column of `messages` says, in its `info`, how the write path merges a new value into
a stored row (`Merge`); the SQL upsert is generated from that (app/store/write.py), so a new
column is one line here plus its migration.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.store.db import Base, UTCDateTime

# SQLite only gives an auto-incrementing key to INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Merge(StrEnum):
    """How a value arriving for a message that already has a row is merged into it."""

    KEY = "key"            # the conflict target itself
    KEEP = "keep"          # the first value stays (never updated)
    FIRST = "first"        # the first non-null value stays
    SEND = "send"          # the send record's value wins over what a DLR implied
    RANKED = "ranked"      # taken when the new status wins under the precedence rule
    ON_CHANGE = "change"   # taken when the stored status changes
    PREVIOUS = "previous"  # the stored status before it last changed
    SEQUENCE = "sequence"  # counts status changes and replies (forwarded events)
    LATEST = "latest"      # the newest value
    ADD = "add"            # a count: what the new row carries is added
    LABEL = "label"        # set by the send record; a DLR only fills it while it is empty


def merge(rule: Merge) -> dict[str, Merge]:
    return {"merge": rule}


class Message(Base):
    """One row per provider msg_id: its current status, folded from every event."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # msg_key is the matching key (UUIDs lower-cased); msg_id is kept as first received.
    msg_key: Mapped[str] = mapped_column(String(64), unique=True, info=merge(Merge.KEY))
    msg_id: Mapped[str] = mapped_column(String(64), info=merge(Merge.KEEP))
    p_transaction_id: Mapped[str | None] = mapped_column(Text, info=merge(Merge.FIRST))
    phone: Mapped[str | None] = mapped_column(String(32), info=merge(Merge.SEND))
    sender: Mapped[str | None] = mapped_column(Text, info=merge(Merge.SEND))
    kind: Mapped[str | None] = mapped_column(String(32), info=merge(Merge.SEND))
    send_id: Mapped[int | None] = mapped_column(BigInteger, info=merge(Merge.SEND))
    status: Mapped[str] = mapped_column(String(16), info=merge(Merge.RANKED))
    status_rank: Mapped[int] = mapped_column(Integer, info=merge(Merge.RANKED))
    status_extended: Mapped[str | None] = mapped_column(Text, info=merge(Merge.RANKED))
    # The status before the last change, and the event (dedupe_key) that made the change.
    previous_status: Mapped[str | None] = mapped_column(String(16), info=merge(Merge.PREVIOUS))
    status_event: Mapped[str | None] = mapped_column(String(32), info=merge(Merge.ON_CHANGE))
    # The forwarded events' per-message sequence: +1 per status change and per reply.
    event_seq: Mapped[int] = mapped_column(Integer, server_default="0",
                                           info=merge(Merge.SEQUENCE))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, info=merge(Merge.SEND))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, info=merge(Merge.FIRST))
    seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime, info=merge(Merge.FIRST))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, info=merge(Merge.KEEP))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, info=merge(Merge.LATEST))
    # The campaign label (app/core/notifications.py's campaign rules).
    campaign: Mapped[str | None] = mapped_column(String(64), info=merge(Merge.LABEL))
    # Notifications stored per type: what the counts' triggers read the new ones off
    # (app/store/counts.py), and whether the message was replied to.
    delivery_events: Mapped[int] = mapped_column(Integer, server_default="0",
                                                 info=merge(Merge.ADD))
    seen_events: Mapped[int] = mapped_column(Integer, server_default="0", info=merge(Merge.ADD))
    reply_events: Mapped[int] = mapped_column(Integer, server_default="0",
                                              info=merge(Merge.ADD))

    __table_args__ = (
        Index(None, "p_transaction_id", "id"),
        Index(None, "phone", "id"),
        Index(None, "status", "id"),
        Index(None, "campaign", "id"),
        # Pages by time (`since`, `until`) walk this index in its own order.
        Index(None, "created_at", "id"),
    )


class Event(Base):
    """The timeline: every distinct notification once (dedupe_key makes resends no-ops)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    dedupe_key: Mapped[str] = mapped_column(String(32), unique=True)
    msg_key: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str | None] = mapped_column(String(16))
    status_extended: Mapped[str | None] = mapped_column(Text)
    unknown_status_extended: Mapped[bool] = mapped_column(Boolean, default=False)
    text: Mapped[str | None] = mapped_column(Text)
    # The reply's original bytes, kept only when they were not clean UTF-8.
    text_raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    p_transaction_id: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(None, "msg_key", "id"),
        Index(None, "type", "id"),
        Index(None, "received_at"),
    )


class Rejected(Base):
    """Callbacks that could not be read as a notification, kept with the reason."""

    __tablename__ = "rejected"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    reason: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(8))
    content_type: Mapped[str | None] = mapped_column(Text)
    query: Mapped[bytes] = mapped_column(LargeBinary)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    source_ip: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Send(Base):
    """Every request the send module made to the provider, accepted or not."""

    __tablename__ = "sends"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    p_transaction_id: Mapped[str] = mapped_column(Text, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    sending_method: Mapped[str] = mapped_column(String(16))
    sender: Mapped[str | None] = mapped_column(Text)
    phones: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))  # accepted | refused | unknown
    code: Mapped[int | None] = mapped_column(Integer)
    tech_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# --- Forwarding (outbound webhooks, app/forward/) ---------------------------------------


class Endpoint(Base):
    """Where events are forwarded: one of the user's own webhook receivers."""

    __tablename__ = "endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    # Comma-separated event types, e.g. "message.status,message.reply".
    events: Mapped[str] = mapped_column(Text)
    p_transaction_id_prefix: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(Text)
    # JSON list of [secret, expires_at] pairs: rotated-out secrets that still sign for 24 h.
    previous_secrets: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # The endpoint of DLR_FORWARD_URL / DLR_FORWARD_SECRET, kept in step with the settings.
    from_settings: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Set while the user has paused it (PATCH enabled=false): deliveries are still created
    # and wait; none is attempted or fails. `enabled` false is a 410 (or an unset
    # DLR_FORWARD_URL): no deliveries are created; events are still stored for a replay.
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OutboundEvent(Base):
    """One event to forward (a status change or a reply), with the exact body every
    delivery of it sends, so retries and replays are byte-identical and keep webhook_id."""

    __tablename__ = "outbound_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(String(40), unique=True)
    type: Mapped[str] = mapped_column(String(32))
    msg_key: Mapped[str] = mapped_column(String(64))
    p_transaction_id: Mapped[str | None] = mapped_column(Text)
    sequence: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(None, "occurred_at"),
        Index(None, "msg_key", "id"),
    )


class Delivery(Base):
    """One event on its way to one endpoint: pending until a 2xx, or failed."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("outbound_events.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("endpoints.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # A dispatcher's claim: others skip the row until lease_until; a crashed process's
    # claims come back when it passes. lease_token tells the claimer its claim still holds.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_token: Mapped[str | None] = mapped_column(String(32))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Set when the delivery stops being pending (delivered or failed); retention keys on it.
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        # The dispatcher's claim: due pending deliveries of one endpoint, oldest first.
        Index("ix_deliveries_due", "endpoint_id", "next_attempt_at",
              postgresql_where=text("status = 'pending'"),
              sqlite_where=text("status = 'pending'")),
        Index(None, "event_id"),
        # Only finished deliveries are indexed (for retention): an insert on the ingest path
        # adds no entry here.
        Index(None, "finished_at", postgresql_where=text("finished_at IS NOT NULL"),
              sqlite_where=text("finished_at IS NOT NULL")),
    )


class DeliveryAttempt(Base):
    """One HTTP request of a delivery: when, the answer, how long, and what came back."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("deliveries.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(String(40))
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status_code: Mapped[int | None] = mapped_column(Integer)
    ok: Mapped[bool] = mapped_column(Boolean)
    latency_ms: Mapped[float] = mapped_column(Float)
    # The first 1 KB of the answer's body, or of the error when there was no answer.
    response: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index(None, "delivery_id", "id"),
        Index(None, "endpoint_id", "attempted_at"),
    )


# --- Counts for the dashboard (app/store/counts.py) -------------------------------------------
# "Squashable" counts, as nyaruka's RapidPro keeps them: database triggers insert delta rows in
# the same commit as the rows they count, reads sum them, and a background squash folds the
# rows of one key into one. Writers never update a shared row, so two replicas writing the
# same campaign at once do not wait for each other.


class MessageCount(Base):
    """Per minute and campaign ("*": every message, "" never used): messages first known in
    that minute by status and how far they got, and notifications received in it."""

    __tablename__ = "message_counts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bucket: Mapped[datetime] = mapped_column(UTCDateTime)
    campaign: Mapped[str] = mapped_column(String(64))
    messages: Mapped[int] = mapped_column(BigInteger, server_default="0")
    accepted: Mapped[int] = mapped_column(BigInteger, server_default="0")
    in_process: Mapped[int] = mapped_column(BigInteger, server_default="0")
    delivered: Mapped[int] = mapped_column(BigInteger, server_default="0")
    undelivered: Mapped[int] = mapped_column(BigInteger, server_default="0")
    seen: Mapped[int] = mapped_column(BigInteger, server_default="0")
    reached: Mapped[int] = mapped_column(BigInteger, server_default="0")   # delivered_at set
    opened: Mapped[int] = mapped_column(BigInteger, server_default="0")    # seen_at set
    replied: Mapped[int] = mapped_column(BigInteger, server_default="0")   # a reply or more
    ev_delivery: Mapped[int] = mapped_column(BigInteger, server_default="0")
    ev_seen: Mapped[int] = mapped_column(BigInteger, server_default="0")
    ev_reply: Mapped[int] = mapped_column(BigInteger, server_default="0")
    rejected: Mapped[int] = mapped_column(BigInteger, server_default="0")

    __table_args__ = (Index(None, "campaign", "bucket"),)


class CodeCount(Base):
    """Per minute and campaign: messages first known then, by the status_extended they show."""

    __tablename__ = "code_counts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bucket: Mapped[datetime] = mapped_column(UTCDateTime)
    campaign: Mapped[str] = mapped_column(String(64))
    code: Mapped[str] = mapped_column(Text)
    n: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index(None, "campaign", "bucket"),)


class CampaignCount(Base):
    """Per campaign, over its whole life: its messages by status and how far they got, and
    when it was first and last active."""

    __tablename__ = "campaign_counts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    campaign: Mapped[str] = mapped_column(String(64))
    messages: Mapped[int] = mapped_column(BigInteger, server_default="0")
    accepted: Mapped[int] = mapped_column(BigInteger, server_default="0")
    in_process: Mapped[int] = mapped_column(BigInteger, server_default="0")
    delivered: Mapped[int] = mapped_column(BigInteger, server_default="0")
    undelivered: Mapped[int] = mapped_column(BigInteger, server_default="0")
    seen: Mapped[int] = mapped_column(BigInteger, server_default="0")
    reached: Mapped[int] = mapped_column(BigInteger, server_default="0")
    opened: Mapped[int] = mapped_column(BigInteger, server_default="0")
    replied: Mapped[int] = mapped_column(BigInteger, server_default="0")
    first_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index(None, "campaign"),)
