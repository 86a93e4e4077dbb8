"""Fill a database with N messages and 3N events, set-based (seconds, not hours)."""

from __future__ import annotations

from sqlalchemy import Engine, text

from app.store.counts import recount, squash

CAMPAIGNS = 10_000  # messages are spread over this many p_transaction_ids

_STATUS = """CASE WHEN g % 10 = 0 THEN 'undelivered' WHEN g % 10 < 4 THEN 'seen'
                  ELSE 'delivered' END"""
_RANK = "CASE WHEN g % 10 = 0 THEN 2 WHEN g % 10 < 4 THEN 3 ELSE 2 END"
_EXT = "CASE WHEN g % 10 = 0 THEN 'VIBER_USER_NOT_FOUND' END"


def seed(engine: Engine, messages: int) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            series = f"generate_series(1, {messages}) AS s(g)"
            ts = "now() - (g || ' seconds')::interval"
            key = "md5(g::text || '-' || k::text)"

            def as_text(expr: str) -> str:
                return f"({expr})::text"
        else:
            conn.exec_driver_sql("PRAGMA synchronous=OFF")  # seeding only; the bench restores
            series = (f"(WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s "
                      f"WHERE g < {messages}) SELECT g FROM s)")
            ts = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || g || ' seconds')"
            key = "printf('%032d', g * 3 + k)"

            def as_text(expr: str) -> str:
                return f"CAST({expr} AS TEXT)"
        msg = "'seed-' || " + as_text("g")
        campaign = "'camp-' || " + as_text(f"g % {CAMPAIGNS}")
        conn.execute(text(f"""
            INSERT INTO messages (msg_key, msg_id, p_transaction_id, phone, sender, kind,
                                  status, status_rank, status_extended, sent_at, delivered_at,
                                  seen_at, created_at, updated_at)
            SELECT {msg}, {msg}, {campaign}, {as_text("79000000000 + g")}, 'Shop', 'text',
                   {_STATUS}, {_RANK}, {_EXT},
                   {ts}, {ts}, CASE WHEN g % 10 BETWEEN 1 AND 3 THEN {ts} END, {ts}, {ts}
            FROM {series}
        """))
        conn.execute(text(f"""
            INSERT INTO events (dedupe_key, msg_key, type, status, status_extended,
                                unknown_status_extended, text, p_transaction_id, received_at)
            SELECT {key}, {msg},
                   CASE WHEN k = 3 AND g % 10 BETWEEN 1 AND 3 THEN 'seen' ELSE 'delivery' END,
                   CASE WHEN k = 1 THEN 'in_process'
                        WHEN k = 3 AND g % 10 BETWEEN 1 AND 3 THEN NULL
                        WHEN g % 10 = 0 THEN 'undelivered' ELSE 'delivered' END,
                   CASE WHEN k > 1 THEN {_EXT} END, false, NULL,
                   {campaign}, {ts}
            FROM {series} CROSS JOIN (SELECT 1 AS k UNION ALL SELECT 2 UNION ALL SELECT 3) AS kk
        """))
    # PostgreSQL's counts' triggers wrote their delta rows: fold them as a running server's
    # squasher would have while the data came in (one squash of millions of rows would
    # otherwise fall on the server being measured). SQLite's write path keeps its counts,
    # which a seed goes around: count what it stored.
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            squash(conn)
        else:
            recount(conn)
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE messages")
            conn.exec_driver_sql("ANALYZE events")
        else:
            conn.exec_driver_sql("ANALYZE")
