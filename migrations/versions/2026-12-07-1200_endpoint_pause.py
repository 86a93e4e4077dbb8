"""endpoint pause: endpoints.paused_at (a paused endpoint's deliveries wait)

Revision ID: d1e2f3a4b5c6
Revises: c7f0a2d41b12
Create Date: 2026-12-07 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.store.db

revision: str = "d1e2f3a4b5c6"
down_revision: str | None = "c7f0a2d41b12"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Time = app.store.db.UTCDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:
        batch.add_column(sa.Column("paused_at", Time, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:
        batch.drop_column("paused_at")
