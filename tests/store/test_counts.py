"""The counts the dashboard reads (app/store/counts.py) agree with the rows they count, on both
databases: after shuffled, repeated and late notifications, labels set by a send after its
DLRs, a squash, a purge, and for any window, whole minutes or not."""

from __future__ import annotations

import random
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from app.core.notifications import interpret, shown_status_extended
from app.store import counts
from app.store.models import CampaignCount, MessageCount
from app.store.retention import purge
from app.store.write import SendRecord, store

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
PATTERN = re.compile(r"^(?P<campaign>[a-z]+)-\d+$")
NOTES = [
    {"type": "delivery", "status": "in process"},
    {"type": "delivery", "status": "delivered"},
    {"type": "delivery", "status": "undelivered", "status_extended": "VIBER_EXPIRED"},
    {"status": "-2"},  # an SMS report: undelivered, SMS_-2
    {"type": "seen"},
    {"type": "reply", "text": "ok"},
    {"type": "reply", "text": "again"},
]


def expected(engine: Engine, *, since: datetime | None = None, until: datetime | None = None,
             campaign: str = counts.ALL) -> dict[str, Any]:
    """What the counts must say, computed here from the rows themselves."""
    with engine.connect() as conn:
        messages = conn.execute(text(
            "SELECT status, delivered_at, seen_at, reply_events, campaign, kind, "
            "status_extended, created_at FROM messages")).all()
        events = conn.execute(text(
            "SELECT e.type, e.received_at, m.campaign FROM events e "
            "LEFT JOIN messages m ON m.msg_key = e.msg_key")).all()

    def inside(at: Any) -> bool:
        at = at if isinstance(at, datetime) else datetime.fromisoformat(at)
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        return (since is None or at >= since) and (until is None or at < until)

    mine = [m for m in messages if inside(m.created_at)
            and (campaign == counts.ALL or m.campaign == campaign)]
    values = Counter({"messages": len(mine)})
    for m in mine:
        values[m.status] += 1
        values["reached"] += m.delivered_at is not None
        values["opened"] += m.seen_at is not None
        values["replied"] += m.reply_events > 0
    for e in events:
        if inside(e.received_at) and (campaign == counts.ALL or e.campaign == campaign):
            values[f"ev_{e.type}"] += 1
    codes = Counter(shown_status_extended(m.status_extended, m.kind) for m in mine
                    if m.status_extended is not None)
    return {"values": {k: v for k, v in values.items() if v}, "codes": dict(codes)}


def counted(engine: Engine, **window: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        totals = counts.window(conn, **window)
    return {"values": {k: v for k, v in totals.values.items() if v and k != "rejected"},
            "codes": totals.codes}


def traffic(engine: Engine, seed: int) -> None:
    """60 messages of three campaigns (and none), their notifications in random order, a third
    sent twice, received over ten minutes in random batches; half of them also sent by us,
    some before and some after their DLRs, with a label of their own. As in the service, a
    notification's time is when it arrived."""
    rng = random.Random(seed)
    arrivals: list[Any] = []
    for i in range(60):
        ptid = f"{rng.choice(['spring', 'summer', 'autumn'])}-{i}" if i % 4 else None
        msg_id = f"m{i}"
        for fields in rng.sample(NOTES, rng.randint(1, len(NOTES))):
            fields = {"msg_id": msg_id, **({"p_transaction_id": ptid} if ptid else {}),
                      **fields}
            arrivals += [fields] * (2 if rng.random() < 0.3 else 1)  # the provider resends
        if i % 2:
            arrivals.append((ptid or f"x-{i}", f"7900{i:07d}", msg_id, f"label-{i % 3}"))
    rng.shuffle(arrivals)
    items: list[Any] = []
    for n, arrival in enumerate(arrivals):
        at = T0 + timedelta(seconds=600 * n / len(arrivals))
        if isinstance(arrival, dict):
            items.append(interpret(arrival, received_at=at, campaign_pattern=PATTERN))
        else:
            ptid, phone, msg_id, label = arrival
            items.append(SendRecord(
                p_transaction_id=ptid, kind=rng.choice(["text", "sms"]), sending_method="viber",
                sender="Shop", phones=[phone], outcome="accepted", code=0, tech_message="OK",
                attempts=1, created_at=at, msg_ids={phone: msg_id}, campaign=label))
    while items:
        size = rng.randint(1, 40)
        batch, items = items[:size], items[size:]
        with engine.begin() as conn:
            store(conn, batch)


WINDOWS = [
    {"since": None, "until": None},
    {"since": T0 + timedelta(seconds=17), "until": T0 + timedelta(minutes=3, seconds=5)},
    {"since": T0 + timedelta(minutes=2), "until": T0 + timedelta(minutes=7)},
    {"since": T0 + timedelta(minutes=4, seconds=10), "until": T0 + timedelta(minutes=4,
                                                                            seconds=50)},
    {"since": T0 + timedelta(minutes=5, seconds=1), "until": None},
]


@pytest.mark.parametrize("seed", [1, 2])
def test_counts_agree_with_the_rows_in_every_window_and_campaign(engine: Engine,
                                                                  seed: int) -> None:
    traffic(engine, seed)
    for campaign in (counts.ALL, "spring", "summer", "label-1"):
        for window in WINDOWS:
            assert counted(engine, campaign=campaign, **window) == expected(
                engine, campaign=campaign, **window), (campaign, window)


def test_a_squash_folds_the_rows_and_changes_no_count(engine: Engine) -> None:
    traffic(engine, 3)
    before = {c: counted(engine, campaign=c, since=None, until=None)
              for c in (counts.ALL, "autumn", "label-2")}
    with engine.connect() as conn:
        rows_before = conn.scalar(select(func.count()).select_from(MessageCount))
    with engine.begin() as conn:
        assert counts.squash(conn) > 0
    with engine.connect() as conn:
        rows_after = conn.scalar(select(func.count()).select_from(MessageCount))
        keys = conn.execute(text("SELECT count(*) FROM (SELECT DISTINCT bucket, campaign "
                                 "FROM message_counts) k")).scalar()
        campaigns = conn.scalar(select(func.count(func.distinct(CampaignCount.campaign))))
        assert conn.scalar(select(func.count()).select_from(CampaignCount)) == campaigns
    assert rows_after == keys < rows_before
    assert before == {c: counted(engine, campaign=c, since=None, until=None) for c in before}
    with engine.begin() as conn:  # nothing left to fold
        assert counts.squash(conn) == 0


def count_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return sum(int(conn.scalar(text(f"SELECT count(*) FROM {t}")) or 0)
                   for t in ("message_counts", "code_counts", "campaign_counts"))


def test_a_purge_keeps_the_counts_right_and_folded(engine: Engine) -> None:
    """Right for every window and campaign, and folded as it goes: a purge that left a delta
    row per deleted row made the app's next squash hold SQLite's writer for seconds."""
    traffic(engine, 4)
    with engine.begin() as conn:
        counts.squash(conn)
    folded = count_rows(engine)
    purge(engine, before=T0 + timedelta(minutes=5), batch=7)
    assert count_rows(engine) <= folded
    with engine.begin() as conn:
        assert counts.squash(conn) == 0  # nothing left for the app's squasher
    for campaign in (counts.ALL, "spring", "label-0"):
        for window in WINDOWS:
            assert counted(engine, campaign=campaign, **window) == expected(
                engine, campaign=campaign, **window), (campaign, window)


def test_the_campaign_list_is_the_campaigns_lifetime_counts(engine: Engine) -> None:
    traffic(engine, 5)
    with engine.connect() as conn:
        listed = counts.campaigns(conn, since=None, until=None, limit=50, offset=0)
    assert [c.last_at for c in listed] == sorted((c.last_at for c in listed), reverse=True)
    for item in listed:
        assert {k: v for k, v in item.values.items() if v} == {
            k: v for k, v in expected(engine, campaign=item.campaign)["values"].items()
            if not k.startswith("ev_")}


def test_the_migration_counts_the_rows_already_stored(tmp_path: Any, pg_admin_url: str) -> None:
    """Rows stored before the counts existed are counted by the migration that adds them."""
    import uuid

    import psycopg

    from app.store.db import make_engine
    from app.store.migrate import upgrade

    from ..helpers import make_settings

    name = f"dlr_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    urls = [f"sqlite:///{tmp_path}/old.db", f"{pg_admin_url.rsplit('/', 1)[0]}/{name}"]
    try:
        for url in urls:
            engine = make_engine(make_settings(database_url=url), pool_size=1)
            try:
                upgrade(engine, "d1e2f3a4b5c6")  # the schema before the counts
                with engine.begin() as conn:
                    for i, (status, ext, seen) in enumerate([
                            ("delivered", None, None), ("undelivered", "SMS_-2", None),
                            ("seen", None, T0), ("in_process", None, None)]):
                        at = T0 + timedelta(seconds=40 * i)
                        conn.execute(text(
                            "INSERT INTO messages (msg_key, msg_id, status, status_rank, "
                            "status_extended, kind, delivered_at, seen_at, created_at, "
                            "updated_at, event_seq) VALUES (:k, :k, :s, 2, :x, 'text', "
                            ":d, :seen, :at, :at, 1)"),
                            {"k": f"old-{i}", "s": status, "x": ext, "at": at, "seen": seen,
                             "d": at if status in ("delivered", "seen") else None})
                        for j, type_ in enumerate(["delivery", "reply"][:1 + i % 2]):
                            conn.execute(text(
                                "INSERT INTO events (dedupe_key, msg_key, type, "
                                "unknown_status_extended, received_at) VALUES "
                                "(:d, :k, :t, false, :at)"),
                                {"d": f"d{i}{j}", "k": f"old-{i}", "t": type_, "at": at})
                upgrade(engine)
                for window in WINDOWS:
                    assert counted(engine, **window) == expected(engine, **window), (url, window)
                assert counted(engine, since=None, until=None)["values"]["replied"] == 2
            finally:
                engine.dispose()
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_the_squasher_folds_what_was_added_since_its_last_round(engine: Engine) -> None:
    import asyncio

    squasher = counts.Squasher(engine, lambda fn: asyncio.to_thread(fn))
    traffic(engine, 6)
    assert await squasher.run_once() > 0
    with engine.connect() as conn:
        folded = conn.scalar(select(func.count()).select_from(MessageCount))
    assert await squasher.run_once() == 0  # nothing added since
    send = SendRecord(p_transaction_id="late", kind="text", sending_method="viber",
                      sender="Shop", phones=["79001234567"], outcome="accepted", code=0,
                      tech_message="OK", attempts=1, created_at=T0,
                      msg_ids={"79001234567": "m1"}, campaign="label-late")
    with engine.begin() as conn:
        store(conn, [send])
    assert await squasher.run_once() > 0
    with engine.connect() as conn:  # one row a key again, the new keys included
        keys = conn.execute(text("SELECT count(*) FROM (SELECT DISTINCT bucket, campaign "
                                 "FROM message_counts) k")).scalar()
        assert conn.scalar(select(func.count()).select_from(MessageCount)) == keys >= folded
    for campaign in (counts.ALL, "label-late", "label-1"):
        assert counted(engine, campaign=campaign, since=None, until=None) == expected(
            engine, campaign=campaign)


def test_a_batch_adds_a_few_count_rows_not_one_per_notification(engine: Engine) -> None:
    """The counts of a batch cost a handful of rows (a key each; PostgreSQL's statement
    triggers a few statements' worth), however many notifications it holds: SQLite's row
    triggers added three to five per notification, and the squash folded them all again."""
    at = T0 + timedelta(seconds=5)
    batch = [interpret({"type": "delivery", "msg_id": f"b{i}", "status": "delivered",
                        "p_transaction_id": f"{('spring', 'summer')[i % 2]}-{i}"},
                       received_at=at, campaign_pattern=PATTERN) for i in range(200)]
    with engine.begin() as conn:
        store(conn, batch)
    later = [interpret({"type": "seen", "msg_id": f"b{i}"}, received_at=at,
                       campaign_pattern=PATTERN) for i in range(0, 200, 3)]
    with engine.begin() as conn:
        store(conn, later)
    # Keys: one minute under "*", "spring" and "summer"; two campaigns' lifetimes. Two batches.
    assert count_rows(engine) <= 2 * 2 * (3 + 2)
    for campaign in (counts.ALL, "spring", "summer"):
        assert counted(engine, campaign=campaign, since=None, until=None) == expected(
            engine, campaign=campaign)


def test_a_recount_gives_what_the_write_path_counted(engine: Engine) -> None:
    """`counts.recount` (for rows written around the write path: a seed, a repair) agrees
    with the counts the write path kept, and with the rows."""
    traffic(engine, 7)
    kept = {c: [counted(engine, campaign=c, **w) for w in WINDOWS]
            for c in (counts.ALL, "spring", "label-2")}
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM message_counts WHERE campaign = 'spring'")
        counts.recount(conn)
    assert kept == {c: [counted(engine, campaign=c, **w) for w in WINDOWS] for c in kept}
    assert kept[counts.ALL][0] == expected(engine)
    with engine.begin() as conn:  # one row a key already
        assert counts.squash(conn) == 0
