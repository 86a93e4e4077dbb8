"""message event sequence: what forwarding needs to know about each status change

Revision ID: b2c3d4e5f601
Revises: 34b67c061b07
Create Date: 2026-11-27 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b2c3d4e5f601"
down_revision: str | None = "34b67c061b07"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("status_event", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("event_seq", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("event_seq")
        batch_op.drop_column("status_event")
        batch_op.drop_column("previous_status")
