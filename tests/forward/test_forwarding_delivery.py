"""The Forwarder against a real HTTP receiver: signatures checked with the `standardwebhooks`
library, retries, 410, replay, manual retry, per-endpoint isolation, refused targets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from app.config import Settings
from app.forward import deliveries, endpoints
from app.forward.dispatcher import Forwarder
from app.store.models import Delivery, DeliveryAttempt, Endpoint

from ..helpers import (
    Sink,
    add_endpoint,
    emit,
    make_settings,
    running_sink,
    status_event,
    verified,
)


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll `check` (run in a thread: it may read the database) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


def rows(engine: Engine, table: Any, *where: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(table).where(*where)))


@pytest.fixture
async def forwarder(settings: Settings, engine: Engine
                    ) -> AsyncIterator[Callable[..., Any]]:
    """Start Forwarders with extra settings (tiny retry schedule by default)."""
    started: list[Forwarder] = []

    async def start(**values: Any) -> Forwarder:
        values.setdefault("forward_retry_schedule", "0.2,0.2,0.2")
        values.setdefault("forward_timeout", "2")
        f = Forwarder(engine, make_settings(database_url=settings.database_url, **values))
        await f.start()
        started.append(f)
        return f

    yield start
    for f in started:
        await f.close()


@pytest.fixture
def sink() -> Any:
    with running_sink() as s:
        yield s


async def test_events_arrive_signed_per_standard_webhooks(engine: Engine, sink: Sink,
                                                          forwarder: Any) -> None:
    ep = add_endpoint(engine, sink.url)
    f = await forwarder()
    emit(engine, [status_event("MSG-1", "delivered", sequence=1),
                  status_event("MSG-2", "seen", sequence=3, previous="delivered")])
    f.wake()
    got = await asyncio.to_thread(sink.wait_for, 2)
    assert len(got) == 2
    payloads = {p["data"]["msg_id"]: p for p in (verified(r, ep.secret) for r in got)}
    seen = payloads["MSG-2"]
    assert seen["type"] == "message.status" and seen["timestamp"].endswith("Z")
    assert seen["data"]["status"] == "seen" and seen["data"]["previous_status"] == "delivered"
    assert seen["data"]["sequence"] == 3
    for r in got:
        assert r.headers["content-type"] == "application/json"
        assert r.webhook_id.startswith("msg_")
        assert abs(int(r.headers["webhook-timestamp"]) - time.time()) < 60
        assert r.headers["webhook-signature"].startswith("v1,")
    assert await eventually(lambda: len(rows(engine, Delivery, Delivery.status == "delivered"))
                            == 2)


async def test_after_rotation_old_and_new_secret_both_verify(engine: Engine, sink: Sink,
                                                             forwarder: Any) -> None:
    ep = add_endpoint(engine, sink.url)
    with engine.begin() as conn:
        rotated = endpoints.rotate(conn, ep.id)
    f = await forwarder()
    emit(engine, [status_event("m-1", "delivered")])
    f.wake()
    (request,) = await asyncio.to_thread(sink.wait_for, 1)
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert verified(request, ep.secret)["data"]["msg_id"] == "m-1"
    assert verified(request, rotated.secret)["data"]["msg_id"] == "m-1"


async def test_failures_are_retried_with_the_same_webhook_id(engine: Engine, sink: Sink,
                                                             forwarder: Any) -> None:
    ep = add_endpoint(engine, sink.url)
    sink.answer = lambda n, h, b: 503 if n < 2 else 200
    f = await forwarder()
    emit(engine, [status_event("m-1", "delivered")])
    f.wake()
    got = await asyncio.to_thread(sink.wait_for, 3)
    assert len(got) == 3 and len({r.webhook_id for r in got}) == 1
    for r in got:
        verified(r, ep.secret)
    # Backoff: each retry waited (0.2 s +-20% here).
    assert got[1].started - got[0].started >= 0.15
    item = await eventually(lambda: _delivered(engine))
    assert [a.status_code for a in item.attempts] == [503, 503, 200]
    assert item.delivery.attempts == 3 and item.delivery.finished_at is not None
    assert all(a.latency_ms >= 0 for a in item.attempts)


def _delivered(engine: Engine) -> deliveries.Listed | None:
    with engine.connect() as conn:
        items, _ = deliveries.page(conn, status="delivered")
    return items[0] if items else None


@pytest.mark.slow
async def test_after_the_last_retry_the_delivery_fails_and_manual_retry_sends_again(
        engine: Engine, sink: Sink, forwarder: Any) -> None:
    add_endpoint(engine, sink.url)
    sink.answer = lambda n, h, b: 500
    f = await forwarder(forward_retry_schedule="0.1,0.1")
    emit(engine, [status_event("m-1", "delivered")])
    f.wake()
    failed = await eventually(lambda: rows(engine, Delivery, Delivery.status == "failed"))
    assert failed and failed[0].attempts == 3  # the first try and two retries
    assert len(sink.requests()) == 3
    attempts = rows(engine, DeliveryAttempt)
    assert [a.status_code for a in attempts] == [500, 500, 500]
    assert attempts[0].response == "ok"  # the answer's body is kept

    sink.answer = lambda n, h, b: 200
    with engine.begin() as conn:
        deliveries.retry(conn, failed[0].id)
    f.wake()
    assert await eventually(lambda: rows(engine, Delivery, Delivery.status == "delivered"))
    assert len({r.webhook_id for r in sink.requests()}) == 1


async def test_gone_disables_the_endpoint(engine: Engine, sink: Sink, forwarder: Any) -> None:
    ep = add_endpoint(engine, sink.url)
    sink.answer = lambda n, h, b: 410
    f = await forwarder(forward_concurrency="1")
    emit(engine, [status_event(f"m-{i}", "delivered") for i in range(5)])
    f.wake()
    assert await eventually(lambda: not rows(engine, Endpoint, Endpoint.id == ep.id)[0].enabled)
    assert await eventually(
        lambda: not rows(engine, Delivery, Delivery.status == "pending"))
    (row,) = rows(engine, Endpoint)
    assert "410" in row.disabled_reason
    sent = len(sink.requests())
    assert sent < 5  # the rest were not tried once the endpoint said it is gone
    emit(engine, [status_event("m-late", "delivered")])
    assert len(rows(engine, Delivery)) == 5  # nothing new is queued for a disabled endpoint


async def test_replay_resends_with_the_original_webhook_id(engine: Engine, sink: Sink,
                                                           forwarder: Any) -> None:
    ep = add_endpoint(engine, sink.url)
    f = await forwarder()
    started = datetime.now(UTC) - timedelta(seconds=1)
    emit(engine, [status_event("m-1", "delivered"), status_event("m-2", "seen")])
    f.wake()
    first = await asyncio.to_thread(sink.wait_for, 2)
    await eventually(lambda: len(rows(engine, Delivery, Delivery.status == "delivered")) == 2)
    with engine.begin() as conn:
        assert endpoints.replay(conn, ep.id, since=started,
                                until=datetime.now(UTC) + timedelta(seconds=1)) == 2
    f.wake()
    got = await asyncio.to_thread(sink.wait_for, 4)
    assert len(got) == 4
    assert sorted(r.webhook_id for r in got[2:]) == sorted(r.webhook_id for r in first)
    assert sorted(r.body for r in got[2:]) == sorted(r.body for r in first)
    for r in got:
        verified(r, ep.secret)


async def test_a_hanging_endpoint_does_not_stall_another(engine: Engine, forwarder: Any) -> None:
    with running_sink() as slow, running_sink() as fast:
        slow.hang = True
        add_endpoint(engine, slow.url)
        quick = add_endpoint(engine, fast.url)
        f = await forwarder(forward_timeout="30", forward_concurrency="2")
        emit(engine, [status_event(f"m-{i}", "delivered") for i in range(40)])
        f.wake()
        got = await asyncio.to_thread(fast.wait_for, 40, 15.0)
        assert len(got) == 40  # while the slow one holds its two slots
        assert slow.requests() == []  # none of the slow endpoint's requests has finished
        assert await eventually(lambda: len(rows(
            engine, Delivery, Delivery.endpoint_id == quick.id,
            Delivery.status == "delivered")) == 40)
        slow.release()


@pytest.mark.slow
async def test_link_local_target_is_refused_at_connect_time(engine: Engine,
                                                            forwarder: Any) -> None:
    # As if the URL had been allowed when created and the name now pointed at the metadata
    # service: the dispatcher checks the resolved address, not the URL it was given.
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fe80::1]:9/x"):
        with engine.begin() as conn:
            conn.execute(Endpoint.__table__.delete())
            endpoints.create(conn, url=url)
        f = await forwarder(forward_retry_schedule="60")
        emit(engine, [status_event("m-1", "delivered")])
        f.wake()
        attempts = await eventually(lambda: rows(engine, DeliveryAttempt))
        assert attempts and attempts[0].status_code is None
        assert "link-local" in attempts[0].response
        await f.close()


async def test_endpoint_created_after_start_is_served(engine: Engine, sink: Sink,
                                                      forwarder: Any) -> None:
    f = await forwarder()
    ep = add_endpoint(engine, sink.url)
    emit(engine, [status_event("m-1", "delivered")])
    f.wake()
    (request,) = await asyncio.to_thread(sink.wait_for, 1)
    assert json.loads(request.body)["data"]["msg_id"] == "m-1"
    verified(request, ep.secret)


@pytest.mark.slow
async def test_a_failing_endpoint_is_tried_less_and_its_backlog_flows_once_it_recovers(
        engine: Engine, sink: Sink, forwarder: Any) -> None:
    add_endpoint(engine, sink.url)
    sink.answer = lambda n, h, b: 500 if n < 5 else 200
    # Retries an hour apart: only the circuit's recovery can bring them back within the test.
    f = await forwarder(forward_concurrency="1", forward_retry_schedule="3600")
    emit(engine, [status_event(f"m-{i}", "delivered") for i in range(10)])
    f.wake()
    answered = await asyncio.to_thread(sink.wait_for, 15, 20.0)
    # Five failures open the circuit: the other five events were not tried while it was
    # open; one probe succeeded, and then all ten went through, the five failed ones early.
    assert len(answered) == 15
    assert len({r.webhook_id for r in answered[5:]}) == 10
    assert await eventually(lambda: len(rows(engine, Delivery, Delivery.status == "delivered"))
                            == 10)


@pytest.mark.slow
async def test_a_gone_endpoint_enabled_again_gets_its_events_by_replay(
        engine: Engine, sink: Sink, forwarder: Any) -> None:
    ep = add_endpoint(engine, sink.url)
    sink.answer = lambda n, h, b: 410 if n == 0 else 200
    f = await forwarder(forward_concurrency="1")
    started = datetime.now(UTC) - timedelta(seconds=1)
    emit(engine, [status_event(f"m-{i}", "delivered") for i in range(3)])
    f.wake()
    assert await eventually(lambda: not rows(engine, Endpoint)[0].enabled)
    with engine.begin() as conn:
        endpoints.enable(conn, ep.id)
        assert endpoints.replay(conn, ep.id, since=started,
                                until=datetime.now(UTC) + timedelta(seconds=1)) == 3
    f.wake()
    got = await asyncio.to_thread(sink.wait_for, 4)
    assert len({r.webhook_id for r in got[1:]}) == 3


@pytest.mark.parametrize("url", ["http://a..b/", "http://example.com/a b",
                                 "http://example.com/caf\u00e9"])
async def test_an_endpoint_no_request_can_be_made_to_stops_no_other(
        engine: Engine, sink: Sink, forwarder: Any, url: str) -> None:
    """A URL stored before the URL rules refused it (a host IDNA cannot encode, a blank or
    non-ASCII path) fails its own attempts with the reason and stops no other endpoint; its
    slots are freed, so a manual retry is accepted (not 409 forever)."""
    good = add_endpoint(engine, sink.url)
    bad = add_endpoint(engine, "http://127.0.0.1:9/placeholder")
    with engine.begin() as conn:  # as an endpoint stored before the check would be
        conn.execute(Endpoint.__table__.update().where(Endpoint.id == bad.id).values(url=url))
    f = await forwarder(forward_retry_schedule="60")
    emit(engine, [status_event("MSG-A", "delivered")])
    f.wake()
    assert len(await asyncio.to_thread(sink.wait_for, 1)) == 1
    attempts = await eventually(lambda: rows(engine, DeliveryAttempt,
                                             DeliveryAttempt.endpoint_id == bad.id))
    assert attempts and "no request can be made" in attempts[0].response
    [stuck] = rows(engine, Delivery, Delivery.endpoint_id == bad.id)
    assert await eventually(lambda: rows(engine, Delivery, Delivery.id == stuck.id,
                                         Delivery.lease_token.is_(None)))
    with engine.begin() as conn:
        assert deliveries.retry(conn, stuck.id).delivery.status == "pending"
    assert good.id != bad.id


@pytest.mark.slow
async def test_a_round_claims_only_for_endpoints_with_due_deliveries(
        engine: Engine, sink: Sink, forwarder: Any) -> None:
    """Many idle endpoints (subscribed to replies only) cost no claim: the work of a round
    follows the due deliveries, not the number of endpoints; the busy one gets everything."""
    from sqlalchemy import event

    with engine.begin() as conn:
        idle = {endpoints.create(conn, url=f"http://127.0.0.1:9/idle-{i}",
                                 events=["message.reply"]).id for i in range(300)}
        busy = endpoints.create(conn, url=sink.url, events=["message.status"])
    claims: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
             executemany: bool) -> None:
        if "deliveries.endpoint_id = " in statement and "lease_until" in statement:
            claims.append(str(parameters))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        f = await forwarder()
        for i in range(10):
            emit(engine, [status_event(f"m-{i}", "delivered")])
            f.wake()
            await asyncio.sleep(0.1)
        got = await asyncio.to_thread(sink.wait_for, 10)
        await asyncio.sleep(1.1)  # a poll with nothing due
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(got) == 10 and {r.headers["webhook-id"] for r in got}
    for r in got:
        verified(r, busy.secret)
    assert claims and not [c for c in claims if any(i in c for i in idle)]
    assert len(claims) <= 30  # one per round that found work for the busy endpoint


async def test_a_paused_endpoint_keeps_its_deliveries_waiting_until_resumed(
        engine: Engine, sink: Sink, forwarder: Any) -> None:
    ep = add_endpoint(engine, sink.url)
    with engine.begin() as conn:
        endpoints.pause(conn, ep.id)
    f = await forwarder(forward_retry_schedule="0.1")
    emit(engine, [status_event(f"m-{i}", "delivered") for i in range(3)])
    f.wake()
    await asyncio.sleep(1.5)  # a poll and more: nothing is sent, nothing fails
    assert sink.requests() == []
    assert {d.status for d in rows(engine, Delivery)} == {"pending"}
    assert rows(engine, DeliveryAttempt) == []
    with engine.begin() as conn:
        endpoints.change(conn, ep.id, {"enabled": True})
    f.wake()
    got = await asyncio.to_thread(sink.wait_for, 3)
    assert len({r.webhook_id for r in got}) == 3
    for r in got:
        verified(r, ep.secret)


async def test_a_new_url_takes_the_pending_deliveries_with_their_webhook_ids(
        engine: Engine, forwarder: Any) -> None:
    with running_sink() as old, running_sink() as new:
        old.answer = lambda n, h, b: 500
        ep = add_endpoint(engine, old.url)
        f = await forwarder(forward_retry_schedule="0.5,0.5,0.5,0.5")
        emit(engine, [status_event("m-1", "delivered")])
        f.wake()
        (first,) = await asyncio.to_thread(old.wait_for, 1)
        with engine.begin() as conn:
            endpoints.change(conn, ep.id, {"url": new.url})
        (moved,) = await asyncio.to_thread(new.wait_for, 1)
        assert moved.webhook_id == first.webhook_id and moved.body == first.body
        verified(moved, ep.secret)


@pytest.mark.slow
async def test_a_manual_retry_after_the_circuit_opened_is_attempted(
        engine: Engine, sink: Sink, forwarder: Any) -> None:
    add_endpoint(engine, sink.url)
    sink.answer = lambda n, h, b: 500
    f = await forwarder(forward_concurrency="1", forward_retry_schedule="3600")
    emit(engine, [status_event(f"m-{i}", "delivered") for i in range(5)])
    f.wake()
    assert len(await asyncio.to_thread(sink.wait_for, 5)) == 5  # the circuit opens
    assert await eventually(lambda: f.circuits())
    assert await eventually(lambda: len(rows(engine, Delivery, Delivery.attempts == 1,
                                             Delivery.lease_token.is_(None))) == 5)
    (oldest, *_) = sorted(rows(engine, Delivery), key=lambda d: d.id)
    with engine.begin() as conn:  # made a day ago; the receiver is fixed; retried by hand
        conn.execute(Delivery.__table__.update().where(Delivery.id == oldest.id)
                     .values(created_at=datetime.now(UTC) - timedelta(days=1)))
        deliveries.retry(conn, oldest.id)
    sink.answer = lambda n, h, b: 200
    f.wake()
    done = await eventually(lambda: rows(engine, Delivery, Delivery.id == oldest.id,
                                         Delivery.status != "pending"), timeout=10)
    assert done and done[0].status == "delivered", done


async def test_a_test_event_is_signed_sent_now_and_not_stored(
        app_with: Any, engine: Engine, sink: Sink) -> None:
    from ..helpers import client_for

    app = await app_with()
    async with client_for(app) as c:
        made = (await c.post("/api/v1/endpoints", json={"url": sink.url})).json()
        await c.patch(f"/api/v1/endpoints/{made['id']}", json={"enabled": False})
        r = await c.post(f"/api/v1/endpoints/{made['id']}/test")
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["ok"], body["status_code"], body["error"]) == (True, 200, None)
        assert body["latency_ms"] > 0
        (got,) = await asyncio.to_thread(sink.wait_for, 1)
        assert got.webhook_id == body["webhook_id"]
        payload = verified(got, made["secret"])
        assert payload["type"] == "endpoint.test"  # type: ignore[index]
        assert payload["data"] == {"endpoint_id": made["id"]}  # type: ignore[index]
        sink.answer = lambda n, h, b: 503
        body = (await c.post(f"/api/v1/endpoints/{made['id']}/test")).json()
        assert (body["ok"], body["status_code"]) == (False, 503)
        assert body["error"].startswith("HTTP 503")
        await c.patch(f"/api/v1/endpoints/{made['id']}", json={"url": "http://127.0.0.1:9/"})
        body = (await c.post(f"/api/v1/endpoints/{made['id']}/test")).json()
        assert body["ok"] is False and body["status_code"] is None and body["error"]
    assert rows(engine, Delivery) == [] and rows(engine, DeliveryAttempt) == []


@pytest.mark.slow
async def test_the_delivery_list_shows_an_open_circuit(app_with: Any, engine: Engine,
                                                       sink: Sink) -> None:
    from ..helpers import client_for

    sink.answer = lambda n, h, b: 500
    app = await app_with(forward_retry_schedule="3600", forward_concurrency="1")
    async with client_for(app) as c:
        ep = (await c.post("/api/v1/endpoints", json={"url": sink.url})).json()["id"]
        emit(engine, [status_event(f"m-{i}", "delivered") for i in range(6)])
        app.state.forwarder.wake()
        assert len(await asyncio.to_thread(sink.wait_for, 5)) == 5
        assert await eventually(lambda: len(rows(engine, Delivery, Delivery.attempts == 1,
                                                 Delivery.lease_token.is_(None))) == 5)
        with engine.begin() as conn:  # all due now, as after their backoff
            conn.execute(Delivery.__table__.update().values(
                next_attempt_at=datetime.now(UTC) - timedelta(minutes=1)))
        items = (await c.get("/api/v1/deliveries", params={"status": "pending"})).json()[
            "items"]
        assert items and all(i["circuit_open"] for i in items)
        now = datetime.now(UTC)
        assert all(datetime.fromisoformat(i["next_attempt_at"]) >= now - timedelta(seconds=1)
                   for i in items)
        listed = (await c.get(f"/api/v1/endpoints/{ep}")).json()
        assert listed["circuit_open_until"] is not None
