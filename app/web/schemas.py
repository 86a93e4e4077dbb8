"""Answer models and query types every /api route shares: pages, errors, times, the 422 shape."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page"
    )


class ErrorOut(BaseModel):
    detail: str


class Health(BaseModel):
    status: str
    # While PostgreSQL is away and callbacks are spooled (/readyz only).
    database: str | None = None
    spool_depth: int | None = None
    spool_oldest_seconds: float | None = None


def invalid(loc: tuple[str, ...], msg: str) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own, so every 422 matches the OpenAPI schema."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg}])


# Times in query parameters. Pydantic alone also takes numbers as Unix times (`until=0.5`)
# while the schema says ISO 8601 date-time; this type takes ISO 8601 only: a date, or a date
# and time with an optional zone. A time without a zone is UTC, as everywhere in this API;
# a time that falls outside the calendar once moved to UTC is refused (not a 500).
_ISO_8601 = re.compile(
    r"\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}([.,]\d{1,9})?)?([Zz]|[+-]\d{2}(:?\d{2})?)?)?")


def _iso_8601_only(value: object) -> object:
    if isinstance(value, str) and not _ISO_8601.fullmatch(value.strip()):
        raise ValueError("must be an ISO 8601 date or date-time, e.g. 2026-11-27T10:00:00Z")
    if isinstance(value, int | float):
        raise ValueError("must be an ISO 8601 date or date-time, not a number")
    return value


def _in_utc(value: datetime) -> datetime:
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


UtcDateTime = Annotated[datetime, BeforeValidator(_iso_8601_only), AfterValidator(_in_utc)]
"""A query time: ISO 8601 only, returned timezone-aware in UTC (no zone given: UTC)."""

# What every /api route may answer besides its own result, for the OpenAPI schema: the
# access rule's 401 and 403, and 503 when the database cannot answer (with Retry-After).
API_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut,
          "description": "API keys are configured and none (or a wrong one) was presented",
          "headers": {"WWW-Authenticate": {"schema": {"type": "string"},
                                           "description": "Bearer"}}},
    403: {"model": ErrorOut,
          "description": "no API keys are configured and the client is not on loopback"},
    503: {"model": ErrorOut, "description": "the database is unavailable; retry later",
          "headers": {"Retry-After": {"schema": {"type": "string"},
                                      "description": "seconds to wait"}}},
}
