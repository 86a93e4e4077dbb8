"""Small helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine, func, select, text

from app.config import Settings, load_settings
from app.ingest import SendRecord, store
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


def record_send(engine: Engine, msg_id: str, phone: str, ptid: str) -> None:
    """Record an accepted send of one message through the write path, as the send module
    does."""
    with engine.begin() as conn:
        store(conn, [SendRecord(
            p_transaction_id=ptid, kind="text", sending_method="viber", sender="Shop",
            phones=[phone], outcome="accepted", code=0, tech_message="OK", attempts=1,
            created_at=datetime.now(UTC), msg_ids={phone: msg_id})])


# Every table, children first (wiped between tests).
TABLES = ("delivery_attempts", "deliveries", "outbound_events", "endpoints",
          "events", "messages", "rejected", "sends")
AppFactory = Callable[..., Awaitable[FastAPI]]


def make_settings(**values: Any) -> Settings:
    return load_settings(_env_file=None, **values)


def wipe(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
        else:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))


def client_for(app: FastAPI, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")
