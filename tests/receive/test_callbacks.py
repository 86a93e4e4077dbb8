"""The receiver from the provider's side: every encoding, resends, bad input, limits, access."""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine, select

from app.store.models import Event, Rejected

from ..helpers import UUID_A, AppFactory, client_for, dlr, events, rejected


async def status_of(client: httpx.AsyncClient, msg_id: str) -> dict:  # type: ignore[type-arg]
    r = await client.get(f"/api/v1/messages/{msg_id}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_get_with_query_string(client: httpx.AsyncClient) -> None:
    r = await dlr(client, type="delivery", msg_id=UUID_A, status="delivered", p_transaction_id="t1")
    assert (r.status_code, r.text) == (200, "OK")
    m = await status_of(client, UUID_A)
    assert (m["status"], m["p_transaction_id"]) == ("delivered", "t1")
    assert m["delivered_at"] is not None


async def test_post_form(client: httpx.AsyncClient) -> None:
    r = await dlr(client, "POST", type="delivery", msg_id="f1", status="undelivered",
                  status_extended="VIBER_BLOCKED_BY_USER")
    assert r.status_code == 200
    m = await status_of(client, "f1")
    assert (m["status"], m["status_extended"]) == ("undelivered", "VIBER_BLOCKED_BY_USER")


async def test_post_multipart(client: httpx.AsyncClient) -> None:
    r = await client.post("/dlr", files={
        "type": (None, "reply"), "msg_id": (None, "mp1"), "text": (None, "Да, спасибо")})
    assert r.status_code == 200
    m = await status_of(client, "mp1")
    assert [x["text"] for x in m["replies"]] == ["Да, спасибо"]


async def test_post_json(client: httpx.AsyncClient) -> None:
    r = await client.post("/dlr", json={"type": "delivery", "msg_id": "j1", "status": 0})
    assert r.status_code == 200
    assert (await status_of(client, "j1"))["status"] == "delivered"


async def test_query_and_body_merge_and_body_wins(client: httpx.AsyncClient) -> None:
    r = await client.post("/dlr?type=delivery&msg_id=q1&status=in_process",
                          data={"status": "delivered"})
    assert r.status_code == 200
    assert (await status_of(client, "q1"))["status"] == "delivered"


async def test_missing_or_unknown_content_type_is_read_as_form(client: httpx.AsyncClient) -> None:
    body = b"type=seen&msg_id=ct1"
    for headers in ({}, {"content-type": "text/plain"}):
        r = await client.post("/dlr", content=body, headers=headers)
        assert r.status_code == 200
    assert (await status_of(client, "ct1"))["status"] == "seen"
    assert len((await status_of(client, "ct1"))["events"]) == 1


async def test_sms_report_without_type(client: httpx.AsyncClient) -> None:
    assert (await dlr(client, msg_id="sms1", status="-2")).status_code == 200
    m = await status_of(client, "sms1")
    assert (m["status"], m["status_extended"]) == ("undelivered", "SMS_-2")


async def test_five_resends_make_one_event(client: httpx.AsyncClient, engine: Engine) -> None:
    for _ in range(5):
        r = await dlr(client, "POST", type="delivery", msg_id=UUID_A, status="delivered")
        assert r.status_code == 200
    assert events(engine) == 1


async def test_concurrent_resends_in_one_batch_make_one_event(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    answers = await asyncio.gather(*[
        dlr(client, type="delivery", msg_id=f"c{i % 20}", status="delivered") for i in range(200)
    ])
    assert {r.status_code for r in answers} == {200}
    assert events(engine) == 20


async def test_uuid_case_variants_are_one_message(client: httpx.AsyncClient,
                                                  engine: Engine) -> None:
    await dlr(client, type="delivery", msg_id=UUID_A.upper(), status="delivered")
    await dlr(client, type="delivery", msg_id=UUID_A, status="delivered")  # a resend
    await dlr(client, type="seen", msg_id=UUID_A)
    m = await status_of(client, UUID_A)
    assert m["msg_id"] == UUID_A.upper()  # as the provider first sent it
    assert m["status"] == "seen"
    assert events(engine) == 2


async def test_invalid_callback_is_answered_200_and_archived(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    r = await client.post("/dlr?x=1", data={"type": "delivery", "status": "delivered"})
    assert (r.status_code, r.text) == (200, "OK")
    assert events(engine) == 0
    page = (await client.get("/api/v1/rejected")).json()
    [item] = page["items"]
    assert item["reason"] == "missing msg_id"
    assert "status=delivered" in item["raw"]
    assert item["query"] == "x=1"


async def test_malformed_json_is_archived_as_received(client: httpx.AsyncClient,
                                                      engine: Engine) -> None:
    body = b'{"type": "seen", "msg_id": '
    r = await client.post("/dlr", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200
    with engine.connect() as conn:
        row = conn.execute(select(Rejected.reason, Rejected.body)).one()
    assert row.reason.startswith("malformed JSON body")
    assert row.body == body


async def test_unknown_status_extended_is_stored_and_flagged(client: httpx.AsyncClient) -> None:
    await dlr(client, type="delivery", msg_id="u1", status="undelivered",
              status_extended="SOMETHING_NEW")
    m = await status_of(client, "u1")
    assert m["status_extended"] == "SOMETHING_NEW"
    assert m["events"][0]["unknown_status_extended"] is True


async def test_non_utf8_bytes_in_form_body_are_kept(client: httpx.AsyncClient,
                                                    engine: Engine) -> None:
    body = b"type=reply&msg_id=nb1&text=Pr%EDvet+\xff\xfe+%00end"
    r = await client.post("/dlr", content=body,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    m = await status_of(client, "nb1")
    assert m["replies"][0]["text"] == "Pr\ufffdvet \ufffd\ufffd \ufffdend"
    with engine.connect() as conn:
        raw = conn.scalar(select(Event.text_raw))
    assert raw == b"Pr\xedvet \xff\xfe \x00end"


async def test_oversized_body_gets_413_and_nothing_is_stored(
    client: httpx.AsyncClient, engine: Engine, app: FastAPI
) -> None:
    limit = app.state.settings.max_callback_bytes
    big = {"type": "reply", "msg_id": "big", "text": "x" * limit}
    r = await client.post("/dlr", data=big)
    assert r.status_code == 413
    assert r.json()["detail"].startswith("callback body over")

    async def stream():  # type: ignore[no-untyped-def]  # no Content-Length: counted as read
        yield b"type=reply&msg_id=big&text="
        for _ in range(limit // 1000 + 1):
            yield b"y" * 1000

    r = await client.post("/dlr", content=stream())
    assert r.status_code == 413
    assert events(engine) == rejected(engine) == 0


async def test_token_in_path_or_query(app_with: AppFactory, engine: Engine) -> None:
    app = await app_with(callback_token="s3cret-t0ken")
    async with client_for(app) as c:
        assert (await c.get("/dlr/s3cret-t0ken", params={"type": "seen", "msg_id": "a"})
                ).status_code == 200
        assert (await c.get("/dlr", params={"type": "seen", "msg_id": "b",
                                            "token": "s3cret-t0ken"})).status_code == 200
        wrong = [
            await c.get("/dlr/s3cret-t0keN", params={"type": "seen", "msg_id": "c"}),
            await c.get("/dlr", params={"type": "seen", "msg_id": "d", "token": "nope"}),
            await c.post("/dlr", data={"type": "seen", "msg_id": "e"}),
        ]
    assert [r.status_code for r in wrong] == [403, 403, 403]
    assert events(engine) == 2


async def test_allow_list_refuses_other_sources(app_with: AppFactory, engine: Engine) -> None:
    app = await app_with(callback_allowed_ips="203.0.113.0/24")
    async with client_for(app, peer="203.0.113.9") as provider:
        assert (await dlr(provider, type="seen", msg_id="ok")).status_code == 200
    async with client_for(app, peer="198.51.100.7") as stranger:
        r = await dlr(stranger, type="seen", msg_id="no")
        assert r.status_code == 403
        # A forged X-Forwarded-For from a peer that is not a trusted proxy is not believed.
        r = await stranger.get("/dlr", params={"type": "seen", "msg_id": "no"},
                               headers={"X-Forwarded-For": "203.0.113.9"})
        assert r.status_code == 403
    async with client_for(app, peer="127.0.0.1") as local:
        r = await local.get("/dlr", params={"type": "seen", "msg_id": "no"},
                            headers={"X-Forwarded-For": "203.0.113.9"})
        assert r.status_code == 403  # loopback is no trusted proxy unless configured
    assert events(engine) == 1


async def test_allow_list_behind_a_trusted_proxy(app_with: AppFactory, engine: Engine) -> None:
    app = await app_with(callback_allowed_ips="203.0.113.0/24", trusted_proxies="10.0.0.0/8")
    async with client_for(app, peer="10.1.2.3") as proxy:
        ok = await proxy.get("/dlr", params={"type": "seen", "msg_id": "p1"},
                             headers={"X-Forwarded-For": "203.0.113.9"})
        # The client wrote the left part itself; the proxy appended the real source.
        forged = await proxy.get("/dlr", params={"type": "seen", "msg_id": "p2"},
                                 headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.7"})
    assert (ok.status_code, forged.status_code) == (200, 403)
    assert events(engine) == 1


async def test_json_body_that_is_not_an_object(client: httpx.AsyncClient) -> None:
    r = await client.post("/dlr", content=json.dumps(["seen"]),
                          headers={"content-type": "application/json"})
    assert r.status_code == 200
    [item] = (await client.get("/api/v1/rejected")).json()["items"]
    assert item["reason"] == "JSON body is not an object"


async def test_a_trickling_body_is_cut_off(app_with: AppFactory, engine: Engine) -> None:
    app = await app_with(callback_read_timeout=0.3)

    async def slow():  # type: ignore[no-untyped-def]
        yield b"type=seen&msg_id=slow"
        await asyncio.sleep(2)
        yield b"&x=1"

    async with client_for(app) as c:
        r = await c.post("/dlr", content=slow())
    assert r.status_code == 408
    assert "not received within" in r.json()["detail"]
    assert events(engine) == rejected(engine) == 0


async def test_a_reply_cut_mid_emoji_is_stored(client: httpx.AsyncClient, engine: Engine) -> None:
    # A Java or JavaScript serialiser cut the reply between the halves of a UTF-16 pair.
    r = await client.post("/dlr", content=b'{"type":"reply","msg_id":"m1","text":"hi \\ud83d"}',
                          headers={"content-type": "application/json"})
    assert (r.status_code, r.text) == (200, "OK")
    with engine.connect() as conn:
        text, raw = conn.execute(select(Event.text, Event.text_raw)).one()
    assert text == "hi \ufffd"
    assert raw == b"hi \xed\xa0\xbd"  # the lone half, as its generalised UTF-8 bytes


async def test_lone_surrogates_in_other_json_fields_are_archived(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    for body in (b'{"type":"seen","msg_id":"a\\udfff"}', b'{"type":"se\\ud800en","msg_id":"b"}',
                 b'{"type":"delivery","msg_id":"c","status":"\\udbff"}'):
        r = await client.post("/dlr", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
    assert (events(engine), rejected(engine)) == (0, 3)
    reasons = [i["reason"] for i in (await client.get("/api/v1/rejected")).json()["items"]]
    assert any("msg_id" in reason for reason in reasons)


async def test_rejected_archive_masks_the_callback_token(
    app_with: AppFactory, engine: Engine
) -> None:
    app = await app_with(callback_token="SECRET-tok")
    async with client_for(app) as c:
        answers = [
            await c.get("/dlr?type=bogus&msg_id=x&token=SECRET-tok"),
            await c.get("/dlr?type=bogus&msg_id=y&tok%65n=SECRET-tok"),
            await c.post("/dlr?token=SECRET-tok", content=b"type=bogus&msg_id=z&TOK%45N=SECRET-tok",
                         headers={"content-type": "application/x-www-form-urlencoded"}),
        ]
        assert [r.status_code for r in answers] == [200, 200, 200]
        items = (await c.get("/api/v1/rejected")).json()["items"]
    assert rejected(engine) == 3
    assert "SECRET" not in json.dumps(items)
    # Everything but the token is kept as it arrived.
    assert sorted(i["query"] for i in items) == [
        "token=***", "type=bogus&msg_id=x&token=***", "type=bogus&msg_id=y&tok%65n=***"]
    assert [i["raw"] for i in items if i["method"] == "POST"] == [
        "type=bogus&msg_id=z&TOK%45N=***"]
