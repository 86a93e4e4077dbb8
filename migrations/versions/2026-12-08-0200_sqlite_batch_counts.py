"""SQLite: the write path keeps the counts of what it writes, one delta row per key a batch
(app/store/batch_counts.py), instead of the row triggers on messages and events inserts

Revision ID: f5a6b7c8d9e0
Revises: e4f5a6b7c8d9
Create Date: 2026-12-08 02:00:00

SQLite's row triggers added three to five delta rows per stored notification; the write path
now adds a handful per batch in the same transaction. The counts need no recount: the triggers
counted every row up to this revision and the write path counts every row after it. The
triggers on deletes (the purge) and on rejected callbacks stay. PostgreSQL is unchanged: its
statement triggers already count a statement's rows at once.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "f5a6b7c8d9e0"
down_revision: str | None = "e4f5a6b7c8d9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WRITE_PATH_TRIGGERS = ("dlr_count_messages_inserted", "dlr_count_messages_updated",
                       "dlr_count_events_inserted")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for name in WRITE_PATH_TRIGGERS:
        op.get_bind().exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")


def downgrade() -> None:
    """The triggers again, as the revision that added them wrote them (a write path of the
    older code then finds its counts kept)."""
    if op.get_bind().dialect.name != "sqlite":
        return
    path = Path(__file__).with_name("2026-12-07-1300_campaign_counts.py")
    spec = importlib.util.spec_from_file_location("campaign_counts_revision", path)
    assert spec is not None and spec.loader is not None
    earlier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(earlier)
    for statement in earlier._sqlite_triggers():
        if any(f"TRIGGER {name} " in statement for name in WRITE_PATH_TRIGGERS):
            op.get_bind().exec_driver_sql(statement)
