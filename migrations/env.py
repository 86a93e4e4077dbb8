"""Alembic environment: the URL comes from the caller or from the DLR_ settings."""

from alembic import context
from sqlalchemy import text

from app.config import get_settings
from app.store import models  # noqa: F401  (registers the tables on Base.metadata)
from app.store.db import Base, make_engine

# Replicas may all run `dlr serve` (which migrates) at once; on PostgreSQL one advisory
# lock lets exactly one of them migrate while the others wait and then find nothing to do.
MIGRATION_LOCK_ID = 0x444C52


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(get_settings(), pool_size=1)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    is_pg = connection.dialect.name == "postgresql"
    if is_pg:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
        connection.commit()
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        if is_pg:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
            connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `dlr migrate`")
run_migrations_online()
