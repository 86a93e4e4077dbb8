"""Keyset paging, the one way every list route pages: `cursor` is the id of the last row seen
and a page is the rows below it, newest first, so rows inserted while a client pages through
never shift or repeat a page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Query

R = TypeVar("R")
# Its pattern is in the schema, so any cursor the schema allows is a valid one (ASCII digits
# only: `int()` would take `²` or other Unicode digits and then fail).
CURSOR_PATTERN = r"^[0-9]{1,18}$"
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page",
                                     pattern=CURSOR_PATTERN)]


Limit = Annotated[int, Query(ge=1, le=1000, description="Items per page")]


def decode_cursor(cursor: str | None) -> int | None:
    """The id below which the page starts (the Cursor type has checked its form)."""
    return None if cursor is None else int(cursor)


def page_of(rows: list[R], limit: int, id_of: Callable[[R], int]) -> tuple[list[R], str | None]:
    """A page of rows fetched with `limit + 1` (to see whether more follow), and the
    next_cursor: the last row's id, or None on the last page."""
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, str(id_of(rows[-1])) if more and rows else None
