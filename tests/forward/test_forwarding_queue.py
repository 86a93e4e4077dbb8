"""The dispatcher's queue on both databases: a claim leases the oldest due deliveries, a
leased one is not claimed again until its lease passes, and an outcome is recorded only
under the claimer's token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, select, update

from app.forward.queue import Claim, Outcome, claim, record
from app.store.models import Delivery, DeliveryAttempt, OutboundEvent

from ..helpers import add_endpoint, emit, status_event

LEASE = timedelta(seconds=30)


def _claim(engine: Engine, endpoint_id: str, limit: int, now: datetime) -> list[Claim]:
    with engine.begin() as conn:
        return claim(conn, endpoint_id, limit, now, LEASE)


def _deliveries(engine: Engine) -> dict[str, tuple[int, str, int]]:
    """msg_key -> (delivery id, status, attempts)."""
    with engine.connect() as conn:
        rows = conn.execute(select(OutboundEvent.msg_key, Delivery.id, Delivery.status,
                                   Delivery.attempts)
                            .join(Delivery, Delivery.event_id == OutboundEvent.id))
        return {key: (i, status, attempts) for key, i, status, attempts in rows}


def test_a_claim_takes_the_oldest_due_deliveries_up_to_its_limit(engine: Engine) -> None:
    ep = add_endpoint(engine, "http://127.0.0.1:9/")
    emit(engine, [status_event(f"m-{i}", "delivered") for i in range(5)])
    ids = {key: i for key, (i, _, _) in _deliveries(engine).items()}
    now = datetime.now(UTC)
    with engine.begin() as conn:  # m-3 became due first, m-4 is not due yet
        conn.execute(update(Delivery).where(Delivery.id == ids["m-3"])
                     .values(next_attempt_at=now - timedelta(minutes=5)))
        conn.execute(update(Delivery).where(Delivery.id == ids["m-4"])
                     .values(next_attempt_at=now + timedelta(minutes=5)))

    first = _claim(engine, ep.id, 2, now)

    assert len(first) == 2 and ids["m-3"] in {c.delivery_id for c in first}
    assert [c.delivery_id for c in first] == sorted(c.delivery_id for c in first)
    with engine.connect() as conn:
        events = {r.msg_key: r for r in conn.execute(select(OutboundEvent))}
    by_id = {i: key for key, i in ids.items()}
    for c in first:  # each claim carries its own event's webhook-id and body
        event = events[by_id[c.delivery_id]]
        assert (c.webhook_id, c.payload) == (event.webhook_id, event.payload.encode())
        assert c.attempts == 0 and c.endpoint_id == ep.id
    assert len({c.token for c in first}) == 1

    # Leased rows are skipped; the rest of the due ones come next, the undue one never.
    second = _claim(engine, ep.id, 10, now)
    assert {c.delivery_id for c in second} == (
        {ids[f"m-{i}"] for i in range(4)} - {c.delivery_id for c in first})
    assert second[0].token != first[0].token
    assert _claim(engine, ep.id, 10, now) == []
    # Once the lease has passed (the claimer crashed), the rows come back.
    again = _claim(engine, ep.id, 10, now + LEASE + timedelta(seconds=1))
    assert {c.delivery_id for c in again} == {ids[f"m-{i}"] for i in range(4)}


def test_outcomes_are_recorded_only_under_the_claimers_token(engine: Engine) -> None:
    ep = add_endpoint(engine, "http://127.0.0.1:9/")
    emit(engine, [status_event(f"m-{i}", "delivered") for i in range(3)])
    now = datetime.now(UTC)
    stale = _claim(engine, ep.id, 3, now)
    fresh = _claim(engine, ep.id, 3, now + LEASE + timedelta(seconds=1))
    assert {c.delivery_id for c in stale} == {c.delivery_id for c in fresh}
    ok, retry, handed_back = fresh
    later = now + timedelta(minutes=5)
    with engine.begin() as conn:
        # The crashed claimer's late outcome for the first row is kept in the attempt log
        # (the request was made) but does not touch the delivery, now someone else's.
        record(conn, [Outcome(stale[0].delivery_id, ep.id, stale[0].token, "failed",
                              attempted_at=now, status_code=500, error="late")])
        record(conn, [
            Outcome(ok.delivery_id, ep.id, ok.token, "delivered", attempted_at=now,
                    status_code=200, ok=True, latency_ms=12.5, response="fine"),
            Outcome(retry.delivery_id, ep.id, retry.token, "pending", next_attempt_at=later,
                    attempted_at=now, status_code=503, error="busy"),
            Outcome(handed_back.delivery_id, ep.id, handed_back.token, "pending"),
        ])
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(Delivery))}
        attempts = conn.execute(select(DeliveryAttempt.delivery_id, DeliveryAttempt.status_code,
                                       DeliveryAttempt.ok, DeliveryAttempt.response)).all()
    assert (rows[ok.delivery_id].status, rows[ok.delivery_id].attempts) == ("delivered", 1)
    assert rows[ok.delivery_id].finished_at is not None
    assert rows[ok.delivery_id].last_status_code == 200
    assert (rows[retry.delivery_id].status, rows[retry.delivery_id].attempts) == ("pending", 1)
    assert rows[retry.delivery_id].next_attempt_at == later
    assert rows[retry.delivery_id].finished_at is None
    assert rows[retry.delivery_id].last_error == "busy"
    # A claim handed back unsent is not an attempt: free again at once, nothing counted.
    assert rows[handed_back.delivery_id].attempts == 0
    assert rows[handed_back.delivery_id].lease_token is None
    assert sorted(attempts) == sorted([(stale[0].delivery_id, 500, False, None),
                                       (ok.delivery_id, 200, True, "fine"),
                                       (retry.delivery_id, 503, False, None)])
    assert [c.delivery_id for c in _claim(engine, ep.id, 10, now)] == [
        handed_back.delivery_id]


def test_an_answer_with_nul_bytes_is_recorded_whole_and_stops_nothing(engine: Engine) -> None:
    # A UTF-16 or binary body decodes with NULs, which PostgreSQL's text refuses (the round
    # would fail, and be retried, forever) and SQLite's JSON functions cut off.
    ep = add_endpoint(engine, "http://127.0.0.1:9/")
    emit(engine, [status_event("m-0", "delivered")])
    now = datetime.now(UTC)
    (taken,) = _claim(engine, ep.id, 1, now)
    answer = "b\x00o\x00d\x00y 😀 ends here"
    with engine.begin() as conn:
        record(conn, [Outcome(taken.delivery_id, ep.id, taken.token, "pending",
                              next_attempt_at=now, attempted_at=now, status_code=500,
                              response=answer, error=f"HTTP 500: {answer}")])
    with engine.connect() as conn:
        delivery = conn.execute(select(Delivery)).one()
        response = conn.scalar(select(DeliveryAttempt.response))
    shown = answer.replace("\x00", "\ufffd")
    assert response == shown
    assert delivery.last_error == f"HTTP 500: {shown}" and delivery.attempts == 1


def test_an_open_circuit_fails_deliveries_only_once_due_for_longer_than_the_schedule(
        engine: Engine) -> None:
    """Held back by an open circuit counts from when a delivery became due: an old delivery
    retried by hand (due now) is attempted, not failed at once."""
    from app.forward.queue import expire

    ep = add_endpoint(engine, "http://127.0.0.1:9/")
    emit(engine, [status_event("m-retried", "delivered"), status_event("m-held", "delivered")])
    ids = {key: i for key, (i, _, _) in _deliveries(engine).items()}
    now = datetime.now(UTC)
    span = timedelta(hours=24)
    with engine.begin() as conn:  # both created two days ago; one retried by hand just now
        conn.execute(update(Delivery).values(created_at=now - 2 * span,
                                             next_attempt_at=now - 2 * span))
        conn.execute(update(Delivery).where(Delivery.id == ids["m-retried"])
                     .values(next_attempt_at=now))
        expire(conn, [ep.id], now - span, now)
    after = _deliveries(engine)
    assert after["m-retried"][1] == "pending"
    assert after["m-held"][1] == "failed"


def test_due_endpoints_are_those_with_due_unleased_deliveries(engine: Engine) -> None:
    from app.forward import endpoints
    from app.forward.queue import due_endpoints

    busy = add_endpoint(engine, "http://127.0.0.1:9/busy")
    later = add_endpoint(engine, "http://127.0.0.1:9/later")
    leased = add_endpoint(engine, "http://127.0.0.1:9/leased")
    paused = add_endpoint(engine, "http://127.0.0.1:9/paused")
    for i in range(50):  # idle: nothing pending
        add_endpoint(engine, f"http://127.0.0.1:9/idle-{i}", events=["message.reply"])
    emit(engine, [status_event("m-1", "delivered")])
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(update(Delivery).where(Delivery.endpoint_id == later.id)
                     .values(next_attempt_at=now + timedelta(minutes=5)))
        endpoints.pause(conn, paused.id)
    _claim(engine, leased.id, 10, now)
    with engine.connect() as conn:
        assert due_endpoints(conn, now) == {busy.id}
        # Once the lease has passed, and the retry come due, those count again.
        assert due_endpoints(conn, now + LEASE + timedelta(minutes=5)) == {
            busy.id, later.id, leased.id}
