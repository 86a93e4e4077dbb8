"""Status precedence: the status a user reads is the truth whatever order notifications came in."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine

from app.core.notifications import Notification, interpret
from app.store.write import store

from ..helpers import UUID_A, dlr, record_send

DELIVERED = {"type": "delivery", "status": "delivered"}
UNDELIVERED = {"type": "delivery", "status": "undelivered", "status_extended": "VIBER_EXPIRED"}
IN_PROCESS = {"type": "delivery", "status": "in process"}
SEEN = {"type": "seen"}
REPLY = {"type": "reply", "text": "ok"}


async def final_status(client: httpx.AsyncClient, msg_id: str, *notes: dict[str, str]) -> dict:  # type: ignore[type-arg]
    for n in notes:
        assert (await dlr(client, msg_id=msg_id, **n)).status_code == 200
    return (await client.get(f"/api/v1/messages/{msg_id}")).json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("order", list(itertools.permutations(
    [IN_PROCESS, DELIVERED, SEEN, REPLY])), ids=lambda o: "-".join(n["type"][:2] +
                                                                   n.get("status", "")[:2]
                                                                   for n in o))
async def test_any_arrival_order_gives_seen(client: httpx.AsyncClient, order: tuple) -> None:  # type: ignore[type-arg]
    m = await final_status(client, "perm", *order)
    assert m["status"] == "seen"
    assert m["seen_at"] is not None and m["delivered_at"] is not None
    assert len(m["events"]) == 4
    assert [r["text"] for r in m["replies"]] == ["ok"]


async def test_late_lower_status_never_overwrites(client: httpx.AsyncClient) -> None:
    assert (await final_status(client, "l1", DELIVERED, IN_PROCESS))["status"] == "delivered"
    assert (await final_status(client, "l2", SEEN, UNDELIVERED))["status"] == "seen"
    assert (await final_status(client, "l3", SEEN, DELIVERED, IN_PROCESS))["status"] == "seen"


async def test_between_delivered_and_undelivered_the_later_wins(
    client: httpx.AsyncClient,
) -> None:
    m = await final_status(client, "d1", DELIVERED, UNDELIVERED)
    assert (m["status"], m["status_extended"]) == ("undelivered", "VIBER_EXPIRED")
    m = await final_status(client, "d2", UNDELIVERED, DELIVERED)
    assert (m["status"], m["status_extended"]) == ("delivered", None)


async def test_a_resent_old_status_changes_nothing(client: httpx.AsyncClient) -> None:
    # delivered, then undelivered, then the provider re-sends the first one: it is the same
    # notification, not a new later one, so the status stays undelivered.
    m = await final_status(client, "r1", DELIVERED, UNDELIVERED, DELIVERED)
    assert m["status"] == "undelivered"
    assert len(m["events"]) == 2


async def test_reply_never_changes_status(client: httpx.AsyncClient) -> None:
    m = await final_status(client, "rp1", UNDELIVERED, REPLY)
    assert m["status"] == "undelivered"
    m = await final_status(client, "rp2", REPLY)
    assert m["status"] == "accepted"
    assert [r["text"] for r in m["replies"]] == ["ok"]


async def test_dlr_before_the_send_record_meets_it_later(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    # The DLR races ahead of the send answer (other gateways drop it or give up on it).
    await dlr(client, type="delivery", msg_id=UUID_A.upper(), status="delivered")
    record_send(engine, UUID_A, "79031234567", "camp-1")
    m = (await client.get(f"/api/v1/messages/{UUID_A}")).json()
    assert (m["status"], m["phone"], m["p_transaction_id"]) == ("delivered", "79031234567",
                                                                "camp-1")
    assert m["sent_at"] is not None and m["msg_id"] == UUID_A.upper()


async def test_send_record_first_then_dlrs(client: httpx.AsyncClient, engine: Engine) -> None:
    record_send(engine, "s-1", "79165557755", "camp-2")
    m = (await client.get("/api/v1/messages/s-1")).json()
    assert (m["status"], m["delivered_at"]) == ("accepted", None)
    m = await final_status(client, "s-1", DELIVERED)
    assert (m["status"], m["phone"]) == ("delivered", "79165557755")


def _batch_against_dedupe_order(first: dict[str, str], second: dict[str, str], prefix: str
                                ) -> tuple[str, list[Notification]]:
    """A msg_id whose two notifications, received in this order, sort the other way by
    dedupe_key (the order a batch inserts its events in)."""
    start = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    for i in range(1000):
        msg_id = f"{prefix}-{i}"
        notes = [interpret({"msg_id": msg_id, **fields}, received_at=start + timedelta(seconds=k))
                 for k, fields in enumerate((first, second))]
        if notes[1].dedupe_key < notes[0].dedupe_key:
            return msg_id, notes
    raise AssertionError("no such msg_id")


@pytest.mark.parametrize(("first", "second", "wins"), [
    (UNDELIVERED, DELIVERED, "delivered"), (DELIVERED, UNDELIVERED, "undelivered")])
async def test_in_one_batch_the_later_final_status_wins(
        client: httpx.AsyncClient, engine: Engine, first: dict[str, str],
        second: dict[str, str], wins: str) -> None:
    msg_id, notes = _batch_against_dedupe_order(first, second, f"batch-{wins}")
    with engine.begin() as conn:
        store(conn, notes)
    m = (await client.get(f"/api/v1/messages/{msg_id}")).json()
    assert m["status"] == wins
    assert [e["status"] for e in m["events"]] == [first["status"], second["status"]]


async def test_in_one_batch_times_and_timeline_follow_arrival(client: httpx.AsyncClient,
                                                              engine: Engine) -> None:
    msg_id, notes = _batch_against_dedupe_order(DELIVERED, SEEN, "times")
    with engine.begin() as conn:
        store(conn, notes)
    m = (await client.get(f"/api/v1/messages/{msg_id}")).json()
    assert m["delivered_at"] < m["seen_at"]
    assert [e["type"] for e in m["events"]] == ["delivery", "seen"]
