"""What the dashboard's counts cost SQLite's writer: CPU per stored notification of the write
path (`store()` and its commit) with the counts as they are kept, with SQLite's former row
triggers (the schema one revision back), and without any counts, in one run, alternating.

    python -m bench.counts_cost [--rounds 3] [--campaigns]

Each run writes 60,000 notifications of the benchmark's callback mix (bench/mix.lua) in
batches of 60 to a fresh SQLite file, squashing every 100 batches as the server would; the
medians of the rounds are reported, and their ratio to the run without counts.
`--campaigns` gives every message a campaign (DLR_CAMPAIGN_PATTERN), as a bulk sender's
labelled sends have. The figures are in docs/decisions/squashable-counts.md.
"""

from __future__ import annotations

import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import Engine, create_engine, event

import app.store.write as write
from app.core.notifications import Notification, interpret
from app.store import counts
from app.store.db import _sqlite_pragmas
from app.store.migrate import upgrade

TRIGGERS_REVISION = "e4f5a6b7c8d9"  # the last revision with SQLite's row triggers
NOTIFICATIONS = 60_000
BATCH = 60
MODES = ("none", "triggers", "batch")


def mix(rng: random.Random, pattern: re.Pattern[str] | None) -> Iterator[Notification]:
    """bench/mix.lua's shares: 70% delivered, 15% seen, 10% undelivered, 5% replies."""
    delivered = seen = replied = 0
    while True:
        r = rng.randint(1, 100)
        if r <= 70 or delivered < 10:
            delivered += 1
            fields = {"type": "delivery", "msg_id": f"m-{delivered}", "status": "delivered",
                      "p_transaction_id": f"camp{delivered % 5}-{delivered}"}
        elif r <= 85:
            seen += 1
            fields = {"type": "seen", "msg_id": f"m-{seen}"}
        elif r <= 95:
            delivered += 1
            fields = {"type": "delivery", "msg_id": f"m-{delivered}", "status": "undelivered",
                      "status_extended": "VIBER_EXPIRED",
                      "p_transaction_id": f"camp{delivered % 5}-{delivered}"}
        else:
            replied += 1
            fields = {"type": "reply", "msg_id": f"m-{replied}", "text": f"ok {replied}"}
        yield interpret(fields, received_at=datetime.now(UTC), campaign_pattern=pattern)


@contextmanager
def counting(mode: str) -> Iterator[None]:
    """The write path with its per-batch counts, or without (the triggers count, or none)."""
    kept = write.BatchCounts
    if mode != "batch":
        write.BatchCounts = lambda: None  # type: ignore[assignment,misc,assignment]
    try:
        yield
    finally:
        write.BatchCounts = kept  # type: ignore[misc]


def database(path: Path, mode: str) -> Engine:
    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _sqlite_pragmas)
    upgrade(engine, TRIGGERS_REVISION if mode == "triggers" else "head")
    if mode == "none":
        with engine.begin() as conn:
            for (name,) in conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger'").all():
                conn.exec_driver_sql(f"DROP TRIGGER {name}")
    return engine


def one_run(workdir: Path, mode: str, pattern: re.Pattern[str] | None) -> float:
    """CPU µs per notification of store() and commit, squashes included."""
    engine = database(workdir / f"{mode}-{time.monotonic_ns()}.db", mode)
    notes = mix(random.Random(1), pattern)
    spent = 0.0
    marks: tuple[int, ...] | None = None
    try:
        with counting(mode), engine.connect() as conn:
            for i in range(NOTIFICATIONS // BATCH):
                items: list[Any] = [next(notes) for _ in range(BATCH)]
                started = time.process_time()
                with conn.begin():
                    write.store(conn, items)
                if mode != "none" and i % 100 == 99:
                    with conn.begin():
                        seen = counts.high_marks(conn)
                        counts.squash(conn, marks)
                    marks = seen
                spent += time.process_time() - started
    finally:
        engine.dispose()
    return spent / NOTIFICATIONS * 1e6


def run(rounds: Annotated[int, typer.Option()] = 3,
        campaigns: Annotated[bool, typer.Option(help="Every message has a campaign")] = False
        ) -> None:
    """Print the write path's CPU per notification in each mode and its ratio to none."""
    pattern = re.compile(r"^(?P<campaign>.+)-\d+$") if campaigns else None
    results: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for mode in MODES:
                results[mode].append(one_run(Path(tmp), mode, pattern))
    base = statistics.median(results["none"])
    for mode in MODES:
        median = statistics.median(results[mode])
        runs = ", ".join(f"{v:.0f}" for v in results[mode])
        print(f"{mode:9} {median:6.1f} µs per notification (runs: {runs}); "
              f"{median / base:.2f} of none")


if __name__ == "__main__":
    sys.exit(typer.run(run))
