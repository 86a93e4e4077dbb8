"""What the REST reads share: the database dependency and the time window."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from sqlalchemy import ColumnElement

from app.store.db import Database
from app.web.schemas import UtcDateTime


async def get_database(request: Request) -> Database:
    return request.app.state.database  # type: ignore[no-any-return]


# Routes open their session inside a read thread and close it there (Database.session), so
# a connection is never held while waiting for a thread to tear a dependency down.
DatabaseDep = Annotated[Database, Depends(get_database)]
Since = Annotated[UtcDateTime | None, Query(description="ISO 8601; inclusive")]
Until = Annotated[UtcDateTime | None, Query(description="ISO 8601; exclusive")]


def window(col: Any, since: datetime | None, until: datetime | None
            ) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if since is not None:
        conds.append(col >= since)
    if until is not None:
        conds.append(col < until)
    return conds


