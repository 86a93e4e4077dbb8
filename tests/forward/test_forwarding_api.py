"""Forwarding's endpoints and deliveries through the REST API, and the write path's fan-out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, func, select

from app.config import Settings, SettingsError
from app.forward import endpoints
from app.store.models import Delivery, Endpoint, OutboundEvent
from app.store.outbox import ForwardEvent, write_events

from ..helpers import (
    AppFactory,
    add_endpoint,
    client_for,
    count,
    emit,
    make_settings,
    status_event,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def api(app: FastAPI):  # type: ignore[no-untyped-def]
    return client_for(app)


async def test_create_list_get_delete(api, engine: Engine) -> None:
    async with api as c:
        r = await c.post("/api/v1/endpoints", json={"url": "http://127.0.0.1:9/hook",
                                                     "description": "CRM"})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["id"].startswith("ep_")
        assert created["events"] == ["message.status", "message.reply"]
        assert created["secret"].startswith("whsec_") and len(created["secret"]) > 40
        assert created["p_transaction_id_prefix"] is None
        assert created["description"] == "CRM"

        listed = (await c.get("/api/v1/endpoints")).json()["items"]
        assert [e["id"] for e in listed] == [created["id"]]
        assert listed[0]["secret"] != created["secret"]
        assert created["secret"] not in (await c.get("/api/v1/endpoints")).text
        assert listed[0]["stats"]["backlog"] == 0

        one = (await c.get(f"/api/v1/endpoints/{created['id']}")).json()
        assert one["url"] == "http://127.0.0.1:9/hook" and one["enabled"] is True

        assert (await c.delete(f"/api/v1/endpoints/{created['id']}")).status_code == 204
        assert (await c.get(f"/api/v1/endpoints/{created['id']}")).status_code == 404
        assert (await c.delete(f"/api/v1/endpoints/{created['id']}")).status_code == 404
    assert count(engine, Endpoint) == 0


@pytest.mark.parametrize("body, field", [
    ({"url": "ftp://example.org/hook"}, "url"),
    ({"url": "http://169.254.169.254/latest/meta-data/"}, "url"),
    ({"url": "http://[fe80::1]:8080/hook"}, "url"),
    ({"url": "http://[::ffff:169.254.169.254]/"}, "url"),
    ({"url": "not a url"}, "url"),
    ({"url": "http://127.0.0.1/hook", "events": []}, "events"),
    ({"url": "http://127.0.0.1/hook", "events": ["message.deleted"]}, "events"),
    ({"url": "http://127.0.0.1/hook", "p_transaction_id_prefix": "x" * 300},
     "p_transaction_id_prefix"),
    ({"url": "http://127.0.0.1/hook", "secret": "whsec_mine"}, "secret"),
])
async def test_bad_endpoints_are_refused_with_the_reason(api, engine: Engine, body: dict,
                                                         field: str) -> None:
    async with api as c:
        r = await c.post("/api/v1/endpoints", json=body)
    assert r.status_code == 422, r.text
    assert any(field in err["loc"] for err in r.json()["detail"])
    assert count(engine, Endpoint) == 0


async def test_private_and_loopback_targets_are_allowed(api) -> None:
    async with api as c:
        for url in ("http://10.1.2.3/hook", "https://192.168.0.10:8443/x", "http://localhost:1/",
                    "http://[::1]:9/"):
            assert (await c.post("/api/v1/endpoints", json={"url": url})).status_code == 201


async def test_rotate_secret_shows_the_new_one_once(api, engine: Engine) -> None:
    async with api as c:
        created = (await c.post("/api/v1/endpoints",
                                json={"url": "http://127.0.0.1:9/"})).json()
        r = await c.post(f"/api/v1/endpoints/{created['id']}/rotate-secret")
        assert r.status_code == 200
        rotated = r.json()["secret"]
        assert rotated.startswith("whsec_") and rotated != created["secret"]
        assert (await c.post("/api/v1/endpoints/ep_nope/rotate-secret")).status_code == 404
    with engine.connect() as conn:
        row = endpoints.get(conn, created["id"])
        now = datetime.now(UTC)
        # Both sign for 24 hours, then only the new one.
        assert len(endpoints.signing_keys(row, now)) == 2
        assert len(endpoints.signing_keys(row, now + timedelta(hours=25))) == 1


async def test_endpoint_from_settings_is_kept_in_step(settings: Settings, engine: Engine,
                                                     app_with: AppFactory) -> None:
    async with client_for(await app_with(forward_url="http://127.0.0.1:9/from-env",
                                         forward_secret=SECRET)) as c:
        listed = (await c.get("/api/v1/endpoints")).json()["items"]
        assert [(e["url"], e["from_settings"]) for e in listed] == [
            ("http://127.0.0.1:9/from-env", True)]
        ep = listed[0]["id"]
        assert (await c.delete(f"/api/v1/endpoints/{ep}")).status_code == 409
        assert (await c.post(f"/api/v1/endpoints/{ep}/rotate-secret")).status_code == 409
    with engine.connect() as conn:
        assert endpoints.get(conn, ep).secret == SECRET


async def test_unset_forward_url_keeps_the_endpoint_disabled_with_its_deliveries(
        settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    from app.forward.dispatcher import Forwarder

    async def start(**values: str) -> None:
        forwarder = Forwarder(engine, make_settings(database_url=settings.database_url,
                                                    **values))
        await forwarder.start()
        await forwarder.close()

    await start(forward_url="http://127.0.0.1:9/from-env", forward_secret=SECRET)
    with engine.begin() as conn:  # as if the receiver had been down
        conn.execute(Endpoint.__table__.update().values(paused_at=datetime.now(UTC)))
    emit(engine, [status_event("m-1", "delivered")])
    with caplog.at_level("WARNING", logger="app.forward.endpoints"):
        await start()  # DLR_FORWARD_URL unset: kept, disabled, with one warning
        await start()  # and no second one at the next start
    warnings = [r for r in caplog.records if r.name == "app.forward.endpoints"]
    assert len(warnings) == 1 and "DLR_FORWARD_URL is no longer set" in warnings[0].message
    with engine.connect() as conn:
        row = endpoints.get(conn, endpoints.SETTINGS_ID)
    assert (row.enabled, row.disabled_reason, row.from_settings) == (
        False, "DLR_FORWARD_URL is no longer set", False)
    assert [d.status for d in _all(engine, Delivery)] == ["pending"]
    emit(engine, [status_event("m-2", "delivered")])  # stored for a replay, not queued
    assert count(engine, OutboundEvent) == 2 and count(engine, Delivery) == 1
    # Set again: managed by the settings and enabled once more.
    await start(forward_url="http://127.0.0.1:9/from-env", forward_secret=SECRET)
    with engine.connect() as conn:
        row = endpoints.get(conn, endpoints.SETTINGS_ID)
    assert (row.enabled, row.from_settings) == (True, True)
    # Unset again: no longer from the settings, so the user may remove it.
    await start()
    with engine.begin() as conn:
        endpoints.remove(conn, endpoints.SETTINGS_ID)
    assert count(engine, Endpoint) == 0 and count(engine, Delivery) == 0


async def test_a_changed_forward_secret_signs_beside_the_old_one_for_a_day(
        settings: Settings, engine: Engine) -> None:
    from app.forward.dispatcher import Forwarder

    other = "whsec_" + "b" * 32
    for secret in (SECRET, other):
        forwarder = Forwarder(engine, make_settings(
            database_url=settings.database_url, forward_url="http://127.0.0.1:9/from-env",
            forward_secret=secret))
        await forwarder.start()
        await forwarder.close()
    with engine.connect() as conn:
        row = endpoints.get(conn, endpoints.SETTINGS_ID)
    now = datetime.now(UTC)
    assert row.secret == other
    assert endpoints.previous_secrets(row, now) == [SECRET]
    assert len(endpoints.signing_keys(row, now)) == 2
    assert len(endpoints.signing_keys(row, now + timedelta(hours=25))) == 1


def _all(engine: Engine, table: type) -> list:  # type: ignore[type-arg]
    with engine.connect() as conn:
        return list(conn.execute(select(table)))


@pytest.mark.parametrize("values, words", [
    ({"forward_url": "http://127.0.0.1/hook"}, "DLR_FORWARD_SECRET"),
    ({"forward_url": "http://169.254.169.254/", "forward_secret": SECRET}, "link-local"),
    ({"forward_secret": "not-a-secret"}, "whsec_"),
    ({"forward_secret": "whsec_c2hvcnQ="}, "24"),
    ({"forward_retry_schedule": "5,soon"}, "DLR_FORWARD_RETRY_SCHEDULE"),
    ({"forward_retry_schedule": ""}, "DLR_FORWARD_RETRY_SCHEDULE"),
    ({"forward_timeout": "0"}, "DLR_FORWARD_TIMEOUT"),
    ({"forward_concurrency": "0"}, "DLR_FORWARD_CONCURRENCY"),
])
def test_bad_forward_settings_stop_start_up_with_one_line(values: dict, words: str) -> None:
    with pytest.raises(SettingsError) as exc:
        make_settings(**values)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_forward_settings_defaults_and_parsing() -> None:
    s = make_settings()
    assert s.forward_retry_schedule == [5, 300, 1800, 7200, 18000, 36000, 36000]
    assert (s.forward_timeout, s.forward_concurrency, s.forward_url) == (10, 8, None)
    assert make_settings(forward_retry_schedule="1, 2.5").forward_retry_schedule == [1, 2.5]


def test_no_endpoint_means_nothing_is_written(engine: Engine) -> None:
    with engine.begin() as conn:
        assert write_events(conn, [status_event("m-1", "delivered")]) == 0
    assert count(engine, OutboundEvent) == 0 and count(engine, Delivery) == 0


def test_fan_out_follows_event_types_prefixes_and_enabled(engine: Engine) -> None:
    every = add_endpoint(engine, "http://127.0.0.1:9/all")
    replies = add_endpoint(engine, "http://127.0.0.1:9/replies", events=["message.reply"])
    campaign = add_endpoint(engine, "http://127.0.0.1:9/camp", prefix="camp-")
    off = add_endpoint(engine, "http://127.0.0.1:9/off")
    with engine.begin() as conn:
        conn.execute(Endpoint.__table__.update().where(Endpoint.id == off.id)
                     .values(enabled=False))
    reply = ForwardEvent(type="message.reply", msg_key="m-2", p_transaction_id="other-9",
                         sequence=2, data={"msg_id": "m-2", "reply": {"text": "hi"}},
                         occurred_at=datetime.now(UTC))
    created = emit(engine, [status_event("m-1", "delivered", ptid="camp-7"),
                            status_event("m-3", "seen", ptid=None), reply])
    with engine.connect() as conn:
        rows = conn.execute(select(OutboundEvent.msg_key, Delivery.endpoint_id)
                            .join(Delivery, Delivery.event_id == OutboundEvent.id)).all()
    assert sorted(rows) == sorted([
        ("m-1", every.id), ("m-1", campaign.id),
        ("m-3", every.id),
        ("m-2", every.id), ("m-2", replies.id),
    ])
    assert created == 5


def test_fan_out_of_a_large_batch(engine: Engine) -> None:
    add_endpoint(engine, "http://127.0.0.1:9/all")
    assert emit(engine, [status_event(f"m-{i}", "delivered") for i in range(1200)]) == 1200
    with engine.connect() as conn:
        ids = conn.execute(select(func.count(func.distinct(OutboundEvent.webhook_id)))).scalar()
    assert ids == 1200


async def test_replay_and_listing(api, engine: Engine) -> None:
    ep = add_endpoint(engine, "http://127.0.0.1:9/")
    old = datetime.now(UTC) - timedelta(hours=2)
    emit(engine, [status_event("m-old", "delivered", at=old)])
    emit(engine, [status_event("m-new", "delivered")])
    with engine.begin() as conn:  # as if both had been delivered
        conn.execute(Delivery.__table__.update().values(status="delivered"))
    async with api as c:
        r = await c.post(f"/api/v1/endpoints/{ep.id}/replay",
                         json={"since": (old - timedelta(minutes=1)).isoformat(),
                               "until": (old + timedelta(minutes=1)).isoformat()})
        assert r.status_code == 202, r.text
        assert r.json()["queued"] == 1
        # A second replay of the same window does not queue it twice while pending.
        r = await c.post(f"/api/v1/endpoints/{ep.id}/replay",
                         json={"since": (old - timedelta(minutes=1)).isoformat()})
        assert r.json()["queued"] == 1  # only m-new, m-old is pending already
        bad = await c.post(f"/api/v1/endpoints/{ep.id}/replay",
                           json={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"})
        assert bad.status_code == 422

        page = (await c.get("/api/v1/deliveries", params={"status": "pending"})).json()
        assert sorted(d["msg_id"] for d in page["items"]) == ["m-new", "m-old"]
        by_msg = (await c.get("/api/v1/deliveries", params={"msg_id": "m-old"})).json()["items"]
        assert len(by_msg) == 2
        assert len({d["webhook_id"] for d in by_msg}) == 1  # the replay keeps the webhook-id
        first = (await c.get("/api/v1/deliveries", params={"limit": 1})).json()
        assert len(first["items"]) == 1 and first["next_cursor"]
        rest = (await c.get("/api/v1/deliveries",
                            params={"limit": 10, "cursor": first["next_cursor"]})).json()
        assert len(rest["items"]) == 3 and rest["next_cursor"] is None
        assert (await c.get("/api/v1/deliveries", params={"status": "lost"})).status_code == 422
        assert (await c.get("/api/v1/deliveries", params={"cursor": "x"})).status_code == 422
        assert (await c.post("/api/v1/deliveries/999999/retry")).status_code == 404


async def test_api_needs_access(app: FastAPI) -> None:
    async with client_for(app, peer="203.0.113.9") as c:
        assert (await c.get("/api/v1/endpoints")).status_code == 403
        assert (await c.post("/api/v1/endpoints", json={"url": "http://x/"})).status_code == 403


def test_changes_while_disabled_or_paused_are_stored_and_replayable(engine: Engine) -> None:
    gone = add_endpoint(engine, "http://127.0.0.1:9/gone", events=["message.status"])
    paused = add_endpoint(engine, "http://127.0.0.1:9/paused")
    started = datetime.now(UTC) - timedelta(seconds=1)
    with engine.begin() as conn:
        conn.execute(Endpoint.__table__.update().where(Endpoint.id == gone.id)
                     .values(enabled=False, disabled_reason="disabled: 410"))
        endpoints.pause(conn, paused.id)
        conn.execute(Endpoint.__table__.delete().where(Endpoint.id == paused.id))
    # Only a disabled endpoint exists: the change is stored, with no delivery.
    assert emit(engine, [status_event("m-1", "seen")]) == 0
    assert count(engine, OutboundEvent) == 1 and count(engine, Delivery) == 0
    # A paused endpoint gets its delivery (it waits); the disabled one none.
    paused = add_endpoint(engine, "http://127.0.0.1:9/paused")
    with engine.begin() as conn:
        endpoints.pause(conn, paused.id)
    assert emit(engine, [status_event("m-2", "seen")]) == 1
    assert _all(engine, Delivery)[0].endpoint_id == paused.id
    # Enabled again, a replay brings back every change of its window, both included.
    with engine.begin() as conn:
        endpoints.enable(conn, gone.id)
        assert endpoints.replay(conn, gone.id, since=started,
                                until=datetime.now(UTC) + timedelta(seconds=1)) == 2


def test_rotated_secrets_do_not_pile_up(engine: Engine) -> None:
    ep = add_endpoint(engine, "http://127.0.0.1:9/")
    with engine.begin() as conn:
        for _ in range(300):
            row = endpoints.rotate(conn, ep.id)
    now = datetime.now(UTC)
    assert len(endpoints.previous_secrets(row, now)) == endpoints.MAX_PREVIOUS_SECRETS == 3
    from app.core.webhook_signing import sign

    header = sign(endpoints.signing_keys(row, now), "msg_1", 1, b"{}")
    assert len(header) < 400 and header.count("v1,") == 4


async def test_patch_changes_an_endpoint_in_place(api, engine: Engine) -> None:
    async with api as c:
        made = (await c.post("/api/v1/endpoints", json={"url": "http://127.0.0.1:9/a"})).json()
        ep = made["id"]
        emit(engine, [status_event("m-1", "delivered")])
        before = _all(engine, Delivery)
        r = await c.patch(f"/api/v1/endpoints/{ep}", json={
            "url": "http://127.0.0.1:9/b", "events": ["message.reply"],
            "p_transaction_id_prefix": "camp-", "description": "CRM"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["url"], body["events"], body["p_transaction_id_prefix"],
                body["description"]) == ("http://127.0.0.1:9/b", ["message.reply"], "camp-",
                                         "CRM")
        assert body["enabled"] and not body["paused"]
        # The secret, the deliveries and their webhook-ids stay.
        with engine.connect() as conn:
            assert endpoints.get(conn, ep).secret == made["secret"]
        assert [(d.id, d.event_id, d.status) for d in _all(engine, Delivery)] == [
            (d.id, d.event_id, d.status) for d in before]
        # null clears the prefix; url, events and enabled cannot be null; nothing is a 422.
        r = await c.patch(f"/api/v1/endpoints/{ep}", json={"p_transaction_id_prefix": None})
        assert r.status_code == 200 and r.json()["p_transaction_id_prefix"] is None
        for bad in ({}, {"url": None}, {"events": []}, {"enabled": None}, {"secret": "x"},
                    {"url": "http://169.254.169.254/"}, {"url": "http://a..b/"}):
            r = await c.patch(f"/api/v1/endpoints/{ep}", json=bad)
            assert r.status_code == 422, (bad, r.text)
        assert (await c.patch("/api/v1/endpoints/ep_missing",
                              json={"enabled": False})).status_code == 404


async def test_pause_and_resume_through_the_api(api, engine: Engine) -> None:
    async with api as c:
        ep = (await c.post("/api/v1/endpoints", json={"url": "http://127.0.0.1:9/"})).json()["id"]
        r = await c.patch(f"/api/v1/endpoints/{ep}", json={"enabled": False})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["enabled"], body["paused"], body["disabled_reason"]) == (
            False, True, "paused")
        assert body["paused_at"] is not None
        emit(engine, [status_event("m-1", "delivered")])  # queued while paused
        (delivery,) = _all(engine, Delivery)
        assert delivery.status == "pending"
        listed = (await c.get("/api/v1/deliveries")).json()["items"]
        assert listed[0]["endpoint_paused"] is True
        # A paused endpoint's delivery is not retried by hand: resume it first.
        r = await c.post(f"/api/v1/deliveries/{delivery.id}/retry")
        assert r.status_code == 409 and "paused" in r.json()["detail"]
        r = await c.patch(f"/api/v1/endpoints/{ep}", json={"enabled": True})
        assert r.json()["enabled"] and not r.json()["paused"]


async def test_the_settings_endpoint_takes_no_new_url_but_may_be_paused(
        app_with: AppFactory) -> None:
    async with client_for(await app_with(forward_url="http://127.0.0.1:9/from-env",
                                         forward_secret=SECRET)) as c:
        ep = (await c.get("/api/v1/endpoints")).json()["items"][0]["id"]
        r = await c.patch(f"/api/v1/endpoints/{ep}", json={"url": "http://127.0.0.1:9/other"})
        assert r.status_code == 409 and "DLR_FORWARD_URL" in r.json()["detail"]
        r = await c.patch(f"/api/v1/endpoints/{ep}", json={"enabled": False})
        assert r.status_code == 200 and r.json()["paused"]


@pytest.mark.parametrize("field, value", [
    ("description", "a\u0000b"), ("description", "a\ud800b"),
    ("url", "http://example.com/\ud800"), ("url", "http://example.com/\u0000"),
    ("p_transaction_id_prefix", "camp\u0000"), ("p_transaction_id_prefix", "\udc00"),
    ("p_transaction_id_prefix", "x" * 256), ("url", "http://" + "a" * 64 + ".example/"),
    ("url", "http://a..b/"), ("description", "d" * 1001),
])
async def test_odd_endpoint_fields_are_a_422_with_the_reason(api, engine: Engine,
                                                             field: str, value: str) -> None:
    body = {"url": "http://127.0.0.1:9/", field: value}
    raw = json.dumps(body).encode()  # \u escapes: a lone surrogate survives the JSON
    async with api as c:
        r = await c.post("/api/v1/endpoints", content=raw,
                         headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert field in json.dumps(r.json())
        ep = add_endpoint(engine, "http://127.0.0.1:9/")
        r = await c.patch(f"/api/v1/endpoints/{ep.id}", content=json.dumps({field: value}),
                          headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
    assert count(engine, Endpoint) == 1


async def test_many_event_names_get_a_short_422(api) -> None:
    async with api as c:
        r = await c.post("/api/v1/endpoints", json={
            "url": "http://127.0.0.1:9/", "events": ["message.status"] * 1000})
        assert r.status_code == 422 and len(r.content) < 2000
        assert "at most 8" in r.text


async def test_odd_ids_and_filters_are_not_a_server_error(api) -> None:
    async with api as c:
        for path in ("/api/v1/endpoints/a%00b", "/api/v1/endpoints/%ED%A0%80",
                     "/api/v1/endpoints/" + "x" * 300):
            assert (await c.get(path)).status_code == 404, path
            assert (await c.patch(path, json={"enabled": False})).status_code == 404, path
            assert (await c.post(path + "/test")).status_code == 404, path
        for query in ("endpoint_id=a%00b", "msg_id=%00"):
            r = await c.get(f"/api/v1/deliveries?{query}")
            assert r.status_code == 422 and "NUL" in r.text, query
