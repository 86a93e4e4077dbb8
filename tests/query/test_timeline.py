"""The activity timeline (the dashboard's chart and ingest rate) against the stats it sits
beside: every notification in the window counted once, in the bucket of its second."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine, insert

from app.core.notifications import interpret
from app.store import counts
from app.store.models import Event
from app.store.write import store

TYPES = ("delivery", "seen", "reply")


def store_events(engine: Engine, times: list[datetime]) -> list[tuple[datetime, str]]:
    """Notifications received at the given times (each a distinct one), of mixed types."""
    rng = random.Random(11)
    rows = [{"dedupe_key": f"k{i:030d}", "msg_key": f"m{i % 37}", "type": rng.choice(TYPES),
             "received_at": at, "unknown_status_extended": False} for i, at in enumerate(times)]
    with engine.begin() as conn:
        conn.execute(insert(Event), rows)
        counts.recount(conn)  # inserted behind the write path's back (SQLite's counts it)
    return [(r["received_at"], r["type"]) for r in rows]


def spread(now: datetime, n: int, within: timedelta) -> list[datetime]:
    """n times at scattered seconds (and sub-seconds) over the past `within`."""
    rng = random.Random(5)
    return [now - timedelta(seconds=rng.uniform(1, within.total_seconds())) for _ in range(n)]


@pytest.mark.parametrize("bucket", [10, 60, 900])
async def test_timeline_totals_equal_stats(client: httpx.AsyncClient, engine: Engine,
                                           bucket: int) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    since, until = now - timedelta(hours=2), now
    # Most inside the window, a few on either side of it (those must not be counted).
    stored = store_events(engine, spread(now, 400, timedelta(hours=2))
                          + [since - timedelta(seconds=1), until + timedelta(seconds=5)])
    window = {"since": since.isoformat(), "until": until.isoformat()}

    r = await client.get("/api/v1/timeline", params=window | {"bucket_seconds": str(bucket)})
    assert r.status_code == 200, r.text
    points = r.json()["points"]
    stats = (await client.get("/api/v1/stats", params=window)).json()

    totals = {t: sum(p[t] for p in points) for t in TYPES}
    assert totals == stats["events_by_type"]
    assert sum(totals.values()) == 400

    # Each bucket holds exactly the notifications received in it.
    expected: Counter[tuple[int, str]] = Counter(
        (int(at.timestamp()) // bucket * bucket, type_) for at, type_ in stored
        if since <= at < until)
    got = Counter({(int(datetime.fromisoformat(p["t"]).timestamp()), t): p[t]
                   for p in points for t in TYPES if p[t]})
    assert got == expected
    assert len(points) == len({start for start, _ in expected})


AT = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("bucket", "expected"), [
    (900, {(AT, "delivery"): 1, (AT, "seen"): 1, (AT.replace(minute=15), "reply"): 1,
           (AT.replace(minute=30), "delivery"): 1, (AT.replace(minute=45), "seen"): 1}),
    (60, {(AT, "delivery"): 1, (AT.replace(minute=14), "seen"): 1,
          (AT.replace(minute=15), "reply"): 1, (AT.replace(minute=44), "delivery"): 1,
          (AT.replace(minute=59), "seen"): 1}),
])
async def test_buckets_start_at_whole_multiples_of_their_length(
    client: httpx.AsyncClient, engine: Engine, bucket: int,
    expected: dict[tuple[datetime, str], int],
) -> None:
    """Known times in known buckets, written out by hand (the API's documented rule: buckets
    start at whole multiples of bucket_seconds since the epoch)."""
    received = [
        (AT, "delivery"),
        (AT + timedelta(minutes=14, seconds=59.9), "seen"),  # just before an edge
        (AT + timedelta(minutes=15), "reply"),  # on an edge: the later bucket
        (AT + timedelta(minutes=44, seconds=30), "delivery"),
        (AT + timedelta(minutes=59, seconds=59), "seen"),
        (AT - timedelta(seconds=1), "delivery"),  # before the window
        (AT + timedelta(hours=1, seconds=1), "delivery"),  # after it
    ]
    with engine.begin() as conn:
        conn.execute(insert(Event), [
            {"dedupe_key": f"b{i:030d}", "msg_key": f"m{i}", "type": type_, "received_at": at,
             "unknown_status_extended": False} for i, (at, type_) in enumerate(received)])
        counts.recount(conn)  # inserted behind the write path's back
    r = await client.get("/api/v1/timeline", params={
        "since": AT.isoformat(), "until": (AT + timedelta(hours=1)).isoformat(),
        "bucket_seconds": str(bucket)})
    assert r.status_code == 200, r.text
    got = {(datetime.fromisoformat(p["t"]), t): p[t] for p in r.json()["points"]
           for t in TYPES if p[t]}
    assert got == expected


async def test_a_date_without_a_zone_is_utc(client: httpx.AsyncClient, engine: Engine) -> None:
    now = datetime.now(UTC)
    yesterday = (now - timedelta(days=1)).date()
    midnight = datetime(yesterday.year, yesterday.month, yesterday.day, tzinfo=UTC)
    store_events(engine, [midnight + timedelta(seconds=30), midnight - timedelta(seconds=30)])

    bare = await client.get("/api/v1/timeline", params={"since": yesterday.isoformat()})
    assert bare.status_code == 200, bare.text
    zoned = await client.get("/api/v1/timeline", params={"since": midnight.isoformat()})
    assert bare.json() == zoned.json()
    assert sum(p[t] for p in bare.json()["points"] for t in TYPES) == 1

    naive_until = (now + timedelta(minutes=1)).replace(tzinfo=None).isoformat()
    mixed = await client.get("/api/v1/timeline", params={"since": midnight.isoformat(),
                                                         "until": naive_until})
    assert mixed.status_code == 200 and mixed.json() == zoned.json()


@pytest.mark.parametrize("params", [
    {"since": "yesterday"},
    {"since": "2026-11-27", "until": "soon"},
    {"since": "2026-13-01"},
    # Valid as written, but before year 1 once moved to UTC.
    {"since": "0001-01-01T00:00:00+05:00", "until": "0001-01-01T12:00:00+05:00"},
    {"since": "2026-11-01T00:00:00Z", "until": "2026-11-27T00:00:00Z"},  # over 2 days
])
async def test_unusable_times_are_422(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    r = await client.get("/api/v1/timeline", params=params)
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], list)


@pytest.mark.parametrize("params", [
    {"since": "2026-11-27T00:00:00Z", "until": "0.5"},  # a number is not a date-time
    {"since": "1764201600"},
    {"since": "2026-11-27T00:00:00Z", "until": "1e9"},
])
async def test_numbers_are_not_times(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    r = await client.get("/api/v1/timeline", params=params)
    assert r.status_code == 422, r.text
    assert "ISO 8601" in r.text


async def test_the_schema_says_what_the_timeline_answers(client: httpx.AsyncClient) -> None:
    operation = (await client.get("/openapi.json")).json()["paths"]["/api/v1/timeline"]["get"]
    # Access refused (keys or loopback), the database down, and the two-day window.
    assert {"200", "401", "403", "422", "503"} <= set(operation["responses"])
    assert "2 days" in operation["responses"]["422"]["description"]
    since = next(p for p in operation["parameters"] if p["name"] == "since")
    assert since["required"] and "2 days" in since["description"]
    assert since["schema"]["format"] == "date-time"


@pytest.mark.slow
def test_timeline_conforms_to_its_schema(sqlite_url: str) -> None:
    """Schemathesis on this route alone: every answer matches the schema, whatever the input
    (the whole API's run is tests/web/test_schema.py)."""
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from schemathesis.checks import positive_data_acceptance

    from app.main import create_app
    from app.store.db import make_engine
    from app.store.migrate import upgrade

    from ..helpers import make_settings, serving_in_thread

    settings = make_settings(database_url=sqlite_url)
    engine = make_engine(settings)
    upgrade(engine)
    engine.dispose()
    with serving_in_thread(create_app(settings)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json").include(
            path="/api/v1/timeline")
        [operation] = [result.ok() for result in schema.get_all_operations()]

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=150, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            # The two-day window spans two parameters, which a schema cannot express (it is
            # in the descriptions and the 422's): a 422 for a wider window is the right answer.
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()


async def test_a_notification_on_a_whole_second_is_inside_a_window_starting_then(
        client: httpx.AsyncClient, engine: Engine) -> None:
    # The write path and SQLAlchemy must store a time as the same text: at a whole second
    # sqlite3's own adapter leaves out ".000000", and that text sorts before the window's
    # start bound by the API, so the boundary's notification went missing.
    second = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    with engine.begin() as conn:
        store(conn, [interpret({"type": "delivery", "msg_id": "on-the-second",
                                "status": "delivered"}, received_at=second)])
    since = {"since": second.isoformat()}
    stats = (await client.get("/api/v1/stats", params=since)).json()
    page = (await client.get("/api/v1/messages", params=since)).json()
    before = (await client.get("/api/v1/stats",
                               params={"until": second.isoformat()})).json()
    assert {k: n for k, n in stats["by_status"].items() if n} == {"delivered": 1}
    assert sum(stats["events_by_type"].values()) == 1
    assert [m["msg_id"] for m in page["items"]] == ["on-the-second"]
    # `until` is exclusive: the same instant is not before it.
    assert sum(before["by_status"].values()) == 0
