"""Values the database cannot store (a NUL on PostgreSQL, a lone surrogate anywhere) are the
caller's mistake: a clear 4xx naming the problem, never 503 "database unavailable"."""

from __future__ import annotations

import json

import httpx
import pytest

NUL = "a parameter holds a character the database cannot store (NUL)"


@pytest.mark.parametrize("path", [
    "/api/v1/messages?p_transaction_id=a%00b",
    "/api/v1/messages?phone=%00",
    "/api/v1/stats?p_transaction_id=%00",
])
async def test_a_nul_in_a_filter_is_a_400_naming_it_on_postgresql(
        client: httpx.AsyncClient, backend: str, path: str) -> None:
    r = await client.get(path)
    if backend == "postgresql":
        assert r.status_code == 400, r.text
        assert r.json() == {"detail": NUL}
        assert "retry-after" not in r.headers
    else:  # SQLite stores and compares a NUL like any other character
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", [
    "/api/v1/messages?p_transaction_id=%ED%A0%80",
    "/api/v1/stats?p_transaction_id=%ED%A0%80",
])
async def test_a_lone_surrogate_in_a_filter_is_no_error(client: httpx.AsyncClient,
                                                        path: str) -> None:
    # The query string is decoded with replacement: no surrogate reaches the database.
    assert (await client.get(path)).status_code == 200


@pytest.mark.parametrize("value", ["a\u0000b", "a\ud800b"])
async def test_an_odd_character_in_a_json_body_field_is_a_4xx(
        client: httpx.AsyncClient, value: str) -> None:
    # json.dumps escapes the surrogate (\ud800), as a client sending it must.
    body = json.dumps({"url": "https://example.com/hook", "description": value}).encode()
    r = await client.post("/api/v1/endpoints", content=body,
                          headers={"content-type": "application/json"})
    assert r.status_code in (201, 400, 422), (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"


async def test_an_unknown_id_with_a_nul_or_a_surrogate_is_still_404(
        client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/messages/a%00b")).status_code == 404
    assert (await client.get("/api/v1/messages/%ED%A0%80")).status_code == 404


async def test_the_handler_tells_a_refused_value_from_an_unavailable_database() -> None:
    import sqlite3

    import psycopg
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DataError, OperationalError

    from app.main import NUMBER_REFUSED, SURROGATE_REFUSED, _value_refused

    wrapped = DataError("SELECT", {}, psycopg.DataError(
        "PostgreSQL text fields cannot contain NUL (0x00) bytes"))
    assert _value_refused(wrapped) == NUL
    assert _value_refused(OperationalError("SELECT", {}, sqlite3.OperationalError(
        "database is locked"))) is None
    assert _value_refused(psycopg.OperationalError("connection refused")) is None
    engine = create_engine("sqlite://")
    for value, detail in (("\ud800", SURROGATE_REFUSED), (10**30, NUMBER_REFUSED)):
        with engine.connect() as conn:
            try:
                conn.execute(text("SELECT :v"), {"v": value})
            except (UnicodeEncodeError, OverflowError) as exc:
                assert _value_refused(exc) == detail
            else:
                raise AssertionError("the driver took it")
    try:
        "\ud800".encode()
    except UnicodeEncodeError as exc:  # not from the database: a bug, answered 500
        assert _value_refused(exc) is None
