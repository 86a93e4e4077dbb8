"""Campaigns as a user follows them: the label on every message, the campaign filter on pages,
stats and the timeline, the campaign list, the export, and pages by time."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, bindparam, literal, select, text
from typer.testing import CliRunner

from app.cli import cli
from app.query.export import iso_utc
from app.store.db import UTCDateTime
from app.store.write import SendRecord, store

from ..helpers import AppFactory, client_for, dlr


def send(engine: Engine, msg_ids: list[str], campaign: str | None, ptid: str = "p") -> None:
    """Record our sender's accepted send of `msg_ids` (one phone each) with a label."""
    with engine.begin() as conn:
        store(conn, [SendRecord(
            p_transaction_id=ptid, kind="text", sending_method="viber", sender="Shop",
            phones=[f"7900{i:07d}" for i in range(len(msg_ids))], outcome="accepted", code=0,
            tech_message="OK", attempts=1, created_at=datetime.now(UTC),
            msg_ids={f"7900{i:07d}": m for i, m in enumerate(msg_ids)}, campaign=campaign)])


async def test_the_label_is_shown_filtered_and_counted(client: httpx.AsyncClient,
                                                       engine: Engine) -> None:
    send(engine, ["s1", "s2", "s3"], "spring")
    send(engine, ["w1"], "winter")
    send(engine, ["n1"], None)
    for msg_id, fields in [("s1", {"type": "delivery", "status": "delivered"}),
                           ("s1", {"type": "seen"}), ("s1", {"type": "reply", "text": "hi"}),
                           ("s2", {"type": "delivery", "status": "undelivered",
                                   "status_extended": "VIBER_EXPIRED"}),
                           ("w1", {"type": "delivery", "status": "delivered"})]:
        assert (await dlr(client, msg_id=msg_id, **fields)).status_code == 200

    assert (await client.get("/api/v1/messages/s1")).json()["campaign"] == "spring"
    page = (await client.get("/api/v1/messages", params={"campaign": "spring"})).json()
    assert sorted(m["msg_id"] for m in page["items"]) == ["s1", "s2", "s3"]
    assert all(m["campaign"] == "spring" for m in page["items"])

    stats = (await client.get("/api/v1/stats", params={"campaign": "spring"})).json()
    assert stats["campaign"] == "spring" and stats["total"] == 3
    assert stats["by_status"] | {} == {"accepted": 1, "in_process": 0, "delivered": 0,
                                       "undelivered": 1, "seen": 1}
    assert stats["funnel"] == {"sent": 3, "delivered": 1, "seen": 1, "replied": 1}
    assert stats["by_status_extended"] == {"VIBER_EXPIRED": 1}
    assert stats["events_by_type"] == {"delivery": 2, "seen": 1, "reply": 1}
    everyone = (await client.get("/api/v1/stats")).json()
    assert everyone["total"] == 5 and everyone["events_by_type"]["delivery"] == 3

    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    timeline = (await client.get("/api/v1/timeline", params={
        "since": since, "bucket_seconds": 900, "campaign": "winter"})).json()
    assert sum(p["delivery"] for p in timeline["points"]) == 1

    listed = (await client.get("/api/v1/campaigns")).json()
    assert [c["campaign"] for c in listed["items"]] == ["winter", "spring"]  # latest first
    spring = listed["items"][1]
    assert spring["messages"] == 3 and spring["funnel"] == stats["funnel"]
    assert spring["by_status"] == stats["by_status"]
    assert spring["first_at"] <= spring["last_at"]
    first = (await client.get("/api/v1/campaigns", params={"limit": 1})).json()
    rest = (await client.get("/api/v1/campaigns",
                             params={"limit": 1, "cursor": first["next_cursor"]})).json()
    assert [c["campaign"] for c in first["items"] + rest["items"]] == ["winter", "spring"]
    assert rest["next_cursor"] is None


async def test_a_dlr_derives_the_label_and_never_changes_one(app_with: AppFactory,
                                                            engine: Engine) -> None:
    app = await app_with(campaign_pattern=r"^(?P<campaign>[a-z]+)-\d+$")
    async with client_for(app) as c:
        await dlr(c, type="delivery", status="delivered", msg_id="d1", p_transaction_id="sale-7")
        await dlr(c, type="seen", msg_id="d2")  # no p_transaction_id: no label
        send(engine, ["d3"], "autumn")
        await dlr(c, type="seen", msg_id="d3", p_transaction_id="sale-9")
        labels = {m: (await c.get(f"/api/v1/messages/{m}")).json()["campaign"]
                  for m in ("d1", "d2", "d3")}
    assert labels == {"d1": "sale", "d2": None, "d3": "autumn"}


def test_a_bad_campaign_pattern_stops_start_up() -> None:
    from app.config import SettingsError

    from ..helpers import make_settings

    for pattern, words in [("(", "not a regular expression"), (r"^\w+$", "named campaign")]:
        with pytest.raises(SettingsError) as exc:
            make_settings(campaign_pattern=pattern)
        assert "DLR_CAMPAIGN_PATTERN" in str(exc.value) and words in str(exc.value)


async def test_pages_by_time_walk_newest_first_and_lose_nothing(client: httpx.AsyncClient,
                                                               engine: Engine) -> None:
    base = datetime.now(UTC) - timedelta(minutes=30)
    send(engine, [f"t{i:02}" for i in range(23)], "timed")
    with engine.begin() as conn:  # first known at scattered times, not in id order
        for i in range(23):
            conn.execute(text("UPDATE messages SET created_at = :at WHERE msg_id = :m")
                         .bindparams(bindparam("at", type_=UTCDateTime())),
                         {"at": base + timedelta(seconds=(i * 7) % 23), "m": f"t{i:02}"})
    params: dict[str, Any] = {"since": (base - timedelta(seconds=1)).isoformat(), "limit": 5}
    seen: list[dict[str, Any]] = []
    while True:
        page = (await client.get("/api/v1/messages", params=params)).json()
        seen += page["items"]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert len(seen) == 23 and len({m["msg_id"] for m in seen}) == 23
    assert [m["created_at"] for m in seen] == sorted((m["created_at"] for m in seen),
                                                     reverse=True)
    until = (await client.get("/api/v1/messages", params={
        "until": (base + timedelta(seconds=5)).isoformat(), "limit": 100})).json()
    assert len(until["items"]) == 5


async def test_the_export_has_one_row_per_message(client: httpx.AsyncClient,
                                                  engine: Engine) -> None:
    send(engine, ["e1", "e2", "e3"], "exported")
    send(engine, ["x1"], "other")
    await dlr(client, type="delivery", status="undelivered", msg_id="e2",
              status_extended="VIBER_BLOCKED_BY_USER")
    await dlr(client, type="reply", msg_id="e3", text="first")
    await dlr(client, type="reply", msg_id="e3", text="Да, спасибо")
    r = await client.get("/api/v1/messages/export", params={"campaign": "exported"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert sorted(row["msg_id"] for row in rows) == ["e1", "e2", "e3"]
    by_id = {row["msg_id"]: row for row in rows}
    assert by_id["e2"]["status"] == "undelivered"
    assert by_id["e2"]["status_extended"] == "VIBER_BLOCKED_BY_USER"
    assert by_id["e3"]["last_reply_text"] == "Да, спасибо" and by_id["e3"]["last_reply_at"]
    assert by_id["e1"]["campaign"] == "exported" and by_id["e1"]["phone"]
    nd = await client.get("/api/v1/messages/export", params={"campaign": "exported",
                                                              "format": "ndjson"})
    docs = [json.loads(line) for line in nd.text.splitlines()]
    assert sorted(d["msg_id"] for d in docs) == ["e1", "e2", "e3"]
    for d in docs:
        lookup = (await client.get(f"/api/v1/messages/{d['msg_id']}")).json()
        assert {k: lookup[k] for k in ("status", "phone", "campaign", "status_extended")} == {
            k: d[k] for k in ("status", "phone", "campaign", "status_extended")}
    empty = await client.get("/api/v1/messages/export", params={"campaign": "none"})
    assert empty.text.splitlines() == [",".join(
        ["msg_id", "campaign", "p_transaction_id", "phone", "status", "status_extended",
         "sent_at", "delivered_at", "seen_at", "last_reply_text", "last_reply_at"])]


def _instant(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


async def test_the_export_equals_the_messages_across_many_chunks(
        client: httpx.AsyncClient, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every message once, with the values its own lookup shows, however the chunks fall; the
    times written by the database are the lookup's instants, to the microsecond."""
    monkeypatch.setattr("app.query.export.CHUNK", 2)
    ids = [f"k{i}" for i in range(7)]
    send(engine, ids, "chunked")
    await dlr(client, type="delivery", status="delivered", msg_id="k1")
    await dlr(client, type="seen", msg_id="k1")
    await dlr(client, type="delivery", status="undelivered", msg_id="k4",
              status_extended="VIBER_USER_NOT_FOUND")
    await dlr(client, type="reply", msg_id="k6", text='a "quoted", reply\non two lines')
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    for params in ({"campaign": "chunked"}, {"since": since}):
        for fmt in ("csv", "ndjson"):
            r = await client.get("/api/v1/messages/export", params=params | {"format": fmt})
            assert r.status_code == 200
            rows = (list(csv.DictReader(io.StringIO(r.text))) if fmt == "csv"
                    else [json.loads(line) for line in r.text.splitlines()])
            assert [row["msg_id"] for row in rows] == ids, (params, fmt)
            for row in rows:
                shown = (await client.get(f"/api/v1/messages/{row['msg_id']}")).json()
                for name in ("campaign", "p_transaction_id", "phone", "status"):
                    assert row[name] == shown[name]
                assert (row["status_extended"] or None) == shown["status_extended"]
                for name in ("sent_at", "delivered_at", "seen_at"):
                    assert _instant(row[name]) == _instant(shown[name]), (name, row)
                    assert not row[name] or row[name].endswith("Z")
                replies = [e for e in shown["events"] if e["type"] == "reply"]
                assert (row["last_reply_text"] or None) == (
                    replies[-1]["text"] if replies else None)
                assert _instant(row["last_reply_at"]) == (
                    _instant(replies[-1]["received_at"]) if replies else None)
    assert [row["status"] for row in csv.DictReader(io.StringIO((await client.get(
        "/api/v1/messages/export", params={"campaign": "chunked"})).text))][1] == "seen"


def test_dlr_export_writes_the_same_rows(engine: Engine, settings: Any, tmp_path: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    send(engine, [f"c{i}" for i in range(12)], "cli")
    monkeypatch.setenv("DLR_DATABASE_URL", settings.database_url)
    out = tmp_path / "cli.ndjson"
    result = CliRunner().invoke(cli, ["export", "--campaign", "cli", "--format", "ndjson",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(d["msg_id"] for d in docs) == sorted(f"c{i}" for i in range(12))
    assert "12 messages exported" in result.output


async def test_an_export_of_a_campaign_with_any_name_is_a_download(
        client: httpx.AsyncClient, engine: Engine) -> None:
    send(engine, ["u1"], 'Весна "2026"; ü')
    r = await client.get("/api/v1/messages/export", params={"campaign": 'Весна "2026"; ü'})
    assert r.status_code == 200
    disposition = r.headers["content-disposition"]
    assert disposition.isascii() and "filename*=UTF-8''" in disposition
    assert [row["msg_id"] for row in csv.DictReader(io.StringIO(r.text))] == ["u1"]


@pytest.mark.parametrize("stored", [datetime(2026, 12, 7, 10, 0, tzinfo=UTC),
                                    datetime(2026, 12, 7, 10, 0, 1, 500000, tzinfo=UTC),
                                    datetime(2026, 12, 7, 23, 59, 59, 123456, tzinfo=UTC)])
def test_the_export_writes_times_as_isoformat_in_utc(engine: Engine, stored: datetime) -> None:
    """The database writes the export's times as Python's isoformat with microseconds, in UTC
    with a Z, whatever the fraction; on SQLite also for text stored with fewer digits (as a
    set-based SQL seed writes it)."""
    want = stored.isoformat(timespec="microseconds").replace("+00:00", "Z")
    with engine.connect() as conn:
        assert conn.scalar(select(iso_utc(literal(stored, UTCDateTime())))) == want
        if conn.dialect.name == "sqlite":
            for text_form in (stored.strftime("%Y-%m-%d %H:%M:%S"),
                              stored.strftime("%Y-%m-%d %H:%M:%S.%f")[:23]):
                as_python = datetime.fromisoformat(text_form).isoformat(timespec="microseconds")
                assert conn.scalar(select(iso_utc(literal(text_form)))) == as_python + "Z"
