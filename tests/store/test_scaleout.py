"""Scale-out, shown: two `dlr serve` processes on one PostgreSQL database, nothing in front.

The provider's notifications for the same messages reach both replicas in random order, each
sent one to three times (resends, some with the UUID in the other letter case), concurrently.
Whatever replica took which copy, every message must end with the status the precedence rule
gives and exactly one event per distinct notification.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, text

from app.core.notifications import STATUS_EXTENDED_MEANING, interpret
from app.store.db import make_engine
from app.store.migrate import upgrade
from app.store.write import store
from app.store.writer import Writer

from ..helpers import make_settings, running_server, wipe

MESSAGES = 60
CONCURRENCY = 24
pytestmark = pytest.mark.slow

Note = dict[str, str]
CODE = "{code}"  # stands for a status_extended picked per message
IN_PROCESS: Note = {"type": "delivery", "status": "in process"}
DELIVERED: Note = {"type": "delivery", "status": "delivered"}
UNDELIVERED: Note = {"type": "delivery", "status": "undelivered", "status_extended": CODE}
SEEN: Note = {"type": "seen"}


def reply(n: int) -> Note:
    return {"type": "reply", "text": f"ответ {n} 👍"}


# What the provider may send for one message, each with the status the README's rule
# (seen > delivered = undelivered > in_process > accepted) gives, written out by hand. Each
# has at most one of delivered/undelivered, so arrival order between equal ranks (which the
# two replicas make random) cannot change the answer.
SCENARIOS: list[tuple[list[Note], tuple[str, str | None]]] = [
    ([IN_PROCESS], ("in_process", None)),
    ([IN_PROCESS, DELIVERED], ("delivered", None)),
    ([DELIVERED], ("delivered", None)),
    ([IN_PROCESS, UNDELIVERED], ("undelivered", CODE)),
    ([UNDELIVERED, reply(0)], ("undelivered", CODE)),
    ([IN_PROCESS, DELIVERED, SEEN], ("seen", None)),
    ([DELIVERED, SEEN, reply(0), reply(1)], ("seen", None)),
    ([SEEN], ("seen", None)),
    ([IN_PROCESS, UNDELIVERED, SEEN], ("seen", None)),
    ([reply(0)], ("accepted", None)),
    ([IN_PROCESS, reply(0), reply(1)], ("in_process", None)),
]


def notifications_for(msg_id: str, campaign: str, rng: random.Random
                      ) -> tuple[list[Note], tuple[str, str | None]]:
    """One scenario's notifications for one message, and the status it must end with."""
    notes, (status, extended) = rng.choice(SCENARIOS)
    code = rng.choice(sorted(STATUS_EXTENDED_MEANING))
    filled = [{"msg_id": msg_id, "p_transaction_id": campaign}
              | {k: code if v == CODE else v for k, v in note.items()} for note in notes]
    return filled, (status, code if extended == CODE else extended)


def event_key(event: dict[str, Any]) -> tuple[Any, ...]:
    return (event["type"], event["status"], event["status_extended"], event["text"])


def note_key(note: Note) -> tuple[Any, ...]:
    status = note.get("status")
    return (note["type"], "in_process" if status == "in process" else status,
            note.get("status_extended"), note.get("text"))


async def send_all(urls: list[str], copies: list[Note], rng: random.Random) -> Counter[int]:
    """Send every copy to a replica chosen at random, CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)
    answers: Counter[int] = Counter()

    async def one(client: httpx.AsyncClient, url: str, note: Note, post: bool) -> None:
        async with gate:
            if post:
                r = await client.post(f"{url}/dlr", data=note)
            else:
                r = await client.get(f"{url}/dlr", params=note)
            answers[r.status_code] += 1

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(one(client, rng.choice(urls), note, rng.random() < 0.5)
                               for note in copies))
    return answers


async def test_two_replicas_on_one_database_agree_on_every_message(pg_url: str) -> None:
    rng = random.Random(20261127)
    # The session's database is shared with other tests: this run's rows carry its own campaign.
    campaign = f"scaleout-{uuid.uuid4().hex[:8]}"
    expected: dict[str, list[Note]] = {}
    final: dict[str, tuple[str, str | None]] = {}
    copies: list[Note] = []
    for _ in range(MESSAGES):
        msg_id = str(uuid.UUID(int=rng.getrandbits(128)))
        notes, final[msg_id] = notifications_for(msg_id, campaign, rng)
        expected[msg_id] = notes
        for note in notes:
            for _ in range(rng.randint(1, 3)):
                # Resends sometimes carry the UUID in upper case: still the same notification.
                case = str.upper if rng.random() < 0.3 else str.lower
                copies.append({**note, "msg_id": case(msg_id)})
    rng.shuffle(copies)

    # Both replicas label the same campaign at once: its counts are written by both.
    env = {"DLR_DATABASE_URL": pg_url,
           "DLR_CAMPAIGN_PATTERN": r"^(?P<campaign>scaleout-[0-9a-f]+)$"}
    with running_server(env) as (url_a, _), running_server(env) as (url_b, _):
        answers = await send_all([url_a, url_b], copies, rng)
        assert answers == Counter({200: len(copies)})

        async with httpx.AsyncClient(timeout=30) as client:
            for msg_id, notes in expected.items():
                # Both replicas read the same row; ask each one half the time.
                url = url_a if rng.random() < 0.5 else url_b
                r = await client.get(f"{url}/api/v1/messages/{msg_id}")
                assert r.status_code == 200, r.text
                message = r.json()
                status, status_extended = final[msg_id]
                assert (message["status"], message["status_extended"]) == (
                    status, status_extended), (msg_id, notes)
                stored = Counter(event_key(e) for e in message["events"])
                assert stored == Counter(note_key(n) for n in notes), msg_id
                replies = sorted(r["text"] for r in message["replies"])
                assert replies == sorted(n["text"] for n in notes if n["type"] == "reply")
                if status == "seen":
                    assert message["delivered_at"] and message["seen_at"]

            # Nothing else was stored (no message under the other letter case, no extra
            # event): the campaign holds exactly these messages and notifications.
            r = await client.get(f"{url_a}/api/v1/stats", params={"p_transaction_id": campaign})
            stats = r.json()
            assert stats["total"] == MESSAGES
            assert sum(stats["events_by_type"].values()) == sum(map(len, expected.values()))
            # The campaign's counts, written by both replicas at once, say the same as its
            # rows; every replica only ever inserted delta rows (no counter row is updated,
            # so neither waited for the other on one).
            counted = (await client.get(f"{url_b}/api/v1/stats",
                                        params={"campaign": campaign})).json()
            for name in ("total", "by_status", "by_status_extended", "funnel",
                         "events_by_type"):
                assert counted[name] == stats[name], name
    with psycopg.connect(pg_url) as conn:
        updated = conn.execute(
            "SELECT sum(n_tup_upd + n_tup_hot_upd) FROM pg_stat_user_tables WHERE relname IN "
            "('message_counts', 'code_counts', 'campaign_counts')").fetchone()
        assert updated is not None and not updated[0]


def test_a_deadlock_with_another_writer_is_written_again_not_refused(
    pg_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Another process's writer inserts the same two notifications in the other order: each
    waits for the other, and PostgreSQL rolls one back. Ours writes its batch again once the
    other has finished, rather than refusing it (503)."""
    settings = make_settings(database_url=pg_url)
    engine = make_engine(settings, pool_size=2)
    upgrade(engine)
    wipe(engine)
    now = datetime.now(UTC)
    first, second = sorted(
        (interpret({"type": "seen", "msg_id": f"lock-{i}"}, received_at=now) for i in (1, 2)),
        key=lambda n: n.dedupe_key)  # ours inserts them in this order
    writer = Writer(engine)
    outcome: list[Any] = []
    try:
        with engine.connect() as other, caplog.at_level(logging.INFO, logger="app.store.writer"):
            other.begin()
            store(other, [second])  # the other writer holds `second`, uncommitted
            ours = threading.Thread(target=lambda: outcome.extend(writer.write([first, second])))
            ours.start()
            waiting_on_lock(engine)  # ours has inserted `first` and waits for `second`
            try:
                store(other, [first])  # waits for ours: a cycle; PostgreSQL ends ours
            finally:
                other.rollback()  # the other writer gives up (or was the one rolled back)
            ours.join(timeout=30)
        assert outcome == ["new", "new"]
        assert any("rolled back by the database" in r.getMessage() for r in caplog.records)
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM events WHERE msg_key LIKE 'lock-%'"))
            assert stored.scalar_one() == 2
    finally:
        writer.close()
        engine.dispose()


def waiting_on_lock(engine: Engine, timeout: float = 10) -> None:
    """Until a backend of this database waits for a lock."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("no writer waited for the lock")
