"""Times: aware UTC everywhere, ISO 8601 with a Z where the API writes them."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime) -> str:
    """ISO 8601 UTC with a Z, as the REST API writes times."""
    return value.isoformat().replace("+00:00", "Z")
