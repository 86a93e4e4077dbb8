"""What the REST reads share: the database dependency and the time window's parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from app.store.db import Database
from app.web.schemas import UtcDateTime


async def get_database(request: Request) -> Database:
    return request.app.state.database  # type: ignore[no-any-return]


# Routes open their session inside a read thread and close it there (Database.session), so
# a connection is never held while waiting for a thread to tear a dependency down.
DatabaseDep = Annotated[Database, Depends(get_database)]
Since = Annotated[UtcDateTime | None, Query(description="ISO 8601; inclusive")]
Until = Annotated[UtcDateTime | None, Query(description="ISO 8601; exclusive")]
