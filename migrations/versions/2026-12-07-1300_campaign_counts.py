"""campaigns and counts: the campaign label, notifications per type on each message, and the
squashable counts the dashboard reads, kept by triggers and counted here for existing rows

Revision ID: e4f5a6b7c8d9
Revises: d1e2f3a4b5c6
Create Date: 2026-12-07 13:00:00

The counts are kept by the database itself, in the same transaction as the rows they count
(app/store/counts.py says how they are read and squashed): a trigger on `messages` inserts
what an insert, update or delete changed as delta rows, one on `events` counts notifications
as they are stored and takes them off when they are deleted (retention), one on `rejected`
counts rejected callbacks. PostgreSQL's
triggers run once per statement over its transition tables, so a batch of a thousand
notifications adds a handful of delta rows; SQLite's run per row.

A message counts in the minute it was first known (`created_at`); a notification in the
minute it was received. Every delta goes to campaign "*" (all messages) and, for a labelled
message, to its campaign too; a campaign's notifications are read off its messages (their
`updated_at` is the latest notification's time, and the notification columns grow by one
per stored notification), since a notification is stored before its message's label is.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.store.db

revision: str = "e4f5a6b7c8d9"
down_revision: str | None = "d1e2f3a4b5c6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = app.store.db.UTCDateTime(timezone=True)

# What a message adds to the counts of the minute it was first known: column -> condition.
STATUS = {
    "messages": "TRUE",
    "accepted": "{m}.status = 'accepted'",
    "in_process": "{m}.status = 'in_process'",
    "delivered": "{m}.status = 'delivered'",
    "undelivered": "{m}.status = 'undelivered'",
    "seen": "{m}.status = 'seen'",
    "reached": "{m}.delivered_at IS NOT NULL",
    "opened": "{m}.seen_at IS NOT NULL",
    "replied": "{m}.reply_events > 0",
}
# What its notifications add to the minute they were received in.
EVENTS = {"ev_delivery": "delivery_events", "ev_seen": "seen_events", "ev_reply": "reply_events"}
ALL = "*"
# The status_extended a message shows (app/core/notifications.py's shown_status_extended).
SHOWN = ("CASE WHEN {m}.kind IS NOT NULL AND {m}.kind <> 'sms' AND "
         "substr({m}.status_extended, 1, 4) = 'SMS_' THEN 'STATUS_' || "
         "substr({m}.status_extended, 5) ELSE {m}.status_extended END")


def _run(sql: str) -> None:
    """Raw SQL, as written: text() would read `:00` in SQLite's minute format as a parameter."""
    op.get_bind().exec_driver_sql(sql)


def _count_tables() -> None:
    def columns(*names: str) -> list[sa.Column]:  # type: ignore[type-arg]
        return [sa.Column(n, sa.BigInteger(), server_default="0", nullable=False)
                for n in names]

    op.create_table(
        "message_counts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("bucket", Time, nullable=False),
        sa.Column("campaign", sa.String(length=64), nullable=False),
        *columns(*STATUS, *EVENTS, "rejected"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_counts")),
    )
    op.create_index(op.f("ix_message_counts_campaign_bucket"), "message_counts",
                    ["campaign", "bucket"])
    op.create_table(
        "code_counts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("bucket", Time, nullable=False),
        sa.Column("campaign", sa.String(length=64), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_code_counts")),
    )
    op.create_index(op.f("ix_code_counts_campaign_bucket"), "code_counts",
                    ["campaign", "bucket"])
    op.create_table(
        "campaign_counts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("campaign", sa.String(length=64), nullable=False),
        *columns(*STATUS),
        sa.Column("first_at", Time, nullable=True),
        sa.Column("last_at", Time, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign_counts")),
    )
    op.create_index(op.f("ix_campaign_counts_campaign"), "campaign_counts", ["campaign"])


# --- PostgreSQL: statement triggers over transition tables ------------------------------------

def _pg_int(cond: str) -> str:
    return f"({cond})::int"


def _pg_status_sums(m: str) -> str:
    return ", ".join(f"sum({m}.sign * {_pg_int(c.format(m=m))})" for c in STATUS.values())


def _pg_messages_function(op_name: str) -> str:
    """The body of the trigger function for INSERT, UPDATE or DELETE on messages."""
    if op_name == "INSERT":
        signed = "SELECT 1 AS sign, n.* FROM new_rows n"
    elif op_name == "UPDATE":
        signed = "SELECT -1 AS sign, o.* FROM old_rows o UNION ALL SELECT 1, n.* FROM new_rows n"
    else:
        signed = "SELECT -1 AS sign, o.* FROM old_rows o"
    status_cols = ", ".join(STATUS)
    event_cols = ", ".join(EVENTS)
    zero_events = ", ".join("0" for _ in EVENTS)
    zero_status = ", ".join("0" for _ in STATUS)
    status_nonzero = " OR ".join(f"{c} <> 0" for c in STATUS)
    # A campaign's notifications: only inserts and updates add them (deleting a message leaves
    # them to the events trigger, which counts off each deleted notification at its own
    # time). Every message's ("*") are counted where they are inserted, by the events trigger.
    if op_name == "INSERT":
        events = (f"SELECT date_trunc('minute', n.updated_at), c.campaign, {zero_status}, "
                  + ", ".join(f"sum(n.{col})" for col in EVENTS.values())
                  + " FROM new_rows n CROSS JOIN LATERAL (VALUES (n.campaign)) "
                    "AS c(campaign) WHERE c.campaign IS NOT NULL GROUP BY 1, 2")
    elif op_name == "UPDATE":
        events = (f"SELECT date_trunc('minute', n.updated_at), c.campaign, {zero_status}, "
                  + ", ".join(f"sum(n.{col} - o.{col})" for col in EVENTS.values())
                  + " FROM new_rows n JOIN old_rows o ON o.id = n.id CROSS JOIN LATERAL "
                    "(VALUES (n.campaign)) AS c(campaign) "
                    "WHERE c.campaign IS NOT NULL AND (n.campaign IS NOT DISTINCT FROM o.campaign "
                    "OR n.send_id IS NOT DISTINCT FROM o.send_id) GROUP BY 1, 2")
        # A label set or changed by a send recorded after its DLRs: the message's stored
        # notifications move from the old campaign's counts to the new one's, each at its
        # own minute (the write path merges a batch's sends after its notifications, so every
        # stored one is counted by then). A label a DLR fills in (the first ones carried no
        # p_transaction_id) counts the notifications from then on.
        by_type = ", ".join(f"sum(c.sign * (e.type = '{t}')::int)"
                            for t in ("delivery", "seen", "reply"))
        events += (
            f" UNION ALL SELECT date_trunc('minute', e.received_at), c.campaign, {zero_status}, "
            f"{by_type} FROM new_rows n JOIN old_rows o ON o.id = n.id "
            "AND n.campaign IS DISTINCT FROM o.campaign AND n.send_id IS DISTINCT FROM o.send_id "
            "JOIN events e ON e.msg_key = n.msg_key "
            "CROSS JOIN LATERAL (VALUES (o.campaign, -1), (n.campaign, 1)) AS c(campaign, sign) "
            "WHERE c.campaign IS NOT NULL GROUP BY 1, 2"
            f" UNION ALL SELECT date_trunc('minute', n.updated_at), o.campaign, {zero_status}, "
            + ", ".join(f"sum(n.{col} - o.{col})" for col in EVENTS.values())
            + " FROM new_rows n JOIN old_rows o ON o.id = n.id "
              "AND n.campaign IS DISTINCT FROM o.campaign AND n.send_id IS DISTINCT FROM "
              "o.send_id WHERE o.campaign IS NOT NULL GROUP BY 1, 2")
    else:
        events = None
    parts = [f"SELECT date_trunc('minute', m.created_at), c.campaign, {_pg_status_sums('m')}, "
             f"{zero_events} FROM signed m CROSS JOIN LATERAL (VALUES ('*'), (m.campaign)) "
             "AS c(campaign) WHERE c.campaign IS NOT NULL GROUP BY 1, 2"]
    if events:
        parts.append(events)
    first_last = ("min(m.created_at) FILTER (WHERE m.sign > 0), "
                  "max(m.updated_at) FILTER (WHERE m.sign > 0)")
    return f"""
BEGIN
    WITH signed AS ({signed}),
    d (bucket, campaign, {status_cols}, {event_cols}) AS ({" UNION ALL ".join(parts)})
    INSERT INTO message_counts (bucket, campaign, {status_cols}, {event_cols})
    SELECT bucket, campaign, {", ".join(f"sum({c})" for c in [*STATUS, *EVENTS])}
    FROM d GROUP BY bucket, campaign
    HAVING {" OR ".join(f"sum({c}) <> 0" for c in [*STATUS, *EVENTS])};

    WITH signed AS ({signed})
    INSERT INTO code_counts (bucket, campaign, code, n)
    SELECT date_trunc('minute', m.created_at), c.campaign, {SHOWN.format(m="m")}, sum(m.sign)
    FROM signed m CROSS JOIN LATERAL (VALUES ('*'), (m.campaign)) AS c(campaign)
    WHERE c.campaign IS NOT NULL AND m.status_extended IS NOT NULL
    GROUP BY 1, 2, 3 HAVING sum(m.sign) <> 0;

    WITH signed AS ({signed})
    INSERT INTO campaign_counts (campaign, {status_cols}, first_at, last_at)
    SELECT * FROM (
        SELECT m.campaign, {_pg_status_sums("m")}, {first_last}
        FROM signed m WHERE m.campaign IS NOT NULL GROUP BY m.campaign
    ) AS s ({", ".join(["campaign", *STATUS, "first_at", "last_at"])})
    WHERE {status_nonzero} OR last_at IS NOT NULL;
    RETURN NULL;
END"""


PG_EVENTS_INSERTED = """
BEGIN
    INSERT INTO message_counts (bucket, campaign, ev_delivery, ev_seen, ev_reply)
    SELECT date_trunc('minute', n.received_at), '*',
           count(*) FILTER (WHERE n.type = 'delivery'), count(*) FILTER (WHERE n.type = 'seen'),
           count(*) FILTER (WHERE n.type = 'reply')
    FROM new_rows n GROUP BY 1;
    RETURN NULL;
END"""

PG_EVENTS_DELETED = """
BEGIN
    INSERT INTO message_counts (bucket, campaign, ev_delivery, ev_seen, ev_reply)
    SELECT date_trunc('minute', o.received_at), c.campaign,
           -count(*) FILTER (WHERE o.type = 'delivery'), -count(*) FILTER (WHERE o.type = 'seen'),
           -count(*) FILTER (WHERE o.type = 'reply')
    FROM old_rows o LEFT JOIN messages m ON m.msg_key = o.msg_key
    CROSS JOIN LATERAL (VALUES ('*'), (m.campaign)) AS c(campaign)
    WHERE c.campaign IS NOT NULL GROUP BY 1, 2;
    RETURN NULL;
END"""


def _pg_rejected(sign: str, rows: str) -> str:
    return f"""
BEGIN
    INSERT INTO message_counts (bucket, campaign, rejected)
    SELECT date_trunc('minute', r.received_at), '*', {sign}count(*) FROM {rows} r GROUP BY 1;
    RETURN NULL;
END"""


PG_TRIGGERS = [
    # (function, body, table, event, transition tables)
    ("dlr_count_messages_inserted", _pg_messages_function("INSERT"), "messages", "INSERT",
     "NEW TABLE AS new_rows"),
    ("dlr_count_messages_updated", _pg_messages_function("UPDATE"), "messages", "UPDATE",
     "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
    ("dlr_count_messages_deleted", _pg_messages_function("DELETE"), "messages", "DELETE",
     "OLD TABLE AS old_rows"),
    ("dlr_count_events_inserted", PG_EVENTS_INSERTED, "events", "INSERT",
     "NEW TABLE AS new_rows"),
    ("dlr_count_events_deleted", PG_EVENTS_DELETED, "events", "DELETE", "OLD TABLE AS old_rows"),
    ("dlr_count_rejected_inserted", _pg_rejected("", "new_rows"), "rejected", "INSERT",
     "NEW TABLE AS new_rows"),
    ("dlr_count_rejected_deleted", _pg_rejected("-", "old_rows"), "rejected", "DELETE",
     "OLD TABLE AS old_rows"),
]


def _pg_create_triggers() -> None:
    for name, body, table, event, transition in PG_TRIGGERS:
        _run(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
                   f"{body}\n$$")
        _run(f"CREATE TRIGGER {name} AFTER {event} ON {table} REFERENCING {transition} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {name}()")


# --- SQLite: row triggers ----------------------------------------------------------------------

def _minute(column: str) -> str:
    # UTCDateTime is stored as 'YYYY-MM-DD HH:MM:SS.ffffff'.
    return f"substr({column}, 1, 16) || ':00.000000'"


def _lite_status(m: str, sign: str) -> str:
    return ", ".join(f"{sign}({c.format(m=m).replace('TRUE', '1')})" for c in STATUS.values())


def _lite_status_delta(campaign_same: bool) -> str:
    """NEW minus OLD per status column (the same minute: created_at never changes)."""
    return ", ".join(f"({c.format(m='NEW').replace('TRUE', '1')}) - "
                     f"({c.format(m='OLD').replace('TRUE', '1')})" for c in STATUS.values())


def _lite_insert_counts(rows: list[tuple[str, str, str, str]]) -> str:
    """INSERT ... SELECT per (bucket, campaign, status values, event values) with a guard."""
    cols = ", ".join([*STATUS, *EVENTS])
    out = []
    for bucket, campaign, values, guard in rows:
        out.append(f"INSERT INTO message_counts (bucket, campaign, {cols}) "
                   f"SELECT {bucket}, {campaign}, {values} WHERE {guard};")
    return "\n    ".join(out)


def _sqlite_triggers() -> list[str]:
    status_cols = ", ".join(STATUS)
    zero_events = ", ".join("0" for _ in EVENTS)
    zero_status = ", ".join("0" for _ in STATUS)
    new_events = ", ".join(f"NEW.{c}" for c in EVENTS.values())
    event_delta = ", ".join(f"NEW.{c} - OLD.{c}" for c in EVENTS.values())
    any_new_event = " + ".join(f"NEW.{c}" for c in EVENTS.values()) + " > 0"
    any_event_delta = " OR ".join(f"NEW.{c} <> OLD.{c}" for c in EVENTS.values())
    status_changed = " OR ".join(
        f"({c.format(m='NEW').replace('TRUE', '1')}) <> ({c.format(m='OLD').replace('TRUE', '1')})"
        for c in STATUS.values())
    shown_new, shown_old = SHOWN.format(m="NEW"), SHOWN.format(m="OLD")
    created = _minute("NEW.created_at")
    inserted = _lite_insert_counts([
        (created, "'*'", f"{_lite_status('NEW', '')}, {zero_events}", "1"),
        (created, "NEW.campaign", f"{_lite_status('NEW', '')}, {zero_events}",
         "NEW.campaign IS NOT NULL"),
        (_minute("NEW.updated_at"), "NEW.campaign", f"{zero_status}, {new_events}",
         f"NEW.campaign IS NOT NULL AND {any_new_event}"),
    ])
    updated = _lite_insert_counts([
        (created, "'*'", f"{_lite_status_delta(True)}, {zero_events}", status_changed),
        # The same campaign: what changed; another one: off the old, onto the new.
        (created, "NEW.campaign", f"{_lite_status_delta(True)}, {zero_events}",
         f"NEW.campaign IS NOT NULL AND NEW.campaign IS OLD.campaign AND ({status_changed})"),
        (created, "OLD.campaign", f"{_lite_status('OLD', '-')}, {zero_events}",
         "OLD.campaign IS NOT NULL AND NEW.campaign IS NOT OLD.campaign"),
        (created, "NEW.campaign", f"{_lite_status('NEW', '')}, {zero_events}",
         "NEW.campaign IS NOT NULL AND NEW.campaign IS NOT OLD.campaign"),
        (_minute("NEW.updated_at"), "NEW.campaign", f"{zero_status}, {event_delta}",
         f"NEW.campaign IS NOT NULL AND (NEW.campaign IS OLD.campaign OR NEW.send_id IS "
         f"OLD.send_id) AND ({any_event_delta})"),
        # A label set or changed: see the PostgreSQL function (the old campaign had counted
        # all of the message's notifications but this update's new ones).
        (_minute("NEW.updated_at"), "OLD.campaign", f"{zero_status}, {event_delta}",
         f"OLD.campaign IS NOT NULL AND NEW.campaign IS NOT OLD.campaign "
         f"AND NEW.send_id IS NOT OLD.send_id AND ({any_event_delta})"),
    ])
    moved = "\n    ".join(
        f"INSERT INTO message_counts (bucket, campaign, {', '.join(EVENTS)}) "
        f"SELECT {_minute('e.received_at')}, {campaign}, "
        + ", ".join(f"{sign}sum(e.type = '{t}')" for t in ("delivery", "seen", "reply"))
        + f" FROM events e WHERE e.msg_key = NEW.msg_key AND {campaign} IS NOT NULL "
          "AND NEW.campaign IS NOT OLD.campaign AND NEW.send_id IS NOT OLD.send_id GROUP BY 1;"
        for campaign, sign in (("OLD.campaign", "-"), ("NEW.campaign", "")))
    deleted = _lite_insert_counts([
        (_minute("OLD.created_at"), "'*'", f"{_lite_status('OLD', '-')}, {zero_events}", "1"),
        (_minute("OLD.created_at"), "OLD.campaign", f"{_lite_status('OLD', '-')}, {zero_events}",
         "OLD.campaign IS NOT NULL"),
    ])

    def codes(m: str, sign: str, guard: str) -> str:
        shown = SHOWN.format(m=m)
        return "\n    ".join(
            f"INSERT INTO code_counts (bucket, campaign, code, n) SELECT "
            f"{_minute(f'{m}.created_at')}, {campaign}, {shown}, {sign}1 "
            f"WHERE {m}.status_extended IS NOT NULL AND {guard}{extra};"
            for campaign, extra in (("'*'", ""),
                                    (f"{m}.campaign", f" AND {m}.campaign IS NOT NULL")))

    def campaign_row(m: str, sign: str, guard: str, times: bool) -> str:
        at = f"{m}.created_at, {m}.updated_at" if times else "NULL, NULL"
        return (f"INSERT INTO campaign_counts (campaign, {status_cols}, first_at, last_at) "
                f"SELECT {m}.campaign, {_lite_status(m, sign)}, {at} "
                f"WHERE {m}.campaign IS NOT NULL AND {guard};")

    code_changed = (f"(({shown_new}) IS NOT ({shown_old}) OR NEW.campaign IS NOT OLD.campaign)")
    return [
        f"""CREATE TRIGGER dlr_count_messages_inserted AFTER INSERT ON messages BEGIN
    {inserted}
    {codes("NEW", "", "1")}
    {campaign_row("NEW", "", "1", True)}
END""",
        f"""CREATE TRIGGER dlr_count_messages_updated AFTER UPDATE ON messages BEGIN
    {updated}
    {moved}
    {codes("OLD", "-", code_changed)}
    {codes("NEW", "", code_changed)}
    {campaign_row("OLD", "-", f"(({status_changed}) OR NEW.campaign IS NOT OLD.campaign)", False)}
    {campaign_row("NEW", "", f"(({status_changed}) OR NEW.campaign IS NOT OLD.campaign)", True)}
    INSERT INTO campaign_counts (campaign, first_at, last_at)
    SELECT NEW.campaign, NEW.created_at, NEW.updated_at
    WHERE NEW.campaign IS NOT NULL AND NEW.campaign IS OLD.campaign AND NOT ({status_changed});
END""",
        f"""CREATE TRIGGER dlr_count_messages_deleted AFTER DELETE ON messages BEGIN
    {deleted}
    {codes("OLD", "-", "1")}
    {campaign_row("OLD", "-", "1", False)}
END""",
        f"""CREATE TRIGGER dlr_count_events_inserted AFTER INSERT ON events BEGIN
    INSERT INTO message_counts (bucket, campaign, ev_delivery, ev_seen, ev_reply)
    VALUES ({_minute("NEW.received_at")}, '*', NEW.type = 'delivery', NEW.type = 'seen',
            NEW.type = 'reply');
END""",
        f"""CREATE TRIGGER dlr_count_events_deleted AFTER DELETE ON events BEGIN
    INSERT INTO message_counts (bucket, campaign, ev_delivery, ev_seen, ev_reply)
    SELECT {_minute("OLD.received_at")}, c.campaign, -(OLD.type = 'delivery'),
           -(OLD.type = 'seen'), -(OLD.type = 'reply')
    FROM (SELECT '*' AS campaign UNION ALL
          SELECT campaign FROM messages WHERE msg_key = OLD.msg_key AND campaign IS NOT NULL)
         AS c;
END""",
        f"""CREATE TRIGGER dlr_count_rejected_inserted AFTER INSERT ON rejected BEGIN
    INSERT INTO message_counts (bucket, campaign, rejected)
    VALUES ({_minute("NEW.received_at")}, '*', 1);
END""",
        f"""CREATE TRIGGER dlr_count_rejected_deleted AFTER DELETE ON rejected BEGIN
    INSERT INTO message_counts (bucket, campaign, rejected)
    VALUES ({_minute("OLD.received_at")}, '*', -1);
END""",
    ]


# --- existing rows -----------------------------------------------------------------------------

def _count_existing(dialect: str) -> None:
    """Count what is already stored, as the triggers would have."""
    minute = (lambda c: f"date_trunc('minute', {c})") if dialect == "postgresql" else _minute
    as_int = _pg_int if dialect == "postgresql" else (lambda c: f"({c})")
    status = ", ".join(f"sum({as_int(c.format(m='m').replace('TRUE', '1=1'))})"
                       for c in STATUS.values())
    cols = ", ".join(STATUS)
    for per in ("'*'", "m.campaign"):
        _run(f"INSERT INTO message_counts (bucket, campaign, {cols}) "
                   f"SELECT {minute('m.created_at')}, {per}, {status} FROM messages m "
                   f"WHERE {per} IS NOT NULL GROUP BY 1, 2")
        _run(f"INSERT INTO code_counts (bucket, campaign, code, n) "
                   f"SELECT {minute('m.created_at')}, {per}, {SHOWN.format(m='m')}, count(*) "
                   f"FROM messages m WHERE {per} IS NOT NULL AND m.status_extended IS NOT NULL "
                   f"GROUP BY 1, 2, 3")
        by_type = ", ".join(f"sum({as_int(f'e.type = {t!r}')})"
                            for t in ("delivery", "seen", "reply"))
        _run(f"INSERT INTO message_counts (bucket, campaign, {', '.join(EVENTS)}) "
                   f"SELECT {minute('e.received_at')}, {per}, {by_type} "
                   f"FROM events e LEFT JOIN messages m ON m.msg_key = e.msg_key "
                   f"WHERE {per} IS NOT NULL GROUP BY 1, 2")
    _run(f"INSERT INTO campaign_counts (campaign, {cols}, first_at, last_at) "
               f"SELECT m.campaign, {status}, min(m.created_at), max(m.updated_at) "
               f"FROM messages m WHERE m.campaign IS NOT NULL GROUP BY 1")
    _run(f"INSERT INTO message_counts (bucket, campaign, rejected) "
               f"SELECT {minute('r.received_at')}, '*', count(*) FROM rejected r GROUP BY 1")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("campaign", sa.String(length=64), nullable=True))
        for name in EVENTS.values():
            batch_op.add_column(sa.Column(name, sa.Integer(), server_default="0",
                                          nullable=False))
        batch_op.create_index(batch_op.f("ix_messages_campaign_id"), ["campaign", "id"])
        batch_op.create_index(batch_op.f("ix_messages_created_at_id"), ["created_at", "id"])
        batch_op.drop_index("ix_messages_created_at")
    # The notifications each stored message already has.
    for type_, column in (("delivery", "delivery_events"), ("seen", "seen_events"),
                          ("reply", "reply_events")):
        _run(f"UPDATE messages SET {column} = (SELECT count(*) FROM events e "
                   f"WHERE e.msg_key = messages.msg_key AND e.type = '{type_}')")
    _count_tables()
    _count_existing(dialect)
    if dialect == "postgresql":
        _pg_create_triggers()
    else:
        for statement in _sqlite_triggers():
            _run(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name, _body, table, _event, _transition in PG_TRIGGERS:  # SQLite's have these names
        _run(f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if dialect == "postgresql"
                                                      else ""))
        if dialect == "postgresql":
            _run(f"DROP FUNCTION IF EXISTS {name}()")
    op.drop_table("campaign_counts")
    op.drop_table("code_counts")
    op.drop_table("message_counts")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_messages_created_at"), ["created_at"])
        batch_op.drop_index(batch_op.f("ix_messages_created_at_id"))
        batch_op.drop_index(batch_op.f("ix_messages_campaign_id"))
        for name in reversed(list(EVENTS.values())):
            batch_op.drop_column(name)
        batch_op.drop_column("campaign")
