"""The REST API as its users see it: lookups, filters, pages, stats, access."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine

from ..helpers import AppFactory, client_for, dlr, record_send


async def test_unknown_message_is_404_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/v1/messages/nope")
    assert r.status_code == 404
    assert "nope" in r.json()["detail"]


async def test_filters(client: httpx.AsyncClient, engine: Engine) -> None:
    record_send(engine, "a1", "79000000001", "camp-A")
    record_send(engine, "a2", "79000000002", "camp-A")
    record_send(engine, "b1", "79000000001", "camp-B")
    await dlr(client, type="delivery", msg_id="a2", status="delivered")

    async def ids(**params: str) -> list[str]:
        r = await client.get("/api/v1/messages", params=params)
        assert r.status_code == 200, r.text
        return [m["msg_id"] for m in r.json()["items"]]

    assert await ids(p_transaction_id="camp-A") == ["a2", "a1"]
    assert await ids(phone="79000000001") == ["b1", "a1"]
    assert await ids(status="delivered") == ["a2"]
    assert await ids(status="accepted", p_transaction_id="camp-A") == ["a1"]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert await ids(since=future) == []
    assert await ids(until=future) == ["b1", "a2", "a1"]
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).replace(tzinfo=None).isoformat()
    assert await ids(since=hour_ago, until=future) == ["b1", "a2", "a1"]  # no zone: UTC
    assert await ids(until=hour_ago, phone="79000000001") == []
    bad = await client.get("/api/v1/messages", params={"status": "lost"})
    assert bad.status_code == 422 and "detail" in bad.json()


async def test_pages_are_stable_under_concurrent_inserts(client: httpx.AsyncClient) -> None:
    await asyncio.gather(*[dlr(client, type="seen", msg_id=f"p{i:03}") for i in range(25)])
    seen: list[str] = []
    cursor = None
    inserted = 0
    while True:
        params = {"limit": "10"} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/api/v1/messages", params=params)).json()
        seen += [m["msg_id"] for m in page["items"]]
        # New callbacks arrive between page reads; they must not shift or repeat anything.
        await asyncio.gather(*[dlr(client, type="seen", msg_id=f"new{inserted + i}")
                               for i in range(7)])
        inserted += 7
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(f"p{i:03}" for i in range(25))
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("path", ["/api/v1/messages", "/api/v1/replies", "/api/v1/rejected",
                                  "/api/v1/deliveries"])
@pytest.mark.parametrize("cursor", ["!!not-a-cursor", "²", "١٢", "1" * 26, "-5", ""])
async def test_bad_cursor_is_a_clear_error_on_every_list(client: httpx.AsyncClient, path: str,
                                                         cursor: str) -> None:
    """Every list pages the same way: a cursor that is not a next_cursor is a 422 naming it
    (a superscript or Arabic-Indic digit passed `str.isdigit()` and then failed `int()`)."""
    r = await client.get(path, params={"cursor": cursor})
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["query", "cursor"]


async def test_replies_newest_first_with_their_message(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    record_send(engine, "rq1", "79000000009", "camp-R")
    await dlr(client, type="reply", msg_id="rq1", text="first")
    await dlr(client, type="reply", msg_id="rq1", text="second")
    await dlr(client, type="reply", msg_id="other", text="third")
    page = (await client.get("/api/v1/replies", params={"limit": 2})).json()
    assert [i["text"] for i in page["items"]] == ["third", "second"]
    rest = (await client.get("/api/v1/replies", params={"cursor": page["next_cursor"]})).json()
    assert rest["items"] == [{"msg_id": "rq1", "p_transaction_id": "camp-R",
                              "phone": "79000000009", "text": "first",
                              "received_at": rest["items"][0]["received_at"],
                              "campaign": None}]
    assert rest["next_cursor"] is None


async def test_stats(client: httpx.AsyncClient) -> None:
    await dlr(client, type="delivery", msg_id="s1", status="delivered")
    await dlr(client, type="delivery", msg_id="s2", status="undelivered",
              status_extended="VIBER_USER_NOT_FOUND")
    await dlr(client, type="delivery", msg_id="s3", status="undelivered",
              status_extended="VIBER_USER_NOT_FOUND")
    await dlr(client, type="seen", msg_id="s1")
    await dlr(client, type="bogus", msg_id="s9")
    s = (await client.get("/api/v1/stats")).json()
    assert s["total"] == 3
    assert s["by_status"]["undelivered"] == 2 and s["by_status"]["seen"] == 1
    assert s["by_status_extended"] == {"VIBER_USER_NOT_FOUND": 2}
    assert s["events_by_type"] == {"delivery": 3, "seen": 1, "reply": 0}
    assert s["rejected"] == 1
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert (await client.get("/api/v1/stats", params={"since": later})).json()["total"] == 0


async def test_rejected_pages_newest_first(client: httpx.AsyncClient) -> None:
    for i in range(3):
        await dlr(client, type="nope", msg_id=f"x{i}")
    page = (await client.get("/api/v1/rejected", params={"limit": 2})).json()
    assert [i["query"] for i in page["items"]] == ["type=nope&msg_id=x2", "type=nope&msg_id=x1"]
    rest = (await client.get("/api/v1/rejected", params={"cursor": page["next_cursor"]})).json()
    assert [i["query"] for i in rest["items"]] == ["type=nope&msg_id=x0"]


async def test_without_keys_only_loopback_may_read(app_with: AppFactory) -> None:
    app = await app_with()
    async with client_for(app, peer="::1") as local:
        assert (await local.get("/api/v1/stats")).status_code == 200
    async with client_for(app, peer="192.0.2.10") as remote:
        r = await remote.get("/api/v1/stats")
        assert r.status_code == 403 and "loopback" in r.json()["detail"]
        forged = await remote.get("/api/v1/stats", headers={"X-Forwarded-For": "127.0.0.1"})
        assert forged.status_code == 403


async def test_api_keys(app_with: AppFactory) -> None:
    app = await app_with(api_keys="key-one, key-two")
    async with client_for(app, peer="192.0.2.10") as c:
        assert (await c.get("/api/v1/stats", headers={"Authorization": "Bearer key-two"})
                ).status_code == 200
        assert (await c.get("/api/v1/stats", headers={"X-API-Key": "key-one"})).status_code == 200
        for headers in ({}, {"X-API-Key": "key-three"}, {"Authorization": "Bearer "},
                        {"Authorization": "Basic key-one"}):
            r = await c.get("/api/v1/stats", headers=headers)
            assert r.status_code == 401, headers
            assert r.json() == {"detail": "missing or wrong API key"}
        # The provider's callbacks are not behind the API keys.
        assert (await dlr(c, type="seen", msg_id="k1")).status_code == 200


async def test_health_ready_metrics_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    await dlr(client, type="seen", msg_id="m1")
    metrics = (await client.get("/metrics")).text
    assert 'dlr_callbacks_total{outcome="new",type="seen"}' in metrics
    assert "dlr_commit_seconds_bucket" in metrics
    schema = (await client.get("/openapi.json")).json()
    assert "/api/v1/messages/{msg_id}" in schema["paths"]
    assert (await client.get("/docs")).status_code == 200
