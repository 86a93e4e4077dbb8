"""Tables. The schema itself is built only by the Alembic migrations under migrations/."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime

# SQLite only gives an auto-incrementing key to INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Message(Base):
    """One row per provider msg_id: its current status, folded from every event."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # msg_key is the matching key (UUIDs lower-cased); msg_id is kept as first received.
    msg_key: Mapped[str] = mapped_column(String(64), unique=True)
    msg_id: Mapped[str] = mapped_column(String(64))
    p_transaction_id: Mapped[str | None] = mapped_column(Text)
    phone: Mapped[str | None] = mapped_column(String(32))
    sender: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str | None] = mapped_column(String(32))
    send_id: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    status_rank: Mapped[int] = mapped_column(Integer)
    status_extended: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(None, "p_transaction_id", "id"),
        Index(None, "phone", "id"),
        Index(None, "status", "id"),
        Index(None, "created_at"),
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
