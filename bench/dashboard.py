"""The dashboard's reads on a bulk sender's day (issue 23): stats for an hour, a day, 7 days
and one campaign, a day's timeline, the campaign list and a page by time, each timed at two
sizes of the same day's data, so that a read that grows with the rows shows.

A day is seeded set-based: messages first known across the last 24 hours in 17 campaigns (one,
sale-0, holds a fifth of the day: the 1,000,000-message campaign the export is timed on),
three notifications each, inserted in SQL: on PostgreSQL the counts' triggers count them as
they do in service, then they are squashed as the app squashes; on SQLite, whose write path
keeps the counts, they are counted afresh (`counts.recount`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine, text

from app.store.counts import recount, squash

CAMPAIGNS = 20
DAY = 86_400
REQUESTS = 60  # per read, one after another (the dashboard's own pattern), after 5 warm-ups


def seed_day(engine: Engine, start: int, stop: int, total: int) -> None:
    """Messages day-{start}..day-{stop - 1} of a day of `total`, spread evenly over the last
    24 hours, with their notifications; statuses as a campaign's mix."""
    with engine.begin() as conn:
        pg = conn.dialect.name == "postgresql"
        if pg:
            series = f"generate_series({start}, {stop - 1}) AS s(g)"
            at = f"now() - ((g::float8 * {DAY}) / {total}) * interval '1 second'"
            as_text = "g::text"
            key = "md5('day-' || g::text || '-' || k::text)"
        else:
            conn.exec_driver_sql("PRAGMA synchronous=OFF")  # seeding only
            series = (f"(WITH RECURSIVE s(g) AS (SELECT {start} UNION ALL SELECT g + 1 FROM s "
                      f"WHERE g < {stop - 1}) SELECT g FROM s)")
            at = (f"strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || (g * {DAY}.0 / {total}) "
                  "|| ' seconds')")
            as_text = "CAST(g AS TEXT)"
            key = "'day-' || CAST(g AS TEXT) || '-' || CAST(k AS TEXT)"
        status = ("CASE WHEN g % 10 = 0 THEN 'undelivered' WHEN g % 10 < 4 THEN 'seen' "
                  "ELSE 'delivered' END")
        rank = "CASE WHEN g % 10 = 0 THEN 2 WHEN g % 10 < 4 THEN 3 ELSE 2 END"
        ext = "CASE WHEN g % 10 = 0 THEN 'VIBER_USER_NOT_FOUND' END"
        label = f"(g % {CAMPAIGNS})::text" if pg else f"CAST(g % {CAMPAIGNS} AS TEXT)"
        campaign = f"(CASE WHEN g % 5 = 0 THEN 'sale-0' ELSE 'sale-' || {label} END)"
        conn.execute(text(f"""
            INSERT INTO messages (msg_key, msg_id, p_transaction_id, phone, sender, kind,
                status, status_rank, status_extended, sent_at, delivered_at, seen_at,
                created_at, updated_at, campaign, delivery_events, seen_events, reply_events)
            SELECT 'day-' || {as_text}, 'day-' || {as_text}, {campaign} || '-' || {as_text},
                   '7900' || {as_text}, 'Shop', 'text', {status}, {rank}, {ext},
                   {at}, {at}, CASE WHEN g % 10 BETWEEN 1 AND 3 THEN {at} END, {at}, {at},
                   {campaign}, 2, CASE WHEN g % 10 BETWEEN 1 AND 3 THEN 1 ELSE 0 END, 0
            FROM {series}
        """))
        conn.execute(text(f"""
            INSERT INTO events (dedupe_key, msg_key, type, status, status_extended,
                                unknown_status_extended, p_transaction_id, received_at)
            SELECT {key}, 'day-' || {as_text},
                   CASE WHEN k = 3 AND g % 10 BETWEEN 1 AND 3 THEN 'seen' ELSE 'delivery' END,
                   CASE WHEN k = 1 THEN 'in_process'
                        WHEN k = 3 AND g % 10 BETWEEN 1 AND 3 THEN NULL
                        WHEN g % 10 = 0 THEN 'undelivered' ELSE 'delivered' END,
                   CASE WHEN k > 1 THEN {ext} END, false, {campaign} || '-' || {as_text}, {at}
            FROM {series} CROSS JOIN (SELECT 1 AS k UNION ALL SELECT 2 UNION ALL SELECT 3) kk
        """))
    with engine.begin() as conn:
        if pg:
            squash(conn)  # what the triggers added, folded as the app's squasher would
        else:
            recount(conn)  # SQLite's write path keeps its counts; a seed goes around it
        conn.exec_driver_sql("ANALYZE")


def reads(now: datetime) -> dict[str, tuple[str, dict[str, str]]]:
    def iso(t: datetime) -> str:
        return t.isoformat()

    return {
        "stats, last hour": ("/api/v1/stats", {"since": iso(now - timedelta(hours=1))}),
        "stats, last day": ("/api/v1/stats", {"since": iso(now - timedelta(days=1))}),
        "stats, last 7 days": ("/api/v1/stats", {"since": iso(now - timedelta(days=7))}),
        "stats, one campaign": ("/api/v1/stats", {"campaign": "sale-7"}),
        "timeline, a day by 15 min": ("/api/v1/timeline", {
            "since": iso(now - timedelta(days=1)), "bucket_seconds": "900"}),
        "campaign list": ("/api/v1/campaigns", {"limit": "50"}),
        "page, since an hour ago": ("/api/v1/messages", {
            "since": iso(now - timedelta(hours=1)), "limit": "50"}),
        "page, until an hour ago": ("/api/v1/messages", {
            "until": iso(now - timedelta(hours=1)), "limit": "50"}),
    }


def timed(url: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    now = datetime.now(UTC)
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, (path, params) in reads(now).items():
            for _ in range(5):
                client.get(path, params=params).raise_for_status()
            took = []
            for _ in range(REQUESTS):
                started = time.perf_counter()
                client.get(path, params=params).raise_for_status()
                took.append((time.perf_counter() - started) * 1000)
            took.sort()
            out[name] = {"p50_ms": round(statistics.median(took), 1),
                         "p99_ms": round(took[int(len(took) * 0.99) - 1], 1)}
    return out


def dashboard_round(db: Any, start_server: Callable[[], Any], sizes: list[int],
                    console: Any, dlr: str = "", here: Any = None) -> dict[str, Any]:
    """Seed the day up to each size in turn and time every read on a fresh server."""
    results: dict[str, Any] = {"sizes": sizes, "reads": {}}
    seeded = 0
    for size in sizes:
        console.print(f"  seeding the day to {size:,} messages")
        started = time.monotonic()
        # Spread as the whole day would be: the smaller size is every (total/size)-th message.
        seed_day(db.engine, seeded + 1, size + 1, size)
        seeded = size
        results[f"seed_seconds_{size}"] = round(time.monotonic() - started)
        server = start_server()
        try:
            results["reads"][size] = timed(server.url)
            if size == sizes[-1]:
                results["export"] = export_timed(server)
        finally:
            server.stop()
    if dlr:
        console.print("  dlr purge of the day while callbacks arrive")
        results["purge"] = purge_round(db, start_server, dlr, here)
    return results


def export_timed(server: Any) -> dict[str, Any]:
    """The largest campaign's export streamed whole: rows, seconds, and the server's memory.
    The client only counts line ends (splitting a million lines in Python would time this
    client, not the server)."""
    before = server.memory_mb()
    started = time.perf_counter()
    rows = 0
    with httpx.stream("GET", f"{server.url}/api/v1/messages/export",
                      params={"campaign": "sale-0"}, timeout=600) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            rows += chunk.count(b"\n")
    seconds = time.perf_counter() - started
    after = server.memory_mb()
    return {"rows": rows - 1, "seconds": round(seconds, 2),
            "rows_per_second": round((rows - 1) / seconds),
            "rss_growth_mb": round(after["rss_mb"] - before["rss_mb"], 1),
            "peak_growth_mb": round(after["peak_mb"] - before["peak_mb"], 1)}


def markdown_rows(backend: str, res: dict[str, Any]) -> list[str]:
    sizes = res["sizes"]
    lines = [f"| {backend} | read | " + " | ".join(f"p50 / p99 ms at {s:,}" for s in sizes)
             + " | p99 ratio |", "|---|---|" + "---|" * len(sizes) + "---|"]
    first, last = res["reads"][sizes[0]], res["reads"][sizes[-1]]
    for name in first:
        cells = " | ".join(
            f"{res['reads'][s][name]['p50_ms']} / {res['reads'][s][name]['p99_ms']}"
            for s in sizes)
        ratio = last[name]["p99_ms"] / max(first[name]["p99_ms"], 0.1)
        lines.append(f"| | {name} | {cells} | {ratio:.2f} |")
    pu = res.get("purge")
    if pu:
        lines.append(f"| | dlr purge of the day ({pu['purged']}) while callbacks arrive at "
                     f"{pu['callbacks_per_second']:,}/s | {pu['purge_seconds']} s; callbacks "
                     f"p50 / p99 {pu['p50_ms']:.1f} / {pu['p99_ms']:.1f} ms, non-200 "
                     f"{pu['non_200']} | counts agree with the rows after it: "
                     f"{'yes' if pu['counts_right'] else 'NO'} | |")
    ex = res.get("export")
    if ex:
        lines.append(f"| | export of one campaign, CSV | {ex['rows']:,} rows in "
                     f"{ex['seconds']} s ({ex['rows_per_second']:,} rows/s) | server RSS "
                     f"+{ex['rss_growth_mb']} MB (peak +{ex['peak_growth_mb']} MB) | |")
    return lines


def purge_round(db: Any, start_server: Callable[[], Any], dlr: str, here: Any) -> dict[str, Any]:
    """`dlr purge` of the seeded day while callbacks arrive at about 1,000/s (wrk, 30
    connections, 10 ms between each one's requests: 10 gave about 500/s here, 20 on SQLite
    670/s, as each answer's wait adds to the 10 ms): how long it took, the callbacks'
    latency meanwhile, and whether the counts still agree with the rows afterwards."""
    import json
    import os
    import signal
    import subprocess

    from app.store.counts import window

    server = start_server()
    env = os.environ | {"BENCH_PREFIX": "purge", "BENCH_DELAY_MS": "10"}
    load = subprocess.Popen(
        ["wrk", "-t1", "-c30", "-d3600s", "--latency", "-s", str(here / "mix.lua"),
         server.url], stdout=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(5)  # the load settles before the purge starts
        started = time.monotonic()
        purge = subprocess.run(
            [dlr, "purge", "--older-than", "5min", "--yes"], capture_output=True, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("DLR_")}
            | {"DLR_DATABASE_URL": db.url})
        took = time.monotonic() - started
        time.sleep(2)
    finally:
        load.send_signal(signal.SIGINT)
        out, _ = load.communicate(timeout=60)
        server.stop()
    line = next((x for x in out.splitlines() if x.startswith("WRK_JSON ")), None)
    stats = json.loads(line.removeprefix("WRK_JSON ")) if line else {}
    with db.engine.connect() as conn:
        counted = window(conn, since=None, until=None)
        rows = conn.execute(text("SELECT count(*), count(delivered_at), count(seen_at) "
                                 "FROM messages")).one()
        events = conn.execute(text("SELECT count(*) FROM events")).scalar()
    right = (counted.get("messages"), counted.get("reached"), counted.get("opened")) == tuple(
        rows) and sum(counted.get(f"ev_{t}") for t in ("delivery", "seen", "reply")) == events
    return {"purge_seconds": round(took, 1), "purge_exit": purge.returncode,
            "purged": purge.stdout.strip().splitlines()[-1] if purge.stdout.strip() else "",
            "callbacks": stats.get("requests", 0),
            "callbacks_per_second": round(stats.get("requests", 0) / max(
                stats.get("duration_us", 1) / 1e6, 1e-9)),
            "p50_ms": stats.get("p50_us", 0) / 1000, "p99_ms": stats.get("p99_us", 0) / 1000,
            "non_200": stats.get("status_errors", 0) + stats.get("timeouts", 0),
            "counts_right": right, "messages_left": rows[0]}
