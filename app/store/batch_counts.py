"""SQLite: the counts' delta rows of one write-path batch, added in the batch's transaction.

PostgreSQL keeps the counts with statement triggers (migrations/versions/
2026-12-07-1300_campaign_counts.py): each statement's rows at once, a handful of delta rows a
batch. SQLite has only row triggers, which added three to five delta rows per notification,
each a B-tree insert, and made the squash fold them all again; they cost the ingest more than
anything else the counts do (docs/decisions/squashable-counts.md). So on SQLite the write path
keeps them itself: `BatchCounts` reads the rows an upsert round touches before and after it,
and the batch adds one delta row per key (minute and campaign; campaign). The rules are the
triggers' (PostgreSQL's still apply them), restated here on a row's before and after:

- a message counts, by status and how far it got, in the minute it was first known, under "*"
  and its campaign; a label changed by a send moves it from the old campaign to the new one;
- a notification counts under "*" in the minute it was received; under its message's
  campaign as the message's notification columns grow (at the message's `updated_at`, which
  is that notification's time); a send that sets or changes the label moves the message's
  stored notifications from the old campaign to the new, each at its own minute;
- a message counts by the status_extended it shows, in the minute it was first known;
- a campaign's lifetime counts, with its first and last activity.

Deletes (the purge) and rejected callbacks keep SQLite's row triggers: they are not the
write path's hot part.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from app.core.notifications import shown_status_extended
from app.store.counts import ALL, EVENT_COLUMNS, STATUS_COLUMNS

# A message's flags, after the `messages` count of 1: its status, reached, opened, replied.
FLAGS = STATUS_COLUMNS[1:]
STATUSES = FLAGS[:5]
EVENT_TYPES = tuple(c.removeprefix("ev_") for c in EVENT_COLUMNS)

# A round's rows, read as one JSON array (one step of sqlite3), with the flags computed here:
# the key, created_at, updated_at, campaign, send_id, the FLAGS, the notifications stored of
# each type, status_extended and kind (see _Read).
_READ = (
    "SELECT json_group_array(json_array(msg_key, created_at, updated_at, campaign, send_id, "
    + ", ".join(f"status = '{s}'" for s in STATUSES)
    + ", delivered_at IS NOT NULL, seen_at IS NOT NULL, reply_events > 0, "
    "delivery_events, seen_events, reply_events, status_extended, kind)) FROM messages "
    "WHERE msg_key IN (SELECT value FROM json_each(?))")
_CREATED, _UPDATED, _CAMPAIGN, _SEND = 1, 2, 3, 4
_FLAGS = slice(5, 5 + len(FLAGS))
_EVENTS = slice(_FLAGS.stop, _FLAGS.stop + len(EVENT_TYPES))
_EXTENDED, _KIND = _EVENTS.stop, _EVENTS.stop + 1
# The stored notifications of messages whose label a send moved, by minute and type.
_MOVED = (
    "SELECT msg_key, received_at, type, count(*) FROM events "
    "WHERE msg_key IN (SELECT value FROM json_each(?)) GROUP BY 1, substr(received_at, 1, 16), 3")

Row = list[Any]  # a message as _READ gives it


def minute(stored: str) -> str:
    """The minute bucket of a time as SQLite stores it ('YYYY-MM-DD HH:MM:SS.ffffff'), as
    the triggers write it."""
    return stored[:16] + ":00.000000"


def read_rows(conn: Connection, keys: list[str]) -> dict[str, Row]:
    """The stored rows of `keys` (absent: not stored yet), as the counts see them."""
    found = json.loads(conn.exec_driver_sql(_READ, (json.dumps(keys),)).scalar_one())
    return {row[0]: row for row in found}


def _code(row: Row) -> str | None:
    return shown_status_extended(row[_EXTENDED], row[_KIND]) if row[_EXTENDED] else None


@dataclass
class BatchCounts:
    """The deltas of one batch; `write` adds them, summed per key, in the batch's transaction.

    Python's work per message is a few increments of counters keyed by the flags it has (the
    per-message sums over nine columns cost more than the row triggers did, profiled); the
    sums are made once per key and combination of flags, when the batch is written."""

    # (bucket, campaign, flags) -> messages with these flags, added (or taken off: < 0)
    statuses: Counter[tuple[str, str, tuple[int, ...]]] = field(default_factory=Counter)
    # (bucket, campaign, type) -> notifications
    events: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # (bucket, campaign, code) -> messages showing it
    codes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # (campaign, flags) -> messages, and each campaign's first and last activity
    campaigns: Counter[tuple[str, tuple[int, ...]]] = field(default_factory=Counter)
    active: dict[str, list[str]] = field(default_factory=dict)

    def notification(self, received_at: str, type_: str) -> None:
        """A notification stored (not a duplicate), received at `received_at` (stored text)."""
        self.events[minute(received_at), ALL, type_] += 1

    def changed(self, conn: Connection, before: dict[str, Row], after: dict[str, Row]
                ) -> None:
        """What one upsert round did: every key's row before (absent: new) and after it."""
        moved: list[str] = []
        for key, new in after.items():
            old = before.get(key)
            if old is None:
                self._inserted(new)
                continue
            label_moved = new[_CAMPAIGN] != old[_CAMPAIGN] and new[_SEND] != old[_SEND]
            if label_moved:
                moved.append(key)
            self._updated(old, new, label_moved)
        if moved:
            # A label set or changed by a send recorded after the message's DLRs: its stored
            # notifications leave the old campaign's counts for the new one's.
            for key, at, type_, n in conn.exec_driver_sql(_MOVED, (json.dumps(moved),)):
                bucket, was, now = minute(at), before[key][_CAMPAIGN], after[key][_CAMPAIGN]
                if was is not None:
                    self.events[bucket, was, type_] -= n
                if now is not None:
                    self.events[bucket, now, type_] += n

    def _inserted(self, new: Row) -> None:
        bucket, flags, campaign = minute(new[_CREATED]), tuple(new[_FLAGS]), new[_CAMPAIGN]
        self.statuses[bucket, ALL, flags] += 1
        code = _code(new)
        if code is not None:
            self.codes[bucket, ALL, code] += 1
        if campaign is not None:
            self.statuses[bucket, campaign, flags] += 1
            self._grown(new, campaign, new[_EVENTS])
            if code is not None:
                self.codes[bucket, campaign, code] += 1
            self._campaign(campaign, flags, new)

    def _updated(self, old: Row, new: Row, moved: bool) -> None:
        bucket = minute(new[_CREATED])  # never changes once stored
        was_flags, flags = tuple(old[_FLAGS]), tuple(new[_FLAGS])
        was, campaign = old[_CAMPAIGN], new[_CAMPAIGN]
        if was_flags != flags:
            self.statuses[bucket, ALL, was_flags] -= 1
            self.statuses[bucket, ALL, flags] += 1
        if was != campaign or was_flags != flags:
            if was is not None:
                self.statuses[bucket, was, was_flags] -= 1
                self.campaigns[was, was_flags] -= 1
            if campaign is not None:
                self.statuses[bucket, campaign, flags] += 1
        if campaign is not None:
            self._campaign(campaign, flags if was != campaign or was_flags != flags else None,
                           new)

        # Its notifications under its campaign, at the latest one's minute; on a move, the
        # old campaign had all but these, and the move takes all of them off it.
        grown = [n - o for n, o in zip(new[_EVENTS], old[_EVENTS], strict=True)]
        target = was if moved else campaign
        if target is not None and any(grown):
            self._grown(new, target, grown)

        old_code, code = _code(old), _code(new)
        if old_code != code or was != campaign:
            if old_code is not None:
                self.codes[bucket, ALL, old_code] -= 1
                if was is not None:
                    self.codes[bucket, was, old_code] -= 1
            if code is not None:
                self.codes[bucket, ALL, code] += 1
                if campaign is not None:
                    self.codes[bucket, campaign, code] += 1

    def _grown(self, new: Row, campaign: str, grown: list[int]) -> None:
        at = minute(new[_UPDATED])
        for type_, n in zip(EVENT_TYPES, grown, strict=True):
            if n:
                self.events[at, campaign, type_] += n

    def _campaign(self, campaign: str, flags: tuple[int, ...] | None, new: Row) -> None:
        """A message of `campaign` with `flags` added to its lifetime counts (None: its flags
        are counted already), active from its first to its last notification."""
        if flags is not None:
            self.campaigns[campaign, flags] += 1
        times = self.active.get(campaign)
        if times is None:
            self.active[campaign] = [new[_CREATED], new[_UPDATED]]
        else:
            times[0], times[1] = min(times[0], new[_CREATED]), max(times[1], new[_UPDATED])

    def write(self, conn: Connection) -> None:
        """Add the batch's delta rows (none for a key whose deltas cancel out)."""
        width = 1 + len(FLAGS)
        rows: dict[tuple[str, str], list[int]] = {}
        for (bucket, campaign, flags), n in self.statuses.items():
            if n:
                sums = rows.setdefault((bucket, campaign), [0] * (width + len(EVENT_TYPES)))
                sums[0] += n
                for i, flag in enumerate(flags, 1):
                    sums[i] += n * flag
        for (bucket, campaign, type_), n in self.events.items():
            if n:
                sums = rows.setdefault((bucket, campaign), [0] * (width + len(EVENT_TYPES)))
                sums[width + EVENT_TYPES.index(type_)] += n
        _insert(conn, "message_counts", _MESSAGE_COUNT_COLUMNS,
                [(b, c, *v) for (b, c), v in rows.items() if any(v)])
        _insert(conn, "code_counts", ("bucket", "campaign", "code", "n"),
                [(*k, n) for k, n in self.codes.items() if n])
        lifetime: dict[str, list[Any]] = {c: [0] * width + times
                                          for c, times in self.active.items()}
        for (campaign, flags), n in self.campaigns.items():
            if n:
                sums = lifetime.setdefault(campaign, [0] * width + [None, None])
                sums[0] += n
                for i, flag in enumerate(flags, 1):
                    sums[i] += n * flag
        _insert(conn, "campaign_counts", _CAMPAIGN_COUNT_COLUMNS,
                [(c, *v) for c, v in lifetime.items() if any(v[:width]) or v[width]])


_MESSAGE_COUNT_COLUMNS = ("bucket", "campaign", *STATUS_COLUMNS, *EVENT_COLUMNS)
_CAMPAIGN_COUNT_COLUMNS = ("campaign", *STATUS_COLUMNS, "first_at", "last_at")


def _insert(conn: Connection, table: str, columns: tuple[str, ...],
            rows: list[tuple[Any, ...]]) -> None:
    # A few rows a batch: one statement each table (SQLite's parameter limit is 32,766).
    for i in range(0, len(rows), 500):
        part = rows[i:i + 500]
        values = ", ".join(["(" + ", ".join("?" * len(columns)) + ")"] * len(part))
        conn.exec_driver_sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}",
                             tuple(v for row in part for v in row))
