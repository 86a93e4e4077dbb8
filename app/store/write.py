"""The write path's SQL: one batch of notifications, rejections and send records written inside
the caller's transaction (`store`), and the forwarded events it causes.

Message rows are merged by one generated upsert (`MESSAGE_UPSERT`): each column's rule comes
from its `Merge` in app/store/models.py, and the precedence of statuses from `RANK` in
app/core/notifications.py. The SQL is the only place the rule is applied, so the result is the
same whatever order the notifications arrive in, and the database reports each status
change (for forwarding) without a second read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from itertools import chain
from typing import Any, Literal, Protocol, cast

from sqlalchemy import Column, Connection, Table, insert

from app.core.message import MessageSummary
from app.core.notifications import FINAL_RANK, RANK, Notification, Rejection, Status, msg_key
from app.store.batch_counts import BatchCounts, read_rows
from app.store.db import stamper
from app.store.models import Event, Merge, Message, Rejected, Send

log = logging.getLogger(__name__)

# "spooled": kept in the local spool while PostgreSQL is away (app/store/spool.py).
Outcome = Literal["new", "duplicate", "rejected", "spooled"]


@dataclass(slots=True)
class SendRecord:
    """What one request to the provider gave: its `sends` row and the msg_ids it returned."""

    p_transaction_id: str
    kind: str
    sending_method: str
    sender: str | None
    phones: list[str]
    outcome: str
    code: int | None
    tech_message: str | None
    attempts: int
    created_at: datetime
    msg_ids: dict[str, str] = field(default_factory=dict)  # phone -> msg_id
    send_id: int | None = None  # set once written
    campaign: str | None = None  # the label of every message it sent


Item = Notification | Rejection | SendRecord


class StoreUnavailable(RuntimeError):
    """The database could not commit; the caller must not acknowledge."""


class DatabaseUnreachable(StoreUnavailable):
    """The database itself is away (down, unreachable, timed out), not one row refused: what
    the spool takes over for (app/store/spool.py)."""


@dataclass(frozen=True, slots=True)
class Change:
    """A forwarded event's source: a status change or a new reply, as committed."""

    type: Literal["message.status", "message.reply"]
    message: dict[str, Any]  # MessageSummary as the API shows it, plus previous_status, sequence
    msg_key: str
    p_transaction_id: str | None
    sequence: int
    occurred_at: datetime
    reply: dict[str, Any] | None = None


class Forwarding(Protocol):
    """The outbox the write path fills in the same transaction (app/forwarding)."""

    # An SQL condition, true when anyone listens: asked in the events insert's RETURNING.
    active_sql: str

    def enqueue(self, conn: Connection, changes: Sequence[Change]) -> int: ...


# --- SQL generated from the models ----------------------------------------------------------

_PG_TYPES = {"BIGINT": "bigint", "INTEGER": "integer", "BOOLEAN": "boolean",
             "BYTEA": "bytea", "TIMESTAMP WITH TIME ZONE": "timestamptz"}


def _pg_type(column: Column[Any]) -> str:
    from sqlalchemy.dialects import postgresql

    compiled = column.type.compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]
    return _PG_TYPES.get(compiled, "text")


def _columns(table: Table) -> tuple[tuple[str, str], ...]:
    """(name, PostgreSQL type) of every column the write path fills: all but the row id."""
    return tuple((c.name, _pg_type(c)) for c in table.columns if not c.primary_key)


EVENT_COLUMNS = _columns(Event.__table__)  # type: ignore[arg-type]
MESSAGE_COLUMNS = _columns(Message.__table__)  # type: ignore[arg-type]
_MESSAGE_NAMES = tuple(name for name, _ in MESSAGE_COLUMNS)
_EVENT_NAMES = tuple(name for name, _ in EVENT_COLUMNS)


def _rank_sql() -> tuple[str, str]:
    """`wins` and `changed` conditions, from RANK: a lower status never overwrites a higher
    one; between two final ones (equal rank) the later-received wins."""
    wins = (f"(excluded.status_rank > messages.status_rank OR (excluded.status_rank = "
            f"messages.status_rank AND excluded.status_rank = {FINAL_RANK}))")
    return wins, f"({wins} AND excluded.status <> messages.status)"


def _merge_sql() -> str:
    wins, changed = _rank_sql()
    templates: dict[Merge, str | None] = {
        Merge.KEY: None,
        Merge.KEEP: None,
        Merge.FIRST: "COALESCE(messages.{c}, excluded.{c})",
        Merge.SEND: "COALESCE(excluded.{c}, messages.{c})",
        Merge.RANKED: f"CASE WHEN {wins} THEN excluded.{{c}} ELSE messages.{{c}} END",
        Merge.ON_CHANGE: f"CASE WHEN {changed} THEN excluded.{{c}} ELSE messages.{{c}} END",
        Merge.PREVIOUS: f"CASE WHEN {changed} THEN messages.status ELSE messages.{{c}} END",
        # A row that sets a status counts a change; any other (a reply: 1, a send: 0) adds
        # what it carries.
        Merge.SEQUENCE: (f"messages.{{c}} + CASE WHEN excluded.status_event IS NULL "
                         f"THEN excluded.{{c}} WHEN {changed} THEN 1 ELSE 0 END"),
        Merge.LATEST: "excluded.{c}",
        Merge.ADD: "messages.{c} + excluded.{c}",
        # Only a send record (the only row with a send_id) sets a label over another one.
        Merge.LABEL: ("CASE WHEN excluded.send_id IS NOT NULL AND excluded.{c} IS NOT NULL "
                      "THEN excluded.{c} ELSE COALESCE(messages.{c}, excluded.{c}) END"),
    }
    sets = []
    for column in Message.__table__.columns:
        if column.primary_key:
            continue
        rule = column.info.get("merge")
        if not isinstance(rule, Merge):
            raise TypeError(f"messages.{column.name} has no Merge rule in its info")
        template = templates[rule]
        if template is not None:
            sets.append(f"{column.name} = {template.format(c=column.name)}")
    return ", ".join(sets)


MESSAGE_UPSERT = f"ON CONFLICT (msg_key) DO UPDATE SET {_merge_sql()}"


@lru_cache(maxsize=64)
def _insert_sql(dialect: str, table: str, columns: tuple[tuple[str, str], ...], rows: int,
                tail: str) -> str:
    # The hot path speaks SQL directly: SQLAlchemy Core would compile and type-process every
    # batch, which costs more than the database work itself.
    names = ", ".join(name for name, _ in columns)
    if dialect == "postgresql":
        # The whole batch as one JSON parameter: one statement for any row count, so
        # PostgreSQL plans it once, and Python serialises it in C rather than value by value.
        record = ", ".join(f"{n} {'text' if t == 'bytea' else t}" for n, t in columns)
        select = ", ".join(f"decode({n}, 'hex')" if t == "bytea" else n for n, t in columns)
        return (f"INSERT INTO {table} ({names}) SELECT {select} "
                f"FROM json_to_recordset(%s::json) AS r({record}) {tail}")
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({names}) VALUES {', '.join([row] * rows)} {tail}"


def _json_value(value: Any) -> Any:
    """JSON for what json.dumps cannot write itself: the bytes of a reply's raw text."""
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} in a write-path row")


def _bulk_insert(conn: Connection, table: str, columns: tuple[tuple[str, str], ...],
                 rows: list[tuple[Any, ...]], tail: str, chunk: int = 500) -> list[Any]:
    """Insert many rows in few statements; returns the RETURNING rows, if any. Times in
    `rows` are already bound (`stamper`)."""
    returned: list[Any] = []
    postgres = conn.dialect.name == "postgresql"
    names = [name for name, _ in columns]
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        sql = _insert_sql(conn.dialect.name, table, columns, 0 if postgres else len(part), tail)
        params: tuple[Any, ...]
        if postgres:
            params = (json.dumps([dict(zip(names, r, strict=True)) for r in part],
                                 default=_json_value),)
        else:
            params = tuple(chain.from_iterable(part))
        result = conn.exec_driver_sql(sql, params)
        if result.returns_rows:
            returned.extend(result.fetchall())
    return returned


def _insert_events(conn: Connection, rows: list[tuple[Any, ...]], forwarding: Forwarding | None
                   ) -> tuple[set[str], bool]:
    """Insert the events that are not stored yet: (the dedupe keys of those that were new,
    whether any forwarding endpoint listens)."""
    dedupe = _EVENT_NAMES.index("dedupe_key")
    insert_tail = "ON CONFLICT (dedupe_key) DO NOTHING"
    if conn.dialect.name == "postgresql":
        returning = "RETURNING dedupe_key" + (
            f", {forwarding.active_sql}" if forwarding is not None else "")
        returned = _bulk_insert(conn, "events", EVENT_COLUMNS, rows, f"{insert_tail} {returning}")
        return {r[0] for r in returned}, forwarding is not None and any(r[1] for r in returned)
    # SQLite: no RETURNING. sqlite3 steps (and hands the GIL back and forth with the event
    # loop) once per returned row; the rows a statement inserted are a contiguous rowid range
    # instead (one writer holds the database's write lock), read back in one step.
    new: set[str] = set()
    listening = False
    for i in range(0, len(rows), SQLITE_ROWS):
        part = rows[i:i + SQLITE_ROWS]
        result = conn.exec_driver_sql(
            _insert_sql("sqlite", "events", EVENT_COLUMNS, len(part), insert_tail),
            tuple(chain.from_iterable(part)))
        inserted, last = result.rowcount, result.lastrowid
        if inserted == len(part) and forwarding is None:
            new.update(r[dedupe] for r in part)
        elif inserted > 0:
            keys, active = conn.exec_driver_sql(
                "SELECT group_concat(dedupe_key, ','), "
                f"{forwarding.active_sql if forwarding is not None else 'false'} "
                "FROM events WHERE id BETWEEN ? AND ?", (last - inserted + 1, last)).one()
            new.update(keys.split(","))
            listening = listening or bool(active)
    return new, listening


# SQLite statements take at most this many rows (11 parameters each, far below its limit).
SQLITE_ROWS = 500


def _row(values: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    """A row tuple in the columns' order, absent columns NULL."""
    return tuple(map(values.get, names))


# --- message rows -----------------------------------------------------------------------------

def event_row(n: Notification, stamp: Any) -> tuple[Any, ...]:
    """The timeline row of a notification (every column of `events` but the id); `stamp` is
    its time, bound."""
    return _row({
        "dedupe_key": n.dedupe_key, "msg_key": n.msg_key, "type": n.type,
        "status": n.status.value if n.status else None, "status_extended": n.status_extended,
        "unknown_status_extended": n.unknown_status_extended, "text": n.text,
        "text_raw": n.text_raw, "p_transaction_id": n.p_transaction_id,
        "received_at": stamp,
    }, _EVENT_NAMES)


def notification_row(n: Notification, stamp: Any) -> tuple[Any, ...]:
    """What one new notification says about its message (merged by MESSAGE_UPSERT)."""
    status = n.message_status
    shown = status or Status.ACCEPTED
    return _row({
        "msg_key": n.msg_key, "msg_id": n.msg_id, "p_transaction_id": n.p_transaction_id,
        "status": shown.value, "status_rank": RANK[shown],
        "status_extended": n.status_extended if status else None,
        "status_event": n.dedupe_key if status else None,
        "event_seq": 1 if n.type == "reply" or status is not None else 0,
        # seen implies delivered
        "delivered_at": stamp if shown in (Status.DELIVERED, Status.SEEN) else None,
        "seen_at": stamp if shown is Status.SEEN else None,
        "created_at": stamp, "updated_at": stamp, "campaign": n.campaign,
        "delivery_events": int(n.type == "delivery"), "seen_events": int(n.type == "seen"),
        "reply_events": int(n.type == "reply"),
    }, _MESSAGE_NAMES)


def send_rows(record: SendRecord, stamp: Any) -> list[tuple[Any, ...]]:
    """One accepted message per msg_id the provider returned; `stamp`: the send's time."""
    return [_row({
        "msg_key": msg_key(msg_id), "msg_id": msg_id, "p_transaction_id": record.p_transaction_id,
        "phone": phone, "sender": record.sender, "kind": record.kind, "send_id": record.send_id,
        "status": Status.ACCEPTED.value, "status_rank": RANK[Status.ACCEPTED], "event_seq": 0,
        "sent_at": stamp, "created_at": stamp, "updated_at": stamp, "campaign": record.campaign,
        "delivery_events": 0, "seen_events": 0, "reply_events": 0,
    }, _MESSAGE_NAMES) for phone, msg_id in record.msg_ids.items()]


MessageRow = tuple[tuple[Any, ...], Notification | None]  # the row, and the notification or None
_KEY = _MESSAGE_NAMES.index("msg_key")


def _rounds(rows: list[MessageRow]) -> list[list[MessageRow]]:
    """Split rows so that no message occurs twice in one statement (PostgreSQL refuses to
    update a row twice in one command), keeping each message's rows in arrival order."""
    rounds: list[list[MessageRow]] = []
    seen: dict[str, int] = {}
    for row in rows:
        key = row[0][_KEY]
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(row)
    return rounds


def _aware(value: Any) -> Any:
    """A time from RETURNING: SQLite gives text, PostgreSQL an aware datetime."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value


def _change(row: Any, n: Notification) -> Change | None:
    """The forwarded event a committed notification caused, read off its returned row."""
    values = dict(zip(_MESSAGE_NAMES, row, strict=True))
    if n.type == "reply":
        kind: Literal["message.status", "message.reply"] = "message.reply"
    elif values["status_event"] == n.dedupe_key:
        kind = "message.status"
    else:
        return None  # a late lower status, or the same status again: nothing changed
    for name in ("sent_at", "delivered_at", "seen_at", "created_at", "updated_at"):
        values[name] = _aware(values[name])
    message = MessageSummary.model_validate(values).model_dump(mode="json")
    message["previous_status"] = values["previous_status"] if kind == "message.status" else None
    message["sequence"] = values["event_seq"]
    return Change(
        type=kind, message=message, msg_key=n.msg_key,
        p_transaction_id=values["p_transaction_id"], sequence=values["event_seq"],
        occurred_at=n.received_at,
        reply={"text": n.text or "", "received_at": n.received_at.isoformat()}
        if kind == "message.reply" else None,
    )


# SQLite: the merged rows of a round read back in one step, as one JSON array. RETURNING
# steps once per row, and sqlite3 hands the GIL to the event loop and back at every step
# (beside a thread spinning as a busy loop would, a batch of 36 with forwarding on took
# 20.0 ms with RETURNING, 16.0 ms this way).
_SQLITE_READ_BACK = (
    f"SELECT json_group_array(json_array({', '.join(_MESSAGE_NAMES)})) FROM messages "
    "WHERE msg_key IN (SELECT value FROM json_each(?))")


def upsert_messages(conn: Connection, rows: list[MessageRow], *, returning: bool,
                    tally: BatchCounts | None = None) -> list[Change]:
    """Merge message rows; with `returning`, report the status changes and replies. `tally`
    (SQLite): takes what each round changed, for the counts."""
    changes: list[Change] = []
    sqlite = conn.dialect.name == "sqlite"
    tail = MESSAGE_UPSERT + (f" RETURNING {', '.join(_MESSAGE_NAMES)}"
                             if returning and not sqlite else "")
    for part in _rounds(rows):
        # Sorted keys make concurrent writers (replicas) lock rows in the same order.
        part.sort(key=lambda r: r[0][_KEY])
        keys = [row[_KEY] for row, _ in part]
        before = read_rows(conn, keys) if tally is not None else {}
        returned = _bulk_insert(conn, "messages", MESSAGE_COLUMNS, [r for r, _ in part], tail)
        if tally is not None:
            tally.changed(conn, before, read_rows(conn, keys))
        if returning and sqlite:
            # Read after each round, so a row is as that round left it, as RETURNING gives.
            notified = json.dumps([row[_KEY] for row, n in part if n is not None])
            returned = json.loads(
                conn.exec_driver_sql(_SQLITE_READ_BACK, (notified,)).scalar_one())
        if returning:
            by_key = {r[0]: r for r in returned}
            for row, n in part:
                if n is not None:
                    change = _change(by_key[row[_KEY]], n)
                    if change is not None:
                        changes.append(change)
    return changes


def _rejected_row(r: Rejection) -> dict[str, Any]:
    return {"reason": r.reason, "method": r.method, "content_type": r.content_type,
            "query": r.query, "body": r.body, "source_ip": r.source_ip,
            "received_at": r.received_at}


def _store_send(conn: Connection, record: SendRecord) -> None:
    record.send_id = conn.execute(
        insert(Send).returning(Send.id),
        {"p_transaction_id": record.p_transaction_id, "kind": record.kind,
         "sending_method": record.sending_method, "sender": record.sender,
         "phones": ",".join(record.phones), "outcome": record.outcome, "code": record.code,
         "tech_message": record.tech_message, "attempts": record.attempts,
         "created_at": record.created_at},
    ).scalar_one()


@dataclass(slots=True)
class Stored:
    outcomes: list[Outcome]
    forwarded: int = 0  # deliveries created for forwarding


def store(conn: Connection, items: Sequence[Item], forwarding: Forwarding | None = None
          ) -> Stored:
    """Write one batch inside the caller's transaction; the caller commits."""
    outcomes: list[Outcome] = ["rejected"] * len(items)
    rejected = [_rejected_row(i) for i in items if isinstance(i, Rejection)]
    if rejected:
        conn.execute(insert(Rejected), rejected)

    stamp = stamper(conn.dialect)
    # SQLite: the write path keeps the counts (PostgreSQL's statement triggers do there).
    tally = BatchCounts() if conn.dialect.name == "sqlite" else None
    # (index in the batch, row): notifications merged in arrival order, so that within one
    # batch the later of two final statuses wins and a message's times are those of its first
    # notifications.
    arriving: list[tuple[int, MessageRow]] = []
    first: dict[str, int] = {}  # dedupe_key -> index of its first copy in this batch
    for idx, item in enumerate(items):
        if isinstance(item, Notification):
            outcomes[idx] = "duplicate"
            first.setdefault(item.dedupe_key, idx)
        elif isinstance(item, SendRecord):
            _store_send(conn, item)
            outcomes[idx] = "new"
            arriving.extend((idx, (row, None)) for row in send_rows(item, stamp(item.created_at)))

    listening = False  # whether forwarding keeps events, asked with the events insert
    if first:
        # Inserted in dedupe_key order: writers in other processes (a second worker, a
        # replica) that insert the same notifications then wait for each other in one order,
        # never in a cycle (the message upsert sorts its rows for the same reason).
        order = sorted(first.values(), key=lambda i: cast(Notification, items[i]).dedupe_key)
        notes = [cast(Notification, items[i]) for i in order]
        stamps = [stamp(n.received_at) for n in notes]
        new, listening = _insert_events(
            conn, [event_row(n, s) for n, s in zip(notes, stamps, strict=True)], forwarding)
        for idx, n, s in zip(order, notes, stamps, strict=True):
            if n.dedupe_key in new:  # only new notifications change a message
                outcomes[idx] = "new"
                arriving.append((idx, (notification_row(n, s), n)))
                if tally is not None:
                    tally.notification(s, n.type)
    # Send records last: a label a send sets then finds every notification of its message
    # in this batch merged already, and the counts move them all to it (app/store/counts.py).
    arriving.sort(key=lambda pair: (pair[1][1] is None, pair[0]))
    message_rows = [row for _, row in arriving]

    stored = Stored(outcomes)
    if message_rows:
        # Only new notifications make changes worth forwarding (a send makes none).
        changes = upsert_messages(conn, message_rows, returning=listening, tally=tally)
        if forwarding is not None and changes:
            stored.forwarded = forwarding.enqueue(conn, changes)
    if tally is not None:
        tally.write(conn)
    return stored
