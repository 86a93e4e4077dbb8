"""Small helpers shared by the tests."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import Engine, func, select

from app.models import Event, Rejected

UUID_A = "550e8400-e29b-41d4-a716-446655440000"
UUID_B = "550e8400-e29b-41d4-a716-446655440001"


async def dlr(client: httpx.AsyncClient, method: str = "GET", **fields: Any) -> httpx.Response:
    """Send one callback the way the provider does: GET with a query, or a POSTed form."""
    if method == "GET":
        return await client.get("/dlr", params=fields)
    return await client.post("/dlr", data=fields)


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


def events(engine: Engine) -> int:
    return count(engine, Event)


def rejected(engine: Engine) -> int:
    return count(engine, Rejected)
